"""Facts about the host that every layer may ask: its architecture, how shares reach
guests here, and room on tmpfs (where guest RAM files and scratch snapshots go)."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from capsa.errors import InvalidConfig

RAM_DIR = Path("/dev/shm")


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def share_transport() -> str:
    """How shares reach the guest on this host: ``virtiofs`` (capsa's vhost-user server)
    where vhost-user exists (Linux), else QEMU's built-in ``9p`` (macOS); ``CAPSA_SHARES``
    chooses explicitly."""
    forced = os.environ.get("CAPSA_SHARES")
    if forced:
        if forced not in ("virtiofs", "9p"):
            raise InvalidConfig(f"CAPSA_SHARES={forced!r} is not one of: virtiofs, 9p")
        return forced
    return "virtiofs" if sys.platform.startswith("linux") else "9p"


def has_room(base: Path, mem_mb: int, slack_mb: int) -> bool:
    """Whether the file system of ``base`` can take a RAM file of ``mem_mb`` and then some."""
    try:
        st = os.statvfs(base)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize >= (mem_mb + slack_mb) << 20
