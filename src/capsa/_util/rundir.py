"""Per-VM run directories: short paths (Unix socket paths are limited to 107 bytes)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from capsa._util.reaper import REAPER

# sun_path holds 108 bytes on Linux and 104 on macOS, including the terminating NUL.
MAX_SOCKET_PATH = 103 if sys.platform == "darwin" else 107


def runtime_base() -> Path:
    """Where run directories go: ``CAPSA_RUNTIME_DIR``, else the temp dir."""
    return Path(os.environ.get("CAPSA_RUNTIME_DIR") or tempfile.gettempdir())


class RunDir:
    """A private directory owned by one VM, removed with it (or by the watchdog after a crash)."""

    def __init__(self, prefix: str = "capsa-") -> None:
        base = runtime_base()
        base.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
        REAPER.watch_path(self.path)

    def socket_path(self, name: str) -> Path:
        p = self.path / name
        if len(os.fsencode(p)) > MAX_SOCKET_PATH:
            raise OSError(f"socket path too long for a Unix socket: {p}")
        return p

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        REAPER.unwatch_path(self.path)
