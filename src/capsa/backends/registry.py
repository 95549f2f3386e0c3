"""Which hypervisor backend runs a VM: explicit and visible.

``capsa.vm(...).backend("qemu"|"vfkit")`` wins, then ``CAPSA_BACKEND``, then the platform's
default: vfkit on macOS when it is installed, QEMU everywhere else.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from capsa.backends.base import Backend, Capabilities
from capsa.errors import InvalidConfig


def _qemu() -> Backend:
    from capsa.backends.qemu.backend import QemuBackend

    return QemuBackend()


def _vfkit() -> Backend:
    # Imported on demand: its REST client (httpx) is not worth loading where vfkit is unused.
    from capsa.backends.vfkit.backend import VfkitBackend

    return VfkitBackend()


BACKENDS: dict[str, Callable[[], Backend]] = {"qemu": _qemu, "vfkit": _vfkit}


def default_backend_name() -> str:
    if sys.platform == "darwin" and _vfkit().capabilities().available:
        return "vfkit"
    return "qemu"


def select_backend(name: str | None = None) -> Backend:
    chosen = name or os.environ.get("CAPSA_BACKEND") or default_backend_name()
    make = BACKENDS.get(chosen)
    if make is None:
        source = "CAPSA_BACKEND" if not name else "backend()"
        raise InvalidConfig(f"{source}: unknown backend {chosen!r} (one of: {', '.join(BACKENDS)})")
    return make()


def all_capabilities() -> list[Capabilities]:
    return [make().capabilities() for make in BACKENDS.values()]
