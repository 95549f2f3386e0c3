"""Which hypervisor backend runs a VM: explicit and visible.

``capsa.vm(...).backend("qemu"|"vfkit")`` wins, then ``CAPSA_BACKEND``, then the platform's
default: vfkit on macOS when it is installed, QEMU everywhere else.
"""

from __future__ import annotations

import os
import sys

from capsa.backends.base import Backend, Capabilities
from capsa.backends.qemu.backend import QemuBackend
from capsa.backends.vfkit.backend import VfkitBackend
from capsa.errors import InvalidConfig

BACKENDS: dict[str, type[QemuBackend] | type[VfkitBackend]] = {
    "qemu": QemuBackend,
    "vfkit": VfkitBackend,
}


def default_backend_name() -> str:
    if sys.platform == "darwin" and VfkitBackend().capabilities().available:
        return "vfkit"
    return "qemu"


def select_backend(name: str | None = None) -> Backend:
    chosen = name or os.environ.get("CAPSA_BACKEND") or default_backend_name()
    cls = BACKENDS.get(chosen)
    if cls is None:
        source = "CAPSA_BACKEND" if not name else "backend()"
        raise InvalidConfig(f"{source}: unknown backend {chosen!r} (one of: {', '.join(BACKENDS)})")
    return cls()


def all_capabilities() -> list[Capabilities]:
    return [cls().capabilities() for cls in BACKENDS.values()]
