"""File events for the host: inotify on a path (and, recursively, every directory below
it, including ones created later), sent as ``data`` frames on the watch's request."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import struct
import threading

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_Q_OVERFLOW, IN_IGNORED = 0x400, 0x800, 0x4000, 0x8000
IN_ISDIR, IN_NONBLOCK, IN_CLOEXEC = 0x40000000, 0x800, 0x80000
MASK = IN_MODIFY | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF
MAX_WATCHES = 8192  # directories one watch follows
_EVENT = struct.Struct("iIII")

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


class Watcher:
    def __init__(self, ch: Any, rid: int, path: str, recursive: bool, strip: str = "") -> None:
        self.ch, self.rid, self.recursive, self.strip = ch, rid, recursive, strip
        self.fd = _check(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
        self.wake_r, self.wake_w = os.pipe()
        self.dirs: dict[int, str] = {}
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.closed = False
        self.moves: dict[int, str] = {}  # cookie -> path moved away, awaiting its pair
        if not os.path.isdir(path):
            self.close()
            raise OSError(errno.ENOTDIR, "watch needs a directory", path)
        self._add_tree(path)

    @property
    def count(self) -> int:
        return len(self.dirs)

    def _add(self, path: str) -> None:
        if len(self.dirs) >= MAX_WATCHES:
            self._send("overflow", path, is_dir=True)
            return
        try:
            wd = _check(_libc.inotify_add_watch(self.fd, os.fsencode(path), MASK))
        except OSError:
            return  # gone already, or not a directory we may watch
        self.dirs[wd] = path

    def _add_tree(self, path: str) -> None:
        self._add(path)
        if not self.recursive:
            return
        for parent, subdirs, _ in os.walk(path):
            for name in subdirs:
                self._add(os.path.join(parent, name))

    def _report_existing(self, path: str) -> None:
        """What appeared in a new directory before its watch was added: created."""
        for parent, subdirs, files in os.walk(path):
            for name in subdirs:
                self._send("create", os.path.join(parent, name), is_dir=True)
            for name in files:
                self._send("create", os.path.join(parent, name), is_dir=False)

    def _guest_path(self, path: str) -> str:
        if self.strip and path.startswith(self.strip):
            return path[len(self.strip) :] or "/"
        return path

    def _send(self, kind: str, path: str, *, is_dir: bool, dest: str | None = None) -> None:
        header = {"t": "data", "id": self.rid, "ev": kind, "path": self._guest_path(path)}
        header["dir"] = is_dir
        if dest is not None:
            header["dest"] = self._guest_path(dest)
        self.ch.send(header)

    def run(self) -> None:
        try:
            while not self.stopped.is_set():
                # A move's two halves may come in separate reads: wait briefly for the
                # second before calling the first a departure from the tree.
                timeout = 0.2 if self.moves else None
                ready, _, _ = select.select([self.fd, self.wake_r], [], [], timeout)
                if self.fd in ready:
                    self._read()
                elif self.moves:
                    self._flush_moves()
        finally:
            self.close()

    def _read(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, cookie, length = _EVENT.unpack_from(data, offset)
            raw = data[offset + _EVENT.size : offset + _EVENT.size + length]
            offset += _EVENT.size + length
            self._event(wd, mask, cookie, os.fsdecode(raw.rstrip(b"\0")))

    def _event(self, wd: int, mask: int, cookie: int, name: str) -> None:
        if mask & IN_Q_OVERFLOW:
            self._send("overflow", "/", is_dir=True)
            return
        base = self.dirs.get(wd)
        if base is None:
            return
        if mask & IN_IGNORED:
            self.dirs.pop(wd, None)
            return
        path = os.path.join(base, name) if name else base
        is_dir = bool(mask & IN_ISDIR)
        if mask & IN_CREATE:
            self._send("create", path, is_dir=is_dir)
            if is_dir and self.recursive:
                self._add_tree(path)
                self._report_existing(path)
        elif mask & IN_MODIFY:
            self._send("modify", path, is_dir=is_dir)
        elif mask & IN_DELETE:
            self._send("delete", path, is_dir=is_dir)
        elif mask & IN_MOVED_FROM:
            self.moves[cookie] = path
        elif mask & IN_MOVED_TO:
            source = self.moves.pop(cookie, None)
            if source is None:
                self._send("create", path, is_dir=is_dir)  # moved in from outside
            else:
                self._send("move", source, is_dir=is_dir, dest=path)
            if is_dir and self.recursive:
                self._add_tree(path)

    def _flush_moves(self) -> None:
        # A move whose other half never came left the watched tree.
        for source in self.moves.values():
            self._send("delete", source, is_dir=False)
        self.moves.clear()

    def stop(self) -> None:
        self.stopped.set()
        with self.lock:
            if not self.closed:
                with contextlib.suppress(OSError):
                    os.write(self.wake_w, b"x")

    def close(self) -> None:
        with self.lock:  # once: a descriptor number closed twice may be someone else's
            if self.closed:
                return
            self.closed = True
            for fd in (self.fd, self.wake_r, self.wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
