"""A sandbox's writable layer on a disk of its own: a sparse ext4 file, made per sandbox
and removed with it, so that large installs do not live in guest RAM."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

from capsa._util.reaper import REAPER
from capsa._util.rundir import runtime_base
from capsa._util.tools import find_tool
from capsa.errors import ImageBuildError, InvalidConfig

MIN_BYTES = 64 << 20
MAX_BYTES = 16 << 40
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(size: str | int) -> int:
    """``4G``, ``512M``, ``1T`` or a number of bytes, checked against sane bounds."""
    if isinstance(size, bool):
        raise InvalidConfig(f"invalid disk size {size!r}")
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(size))
        if not m:
            raise InvalidConfig(f"invalid disk size {size!r}: use e.g. 4G or 512M")
        n = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if not MIN_BYTES <= n <= MAX_BYTES:
        raise InvalidConfig(f"disk size {size!r} must be between 64M and 16T")
    return n - n % 4096


def make_scratch_disk(size: int) -> Path:
    """A new sparse ext4 file of ``size`` bytes (the caller removes it)."""
    mke2fs = find_tool("mke2fs")
    if mke2fs is None:
        raise ImageBuildError("a writable disk needs mke2fs: `sudo apt-get install e2fsprogs`")
    fd, name = tempfile.mkstemp(prefix="capsa-rw-", suffix=".ext4", dir=runtime_base())
    path = Path(name)
    REAPER.watch_path(path)
    try:
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        argv = [mke2fs, "-q", "-F", "-t", "ext4", "-m", "0", "-L", "capsa-rw"]
        argv += ["-E", "lazy_itable_init=1,lazy_journal_init=1", str(path)]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ImageBuildError(f"mke2fs failed on the writable disk: {done.stderr.strip()}")
    except BaseException:
        remove_scratch_disk(path)
        raise
    return path


def remove_scratch_disk(path: Path) -> None:
    path.unlink(missing_ok=True)
    REAPER.unwatch_path(path)
