"""Where a server listens by default (light: clients import it without the server)."""

from __future__ import annotations

import os
from pathlib import Path


def runtime_folder() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/capsa-{os.getuid()}"
    return Path(base) / "capsa"


def default_socket() -> Path:
    return runtime_folder() / "capsa.sock"
