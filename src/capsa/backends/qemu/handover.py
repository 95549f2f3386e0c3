"""What QEMU is handed instead of opening it: open files and connected sockets.

QEMU runs as an identity of its own, under a seccomp filter (see
:mod:`capsa._util.privileges`), so it should need no access to the user's files or to
capsa's run directories. Everything it uses is opened here, by capsa, and passed as an
inherited descriptor:

- the kernel and initrd as ``/dev/fd/N`` (QEMU reopens them: only the file's own mode is
  checked, not the directories above it);
- disk images, their backing chains and UEFI flash as fd sets (``-add-fd``,
  ``/dev/fdset/N``), one descriptor per access mode QEMU may ask for;
- vhost-user back ends and the network port as sockets already connected.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from capsa.errors import InvalidConfig, StartFailed
from capsa.spec.vm import DiskImage, ImageFormat

FD_PATH = "/dev/fd"


@dataclass(frozen=True)
class Drive:
    """How the command line names one disk image and the images below it."""

    file: str
    # (file, format) of each backing image, top first.
    backing: tuple[tuple[str, str], ...] = ()


@dataclass
class Handover:
    """Descriptors for one QEMU process; closed here once QEMU holds its own copies."""

    fds: list[int] = field(default_factory=list)
    add_fds: list[tuple[int, int]] = field(default_factory=list)
    _sockets: list[socket.socket] = field(default_factory=list)
    _next_set: int = 1

    def _keep(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def file(self, path: Path) -> str:
        """``path`` opened for reading, as a name QEMU can open."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise InvalidConfig(f"cannot open {path}: {e.strerror}") from e
        return f"{FD_PATH}/{self._keep(fd)}"

    def file_fd(self, path: Path, writable: bool) -> int:
        """``path`` opened for QEMU to map or stream (the descriptor itself)."""
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        return self._keep(os.open(path, flags))

    def fdset(self, path: Path, writable: bool) -> str:
        """An fd set for ``path``: a read-only descriptor, and a read-write one when
        ``writable`` (QEMU's block layer opens images read-only first)."""
        number = self._next_set
        self._next_set += 1
        modes = [os.O_RDONLY, os.O_RDWR] if writable else [os.O_RDONLY]
        for mode in modes:
            try:
                fd = os.open(path, mode | os.O_CLOEXEC)
            except OSError as e:
                access = "writing" if mode == os.O_RDWR else "reading"
                raise InvalidConfig(f"cannot open {path} for {access}: {e.strerror}") from e
            self.add_fds.append((self._keep(fd), number))
        return f"/dev/fdset/{number}"

    def drive(self, disk: DiskImage) -> Drive:
        """A disk image and its backing chain, every file handed over."""
        top = self.fdset(disk.path, writable=not disk.is_read_only)
        backing = tuple(
            (self.fdset(path, writable=False), fmt) for path, fmt in backing_chain(disk)
        )
        return Drive(file=top, backing=backing)

    def connected(self, path: Path) -> int:
        """A stream socket connected to the Unix socket ``path`` (a back end listening)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
        except OSError as e:
            sock.close()
            raise StartFailed(f"cannot connect to {path}: {e.strerror}") from e
        self._sockets.append(sock)
        return self._keep(sock.fileno())

    def datagram(self, local: Path, remote: Path) -> int:
        """A datagram socket bound to ``local`` and connected to ``remote``; ``local`` is
        given to whoever owns its folder (the switch, which must be able to send to it)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(str(local))
            folder = os.stat(local.parent)
            os.chown(local, folder.st_uid, folder.st_gid)
            os.chmod(local, 0o600)
            # Room for bursts of 64 KiB frames, as the switch's side has.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            sock.connect(str(remote))
        except OSError as e:
            sock.close()
            raise StartFailed(f"cannot reach the network port {remote}: {e.strerror}") from e
        self._sockets.append(sock)
        return self._keep(sock.fileno())

    def close(self) -> None:
        """Our copies: QEMU has its own once it started (or never will)."""
        for sock in self._sockets:
            sock.close()
        closed = {s.fileno() for s in self._sockets}
        for fd in self.fds:
            if fd not in closed and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._sockets.clear()
        self.fds.clear()


def backing_chain(disk: DiskImage) -> list[tuple[Path, str]]:
    """The images below a qcow2 disk, top first (``qemu-img info --backing-chain``)."""
    if disk.format is not ImageFormat.QCOW2:
        return []
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise InvalidConfig(
            f"{disk.path} is qcow2: its backing chain is read with qemu-img "
            "(`sudo apt-get install qemu-utils`)"
        )
    proc = subprocess.run(
        [qemu_img, "info", "--backing-chain", "--output=json", "-U", str(disk.path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise InvalidConfig(f"cannot read {disk.path}: {proc.stderr.strip()}")
    try:
        chain = json.loads(proc.stdout)
        # Each image names the next one down; the name is resolved against its own folder.
        return [
            (Path(upper["full-backing-filename"]), str(lower["format"]))
            for upper, lower in itertools.pairwise(chain)
        ]
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidConfig(f"unexpected qemu-img output for {disk.path}: {e!r}") from e
