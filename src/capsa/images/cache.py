"""The capsa cache directory and the lock that serializes builds into it."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

# (message, fraction done or None) — the CLI renders it as a progress display.
Progress = Callable[[str, float | None], None]


def no_progress(message: str, fraction: float | None = None) -> None:
    del message, fraction


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "capsa"


@contextlib.contextmanager
def locked(name: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``<cache>/<name>.lock`` (several processes build at once)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    lock_path = root / f"{name}.lock"
    with open(lock_path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield root
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
