"""A writer for the Linux initramfs format: cpio "newc", uncompressed and deterministic.

Uncompressed because under emulation the kernel's decompressor costs more than QEMU's
copy of a few extra megabytes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"
_CHUNK = 1 << 20


class CpioWriter:
    """Append entries in any order; parent directories must be added by the caller."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 1
        self._names: set[str] = set()

    def _header(self, name: str, mode: int, size: int, nlink: int, rdev: tuple[int, int]) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(encoded), 0,
        )  # fmt: skip
        self._ino += 1
        self._out.write(_MAGIC + b"".join(b"%08X" % f for f in fields) + encoded)
        self._pad(110 + len(encoded))

    def _pad(self, written: int) -> None:
        self._out.write(b"\0" * (-written % 4))

    def _claim(self, name: str) -> str:
        name = name.lstrip("/")
        if not name or name in self._names:
            raise ValueError(f"bad or duplicate initramfs entry: {name!r}")
        self._names.add(name)
        return name

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._header(self._claim(name), stat.S_IFDIR | mode, 0, 2, (0, 0))

    def file_bytes(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._header(self._claim(name), stat.S_IFREG | mode, len(data), 1, (0, 0))
        self._out.write(data)
        self._pad(len(data))

    def file_from(self, name: str, source: Path, mode: int | None = None) -> None:
        st = source.stat()
        perm = stat.S_IMODE(st.st_mode) if mode is None else mode
        self._header(self._claim(name), stat.S_IFREG | perm, st.st_size, 1, (0, 0))
        with open(source, "rb") as f:
            while chunk := f.read(_CHUNK):
                self._out.write(chunk)
        self._pad(st.st_size)

    def symlink(self, name: str, target: str) -> None:
        data = target.encode()
        self._header(self._claim(name), stat.S_IFLNK | 0o777, len(data), 1, (0, 0))
        self._out.write(data)
        self._pad(len(data))

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._header(self._claim(name), stat.S_IFCHR | mode, 0, 1, (major, minor))

    def tree(self, root: Path, prefix: str = "") -> None:
        """Add everything under ``root`` (sorted, so the archive is reproducible)."""
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(root)
            for name in sorted(dirnames) + sorted(filenames):
                path = Path(dirpath) / name
                dest = f"{prefix}/{rel_dir / name}".lstrip("/").replace("/./", "/")
                dest = dest.removeprefix("./")
                if path.is_symlink():
                    self.symlink(dest, os.readlink(path))
                elif path.is_dir():
                    self.directory(dest, stat.S_IMODE(path.stat().st_mode))
                else:
                    self.file_from(dest, path)

    def close(self) -> None:
        self._header(_TRAILER, 0, 0, 1, (0, 0))
        self._out.flush()
