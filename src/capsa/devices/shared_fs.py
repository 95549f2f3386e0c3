"""The host side of a shared folder: FUSE requests carried out beneath one directory.

Confinement does not rest on path checks. Every inode the guest knows is an ``O_PATH``
file descriptor opened one component at a time with ``O_NOFOLLOW`` relative to its
parent's descriptor, starting from the shared directory itself, and names from the guest
must be single components (never ``.``/``..``). So a symlink is only ever an object the
guest reads, never a path we follow; a symlink swapped in between check and use is opened
as the symlink; ``..`` is refused; and nothing outside the folder has a descriptor.
Operations on an inode go through ``/proc/self/fd/N``, which names exactly that inode.
Only regular files and directories are ever opened on the host (no host device, fifo or
socket, not even by a CREATE of a name that exists), the guest cannot create device nodes,
set-id bits from the guest are dropped, a set-id file loses its set-id bits when the guest
changes its contents or owner (we hold CAP_FSETID, so the kernel would keep them), and
``security.*``/``trusted.*``/``system.*`` extended attributes are out of reach.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from capsa.devices import fuse
from capsa.devices.fuse import Body, FuseError, Header, Op
from capsa.spec.shares import Ownership, OwnershipMode

log = logging.getLogger("capsa.virtio_fs")

TIMEOUT_S = 1  # how long the guest may cache names and attributes
MAX_IO = 1 << 20  # largest read or write the guest may ask for
MAX_XATTR = 64 * 1024
SETID_BITS = stat.S_ISUID | stat.S_ISGID
# Open flags the guest may pass through; everything else (O_CREAT, O_PATH, O_TMPFILE,
# O_NOATIME, O_DIRECT, O_NOCTTY...) is dropped or handled by us.
OPEN_FLAGS = (
    os.O_ACCMODE
    | os.O_APPEND
    | os.O_TRUNC
    | os.O_NONBLOCK
    | os.O_DSYNC
    | os.O_SYNC
    | os.O_DIRECTORY
)
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
# How often CREATE retries when the name it found vanishes before it can be opened.
CREATE_ATTEMPTS = 3
XATTR_NAMESPACE = b"user."
STATE_VERSION = 1
MAX_STATE_ENTRIES = 1 << 20  # inodes (or handles) a saved session may hold

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def _path_inside(root: bytes, fd: int) -> bytes | None:
    """Where the object behind ``fd`` is now, relative to ``root`` (None: deleted, or
    no longer inside the share)."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}".encode())
    except OSError:
        return None
    if target.endswith(b" (deleted)") or not target.startswith(root.rstrip(b"/") + b"/"):
        return None
    return target[len(root.rstrip(b"/")) + 1 :]


@dataclass(frozen=True)
class SavedSession:
    """A FUSE session as ``SharedFs.export_state`` wrote it, checked."""

    initialized: bool
    next_node: int
    next_fh: int
    inodes: list[tuple[int, bytes, int, int]]  # node id, path in the share, kind, lookups
    files: list[tuple[int, int, int]]  # handle, node id, open flags
    dirs: list[tuple[int, int]]  # handle, node id


def parse_session(data: bytes) -> SavedSession:
    """Check every field of a saved session (ValueError on anything off)."""
    state = json.loads(data)
    if not isinstance(state, dict) or state.get("v") != STATE_VERSION:
        raise ValueError("unknown state format")
    inodes = [
        (_node_id(n), _path(p), _number(k), _number(c)) for n, p, k, c in _rows(state, "inodes", 4)
    ]
    files = [(_handle(h), _node_id(n), _number(f)) for h, n, f in _rows(state, "files", 3)]
    dirs = [(_handle(h), _node_id(n)) for h, n in _rows(state, "dirs", 2)]
    handles = [h for h, *_ in files] + [h for h, _ in dirs]
    return SavedSession(
        initialized=state.get("initialized") is True,
        next_node=max([_number(state.get("next_node")), *(n + 1 for n, *_ in inodes)]),
        next_fh=max([_number(state.get("next_fh")), *(h + 1 for h in handles)]),
        inodes=inodes,
        files=files,
        dirs=dirs,
    )


def _rows(state: dict[str, object], key: str, width: int) -> list[list[object]]:
    rows = state.get(key)
    if not isinstance(rows, list) or len(rows) > MAX_STATE_ENTRIES:
        raise ValueError(f"bad {key} table")
    if not all(isinstance(row, list) and len(row) == width for row in rows):
        raise ValueError(f"bad {key} row")
    return rows


def _number(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63:
        return value
    raise ValueError(f"bad number {value!r}")


def _node_id(value: object) -> int:
    number = _number(value)
    if number <= fuse.ROOT_ID:
        raise ValueError(f"bad id {number}")
    return number


def _handle(value: object) -> int:
    number = _number(value)
    if number == 0:
        raise ValueError("bad handle 0")
    return number


def _path(value: object) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"bad path {value!r}")
    path = os.fsencode(value)
    if b"\0" in path or any(part in (b"", b".", b"..") for part in path.split(b"/")):
        raise ValueError(f"bad path {path!r}")
    return path


def setid_bits_to_drop(mode: int) -> int:
    """The set-id bits a change to a file of ``mode`` takes away, by the kernel's rules for
    a writer without CAP_FSETID: set-uid always, set-gid only with group-exec (without it
    the bit asks for mandatory locking and grants nothing). Only regular files."""
    if not stat.S_ISREG(mode):
        return 0
    drop = mode & stat.S_ISUID
    if mode & stat.S_ISGID and mode & stat.S_IXGRP:
        drop |= stat.S_ISGID
    return drop


def _check(ret: int) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass
class Inode:
    fd: int  # O_PATH
    key: tuple[int, int]  # (st_dev, st_ino) on the host
    kind: int  # S_IFMT bits
    nlookup: int = 0


@dataclass
class DirHandle:
    fd: int
    nodeid: int
    entries: list[tuple[bytes, int, int]] | None = None  # (name, ino, dirent type)


@dataclass
class Stats:
    requests: dict[str, int] = field(default_factory=dict)


class SharedFs:
    """FUSE operations on the directory ``root``; one instance per share."""

    def __init__(self, root: Path, read_only: bool, ownership: Ownership) -> None:
        self.read_only = read_only
        self.ownership = ownership
        # Owners that depend on who asks cannot be cached by the guest kernel.
        dynamic = ownership.mode is OwnershipMode.DYNAMIC_CALLER
        self.attr_timeout = 0 if dynamic else TIMEOUT_S
        self.proc_fd = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(root_fd)
        self.root = Inode(root_fd, (st.st_dev, st.st_ino), stat.S_IFDIR, nlookup=1)
        self.inodes: dict[int, Inode] = {fuse.ROOT_ID: self.root}
        self.by_key: dict[tuple[int, int], int] = {self.root.key: fuse.ROOT_ID}
        self.files: dict[int, int] = {}
        # What each open file is: (node id, open flags), to open it again after a restore.
        self.file_origin: dict[int, tuple[int, int]] = {}
        self.dirs: dict[int, DirHandle] = {}
        self._next_node = fuse.ROOT_ID + 1
        self._next_fh = 1
        self.initialized = False
        self.ops: dict[int, Callable[[Header, Body], bytes | None]] = {
            Op.INIT: self.init, Op.DESTROY: self.destroy, Op.LOOKUP: self.lookup,
            Op.FORGET: self.forget, Op.BATCH_FORGET: self.batch_forget,
            Op.GETATTR: self.getattr, Op.SETATTR: self.setattr, Op.READLINK: self.readlink,
            Op.SYMLINK: self.symlink, Op.MKNOD: self.mknod, Op.MKDIR: self.mkdir,
            Op.UNLINK: self.unlink, Op.RMDIR: self.rmdir, Op.RENAME: self.rename,
            Op.RENAME2: self.rename2, Op.LINK: self.link, Op.OPEN: self.open,
            Op.CREATE: self.create, Op.READ: self.read_small, Op.WRITE: self.write_small,
            Op.STATFS: self.statfs, Op.RELEASE: self.release, Op.FLUSH: self.flush,
            Op.FSYNC: self.fsync, Op.OPENDIR: self.opendir, Op.READDIR: self.readdir,
            Op.READDIRPLUS: self.readdirplus, Op.RELEASEDIR: self.releasedir,
            Op.FSYNCDIR: self.fsyncdir, Op.ACCESS: self.access, Op.SETXATTR: self.setxattr,
            Op.GETXATTR: self.getxattr, Op.LISTXATTR: self.listxattr,
            Op.REMOVEXATTR: self.removexattr, Op.FALLOCATE: self.fallocate,
            Op.LSEEK: self.lseek, Op.COPY_FILE_RANGE: self.copy_file_range,
            Op.SYNCFS: self.syncfs,
        }  # fmt: skip

    # -- dispatch ---------------------------------------------------------------------------

    def handle(self, data: bytes) -> bytes | None:
        """The reply to one request (None for the requests that get none)."""
        try:
            header = fuse.parse_header(data)
        except FuseError:
            return None  # without a trustworthy header there is nobody to answer
        return self.answer(header, data)

    def answer(self, header: Header, data: bytes) -> bytes | None:
        """The reply to a request whose header was already parsed from ``data``."""
        try:
            self.admit(header)
            payload = self.ops[header.opcode](header, Body(data))
        except (FuseError, OSError) as e:
            return self.error_reply(header, e)
        except Exception:  # a bug here must cost one request, not the share
            log.exception("FUSE opcode %d failed", header.opcode)
            return self.error_reply(header, FuseError(errno.EIO))
        if header.opcode in fuse.NO_REPLY_OPS:
            return None
        return fuse.pack_reply(header.unique, payload or b"")

    def admit(self, header: Header) -> None:
        """Refuse a request this share does not serve at all."""
        if header.opcode not in self.ops:
            raise FuseError(errno.ENOSYS)
        if not self.initialized and header.opcode != Op.INIT:
            raise FuseError(errno.EIO, "request before INIT")
        if self.read_only and header.opcode in fuse.WRITE_OPS:
            raise FuseError(errno.EROFS)

    @staticmethod
    def error_reply(header: Header, e: FuseError | OSError) -> bytes | None:
        if header.opcode in fuse.NO_REPLY_OPS:
            return None
        err = e.errno if isinstance(e, FuseError) else (e.errno or errno.EIO)
        return fuse.pack_reply(header.unique, error=err)

    def close(self) -> None:
        self.destroy(None, None)
        os.close(self.root.fd)
        os.close(self.proc_fd)

    # -- state across a snapshot -------------------------------------------------------------

    def export_state(self) -> bytes:
        """The session as data: every inode the guest holds by its path inside the share,
        every open file and directory by its inode. Inodes whose file was deleted or moved
        out of the share are left out: after a restore the guest gets ESTALE for them."""
        root = os.readlink(f"/proc/self/fd/{self.root.fd}".encode())
        inodes = []
        for nodeid, node in self.inodes.items():
            path = None if nodeid == fuse.ROOT_ID else _path_inside(root, node.fd)
            if path is not None:
                inodes.append([nodeid, os.fsdecode(path), node.kind, node.nlookup])
        state = {
            "v": STATE_VERSION,
            "initialized": self.initialized,
            "next_node": self._next_node,
            "next_fh": self._next_fh,
            "inodes": inodes,
            "files": [[fh, node, flags] for fh, (node, flags) in self.file_origin.items()],
            "dirs": [[fh, handle.nodeid] for fh, handle in self.dirs.items()],
        }
        return json.dumps(state).encode()

    def import_state(self, data: bytes) -> None:
        """Take over a session ``export_state`` saved, opening everything again beneath
        this share's root the way lookups do (one component at a time, no symlinks)."""
        saved = parse_session(data)
        self.destroy(None, None)
        for nodeid, path, kind, nlookup in saved.inodes:
            self._reopen_inode(nodeid, path, kind, nlookup)
        for fh, nodeid, flags in saved.files:
            self._reopen_handle(fh, nodeid, flags & OPEN_FLAGS & ~os.O_TRUNC, directory=False)
        for fh, nodeid in saved.dirs:
            self._reopen_handle(fh, nodeid, os.O_RDONLY | os.O_DIRECTORY, directory=True)
        self._next_node = max(saved.next_node, self._next_node)
        self._next_fh = max(saved.next_fh, self._next_fh)
        self.initialized = saved.initialized

    def _reopen_inode(self, nodeid: int, path: bytes, kind: int, nlookup: int) -> None:
        fd = os.dup(self.root.fd)
        try:
            for name in path.split(b"/"):
                child = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = child
            st = os.fstat(fd)
        except OSError as e:
            os.close(fd)
            log.info("inode %d (%r) is gone after the restore: %s", nodeid, path, e)
            return
        if stat.S_IFMT(st.st_mode) != kind:
            os.close(fd)
            log.info("inode %d (%r) changed type after the restore", nodeid, path)
            return
        key = (st.st_dev, st.st_ino)
        self.inodes[nodeid] = Inode(fd, key, kind, nlookup)
        self.by_key.setdefault(key, nodeid)

    def _reopen_handle(self, fh: int, nodeid: int, flags: int, directory: bool) -> None:
        node = self.inodes.get(nodeid)
        if node is None:
            return  # its inode is gone: the guest gets EBADF for the handle
        try:
            if self.read_only and (flags & os.O_ACCMODE) != os.O_RDONLY:
                raise OSError(errno.EROFS, "read-only share")
            fd = self._reopen(node, flags)
        except (OSError, FuseError) as e:
            log.info("open file %d could not be opened again: %s", fh, e)
            return
        if directory:
            self.dirs[fh] = DirHandle(fd, nodeid)
        else:
            self.files[fh] = fd
            self.file_origin[fh] = (nodeid, flags)

    # -- inodes -----------------------------------------------------------------------------

    def inode(self, nodeid: int) -> Inode:
        node = self.inodes.get(nodeid)
        if node is None:
            raise FuseError(errno.ESTALE, f"unknown node {nodeid}")
        return node

    def _dir(self, nodeid: int) -> Inode:
        node = self.inode(nodeid)
        if node.kind != stat.S_IFDIR:
            raise FuseError(errno.ENOTDIR)
        return node

    def _proc(self, node: Inode) -> str:
        return f"/proc/self/fd/{node.fd}"

    def _remember(self, fd: int, st: os.stat_result) -> int:
        """The node id for the object behind ``fd`` (kept or closed), one more lookup."""
        key = (st.st_dev, st.st_ino)
        nodeid = self.by_key.get(key)
        if nodeid is not None:
            os.close(fd)
        else:
            nodeid = self._next_node
            self._next_node += 1
            self.inodes[nodeid] = Inode(fd, key, stat.S_IFMT(st.st_mode))
            self.by_key[key] = nodeid
        self.inodes[nodeid].nlookup += 1
        return nodeid

    def _lookup_child(self, parent: Inode, name: bytes) -> tuple[int, os.stat_result]:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        return self._remember(fd, st), st

    def _forget(self, nodeid: int, count: int) -> None:
        node = self.inodes.get(nodeid)
        if node is None or nodeid == fuse.ROOT_ID:
            return
        node.nlookup -= min(count, node.nlookup)
        if node.nlookup == 0:
            del self.inodes[nodeid]
            self.by_key.pop(node.key, None)
            os.close(node.fd)

    # -- attributes -------------------------------------------------------------------------

    def _owner(self, st: os.stat_result, header: Header) -> tuple[int, int]:
        mode = self.ownership.mode
        if mode is OwnershipMode.PASSTHROUGH:
            return st.st_uid, st.st_gid
        if mode is OwnershipMode.DYNAMIC_CALLER:
            return header.uid, header.gid
        return self.ownership.uid, self.ownership.gid

    def _attr(self, st: os.stat_result, header: Header) -> bytes:
        uid, gid = self._owner(st, header)
        return fuse.pack_attr(st.st_ino, st, uid, gid)

    def _entry(self, nodeid: int, st: os.stat_result, header: Header) -> bytes:
        timeouts = (TIMEOUT_S, self.attr_timeout, 0, 0)
        return fuse.ENTRY_OUT.pack(nodeid, 0, *timeouts) + self._attr(st, header)

    def _attr_out(self, st: os.stat_result, header: Header) -> bytes:
        return fuse.ATTR_OUT.pack(self.attr_timeout, 0, 0) + self._attr(st, header)

    # -- operations -------------------------------------------------------------------------

    def init(self, header: Header, body: Body) -> bytes:
        major, minor, max_readahead, flags = body.take(fuse.INIT_IN)
        if major != fuse.MAJOR:
            raise FuseError(errno.EPROTO, f"FUSE major version {major}")
        wanted = (
            fuse.ASYNC_READ
            | fuse.ATOMIC_O_TRUNC
            | fuse.BIG_WRITES
            | fuse.AUTO_INVAL_DATA
            | fuse.DO_READDIRPLUS
            | fuse.READDIRPLUS_AUTO
            | fuse.PARALLEL_DIROPS
            | fuse.MAX_PAGES
            | fuse.CACHE_SYMLINKS
        )
        if self.initialized:
            self.destroy(None, None)  # a driver starting over (reset, reboot): so do we
        self.initialized = True
        return fuse.INIT_OUT.pack(
            fuse.MAJOR, min(minor, fuse.MINOR), max_readahead, flags & wanted,
            64, 48, MAX_IO, 1, MAX_IO // 4096, 0, 0,
        )  # fmt: skip

    def destroy(self, header: Header | None, body: Body | None) -> bytes:
        for fd in self.files.values():
            os.close(fd)
        for handle in self.dirs.values():
            os.close(handle.fd)
        self.files.clear()
        self.file_origin.clear()
        self.dirs.clear()
        for nodeid in [n for n in self.inodes if n != fuse.ROOT_ID]:
            os.close(self.inodes.pop(nodeid).fd)
        self.by_key = {self.root.key: fuse.ROOT_ID}
        self.initialized = False
        return b""

    def lookup(self, header: Header, body: Body) -> bytes:
        parent = self._dir(header.nodeid)
        nodeid, st = self._lookup_child(parent, body.name())
        return self._entry(nodeid, st, header)

    def forget(self, header: Header, body: Body) -> None:
        (count,) = body.take(fuse.FORGET_IN)
        self._forget(header.nodeid, count)

    def batch_forget(self, header: Header, body: Body) -> None:
        count, _ = body.take(fuse.BATCH_FORGET_IN)
        for _ in range(count):
            nodeid, n = body.take(fuse.FORGET_ONE)
            self._forget(nodeid, n)

    def getattr(self, header: Header, body: Body) -> bytes:
        flags, _, fh = body.take(fuse.GETATTR_IN)
        if flags & fuse.GETATTR_FH and fh in self.files:
            return self._attr_out(os.fstat(self.files[fh]), header)
        return self._attr_out(os.fstat(self.inode(header.nodeid).fd), header)

    def setattr(self, header: Header, body: Body) -> bytes:
        (valid, _, fh, size, _lock, atime, mtime, _ctime, atimens, mtimens, _ctimens, mode,
         _, uid, gid, _) = body.take(fuse.SETATTR_IN)  # fmt: skip
        node = self.inode(header.nodeid)
        path = self._proc(node)
        if valid & fuse.FATTR_MODE:
            if node.kind == stat.S_IFLNK:
                raise FuseError(errno.EOPNOTSUPP, "symlinks have no mode of their own")
            os.chmod(path, stat.S_IMODE(mode) & ~SETID_BITS)
        if valid & (fuse.FATTR_UID | fuse.FATTR_GID):
            # Even when the owner is squashed and nothing on the host changes hands: the
            # guest was told the chown happened, and a chown ends set-id.
            self._drop_setid(node.fd)
            self._chown(
                node, uid if valid & fuse.FATTR_UID else -1, gid if valid & fuse.FATTR_GID else -1
            )
        if valid & fuse.FATTR_SIZE:
            if node.kind != stat.S_IFREG:
                raise FuseError(errno.EINVAL, "only regular files have a size to set")
            if valid & fuse.FATTR_FH and fh in self.files:
                self._drop_setid(self.files[fh])
                os.ftruncate(self.files[fh], size)
            else:
                self._drop_setid(node.fd)
                os.truncate(path, size)
        if valid & (fuse.FATTR_ATIME | fuse.FATTR_MTIME) and node.kind != stat.S_IFLNK:
            # Python's utime has no UTIME_OMIT: an unchanged time is re-set to its value.
            now = time.time_ns()
            current = os.fstat(node.fd)
            a, m = current.st_atime_ns, current.st_mtime_ns
            if valid & fuse.FATTR_ATIME:
                a = now if valid & fuse.FATTR_ATIME_NOW else atime * 1_000_000_000 + atimens
            if valid & fuse.FATTR_MTIME:
                m = now if valid & fuse.FATTR_MTIME_NOW else mtime * 1_000_000_000 + mtimens
            os.utime(path, ns=(a, m))
        return self._attr_out(os.fstat(node.fd), header)

    def _chown(self, node: Inode, uid: int, gid: int) -> None:
        if self.ownership.mode is not OwnershipMode.PASSTHROUGH:
            return  # squashed or per-caller owners: nothing on the host to change
        os.chown(self._proc(node), uid, gid, follow_symlinks=node.kind != stat.S_IFLNK)

    def readlink(self, header: Header, body: Body) -> bytes:
        node = self.inode(header.nodeid)
        if node.kind != stat.S_IFLNK:
            raise FuseError(errno.EINVAL)
        return os.readlink(b"", dir_fd=node.fd)

    def symlink(self, header: Header, body: Body) -> bytes:
        name = body.name()
        target = body.cstring(fuse.PATH_MAX)
        parent = self._dir(header.nodeid)
        os.symlink(target, name, dir_fd=parent.fd)
        return self._new_entry(parent, name, header)

    def mknod(self, header: Header, body: Body) -> bytes:
        mode, _rdev, _umask, _ = body.take(fuse.MKNOD_IN)
        name = body.name()
        kind = stat.S_IFMT(mode)
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK):
            raise FuseError(errno.EPERM, "device nodes cannot be created in a share")
        parent = self._dir(header.nodeid)
        os.mknod(name, kind | (stat.S_IMODE(mode) & ~SETID_BITS), 0, dir_fd=parent.fd)
        return self._new_entry(parent, name, header)

    def mkdir(self, header: Header, body: Body) -> bytes:
        mode, _umask = body.take(fuse.MKDIR_IN)
        name = body.name()
        parent = self._dir(header.nodeid)
        os.mkdir(name, stat.S_IMODE(mode) & ~SETID_BITS, dir_fd=parent.fd)
        return self._new_entry(parent, name, header)

    def _new_entry(self, parent: Inode, name: bytes, header: Header) -> bytes:
        nodeid, st = self._lookup_child(parent, name)
        return self._entry(nodeid, st, header)

    def unlink(self, header: Header, body: Body) -> bytes:
        os.unlink(body.name(), dir_fd=self._dir(header.nodeid).fd)
        return b""

    def rmdir(self, header: Header, body: Body) -> bytes:
        os.rmdir(body.name(), dir_fd=self._dir(header.nodeid).fd)
        return b""

    def rename(self, header: Header, body: Body) -> bytes:
        (newdir,) = body.take(fuse.RENAME_IN)
        return self._rename(header, body, newdir, 0)

    def rename2(self, header: Header, body: Body) -> bytes:
        newdir, flags, _ = body.take(fuse.RENAME2_IN)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise FuseError(errno.EINVAL, f"rename flags {flags:#x}")
        return self._rename(header, body, newdir, flags)

    def _rename(self, header: Header, body: Body, newdir: int, flags: int) -> bytes:
        old, new = body.name(), body.name()
        src, dst = self._dir(header.nodeid), self._dir(newdir)
        if flags:
            _check(_libc.renameat2(src.fd, old, dst.fd, new, flags))
        else:
            os.rename(old, new, src_dir_fd=src.fd, dst_dir_fd=dst.fd)
        return b""

    def link(self, header: Header, body: Body) -> bytes:
        (oldnode,) = body.take(fuse.LINK_IN)
        name = body.name()
        target = self.inode(oldnode)
        if target.kind == stat.S_IFDIR:
            raise FuseError(errno.EPERM, "hard links to directories")
        parent = self._dir(header.nodeid)
        os.link(
            os.fsencode(str(target.fd)),
            name,
            src_dir_fd=self.proc_fd,
            dst_dir_fd=parent.fd,
            follow_symlinks=True,
        )
        return self._new_entry(parent, name, header)

    # -- files --------------------------------------------------------------------------------

    def _reopen(self, node: Inode, flags: int) -> int:
        """A real descriptor for an inode; only files and directories are ever opened."""
        if node.kind not in (stat.S_IFREG, stat.S_IFDIR):
            raise FuseError(errno.ENXIO, "only files and directories open on the host")
        return self._reopen_fd(node.fd, flags)

    def _reopen_fd(self, path_fd: int, flags: int) -> int:
        """The inode ``path_fd`` pins (never whatever its name means now), opened."""
        if flags & os.O_TRUNC:
            self._drop_setid(path_fd)
        return os.open(str(path_fd), flags | os.O_CLOEXEC, dir_fd=self.proc_fd)

    def _drop_setid(self, fd: int) -> None:
        """Before the file behind ``fd`` changes: take away the set-id bits the kernel
        would take from an unprivileged writer, on the host file itself (a guest must not
        leave a set-uid program with contents of its choosing on the host)."""
        mode = os.fstat(fd).st_mode
        drop = setid_bits_to_drop(mode)
        if drop:
            os.chmod(str(fd), stat.S_IMODE(mode) & ~drop, dir_fd=self.proc_fd)

    def _open_flags(self, flags: int) -> int:
        flags &= OPEN_FLAGS
        if self.read_only and ((flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC):
            raise FuseError(errno.EROFS)
        return flags

    def _add_file(self, fd: int, nodeid: int, flags: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.files[fh] = fd
        self.file_origin[fh] = (nodeid, flags)
        return fh

    def open(self, header: Header, body: Body) -> bytes:
        flags, _ = body.take(fuse.OPEN_IN)
        node = self.inode(header.nodeid)
        if node.kind == stat.S_IFDIR:
            raise FuseError(errno.EISDIR)
        flags = self._open_flags(flags)
        fd = self._reopen(node, flags)
        return fuse.OPEN_OUT.pack(self._add_file(fd, header.nodeid, flags), 0, 0)

    def create(self, header: Header, body: Body) -> bytes:
        flags, mode, _umask, _ = body.take(fuse.CREATE_IN)
        name = body.name()
        parent = self._dir(header.nodeid)
        open_flags = self._open_flags(flags)
        fd = self._create_or_open(
            parent,
            name,
            flags=open_flags,
            mode=stat.S_IMODE(mode) & ~SETID_BITS,
            exclusive=bool(flags & os.O_EXCL),
        )
        try:
            st = os.fstat(fd)
            path_fd = os.open(str(fd), os.O_PATH | os.O_CLOEXEC, dir_fd=self.proc_fd)
        except BaseException:
            os.close(fd)
            raise
        nodeid = self._remember(path_fd, st)
        fh = self._add_file(fd, nodeid, open_flags)
        return self._entry(nodeid, st, header) + fuse.OPEN_OUT.pack(fh, 0, 0)

    def _create_or_open(
        self, parent: Inode, name: bytes, flags: int, mode: int, exclusive: bool
    ) -> int:
        """``name`` made as a new regular file, or (unless ``exclusive``) the regular file
        already there, opened with ``flags``. Whatever else holds the name is refused
        without being opened: a fifo would block us for good, a device node placed on the
        host would hand that device to the guest, and even a non-blocking open runs a
        driver's open."""
        for _ in range(CREATE_ATTEMPTS):
            try:
                return os.open(
                    name,
                    flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    mode,
                    dir_fd=parent.fd,
                )
            except FileExistsError:
                if exclusive:
                    raise
            try:
                return self._open_existing(parent, name, flags)
            except FileNotFoundError:
                continue  # removed since it was found: make it after all
        raise FuseError(errno.ENOENT, f"{name!r} keeps appearing and vanishing")

    def _open_existing(self, parent: Inode, name: bytes, flags: int) -> int:
        """The regular file ``name`` opened through an ``O_PATH`` descriptor, which pins
        the inode whose type was checked."""
        path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        try:
            kind = stat.S_IFMT(os.fstat(path_fd).st_mode)
            if kind != stat.S_IFREG:
                raise FuseError(_NOT_A_FILE_ERRNO.get(kind, errno.ENXIO), f"{name!r} is no file")
            return self._reopen_fd(path_fd, flags)
        finally:
            os.close(path_fd)

    def file(self, fh: int) -> int:
        fd = self.files.get(fh)
        if fd is None:
            raise FuseError(errno.EBADF, f"unknown file handle {fh}")
        return fd

    def read_request(self, body: Body) -> tuple[int, int, int]:
        """(fd, offset, size) of a READ, checked."""
        fh, offset, size, *_ = body.take(fuse.READ_IN)
        if size > MAX_IO:
            raise FuseError(errno.EINVAL, f"read of {size} bytes")
        return self.file(fh), offset, size

    def write_request(self, body: Body) -> tuple[int, int, int]:
        """(fd, offset, size) of a WRITE, checked; the data follows in the request."""
        fh, offset, size, *_ = body.take(fuse.WRITE_IN)
        if size > MAX_IO:
            raise FuseError(errno.EINVAL, f"write of {size} bytes")
        fd = self.file(fh)
        self._drop_setid(fd)
        return fd, offset, size

    def read_small(self, header: Header, body: Body) -> bytes:
        fd, offset, size = self.read_request(body)
        return os.pread(fd, size, offset)

    def write_small(self, header: Header, body: Body) -> bytes:
        fd, offset, size = self.write_request(body)
        data = body.rest()
        if len(data) != size:
            raise FuseError(errno.EINVAL, "write data does not match its size")
        return fuse.WRITE_OUT.pack(os.pwrite(fd, data, offset), 0)

    def release(self, header: Header, body: Body) -> bytes:
        fh, *_ = body.take(fuse.RELEASE_IN)
        fd = self.files.pop(fh, None)
        self.file_origin.pop(fh, None)
        if fd is not None:
            os.close(fd)
        return b""

    def flush(self, header: Header, body: Body) -> bytes:
        # Nothing to do at close(2) time: data is written through at once and the guest
        # kernel keeps POSIX locks itself. ENOSYS makes it stop sending FLUSH at all,
        # which saves a round trip on every close.
        raise FuseError(errno.ENOSYS)

    def fsync_request(self, body: Body) -> tuple[int, bool]:
        """(fd, data only) of an FSYNC."""
        fh, flags, _ = body.take(fuse.FSYNC_IN)
        return self.file(fh), bool(flags & fuse.FSYNC_FDATASYNC)

    def fsync(self, header: Header, body: Body) -> bytes:
        fd, datasync = self.fsync_request(body)
        os.fdatasync(fd) if datasync else os.fsync(fd)
        return b""

    def fallocate(self, header: Header, body: Body) -> bytes:
        fh, offset, length, mode, _ = body.take(fuse.FALLOCATE_IN)
        fd = self.file(fh)
        self._drop_setid(fd)
        _check(_libc.fallocate(fd, mode, offset, length))
        return b""

    def lseek(self, header: Header, body: Body) -> bytes:
        fh, offset, whence, _ = body.take(fuse.LSEEK_IN)
        if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE):
            raise FuseError(errno.EINVAL)
        return fuse.LSEEK_OUT.pack(os.lseek(self.file(fh), offset, whence))

    def copy_file_range(self, header: Header, body: Body) -> bytes:
        fh_in, off_in, _node_out, fh_out, off_out, length, flags = body.take(
            fuse.COPY_FILE_RANGE_IN
        )
        if flags:
            raise FuseError(errno.EINVAL)
        count = min(length, 1 << 30)
        fd_in, fd_out = self.file(fh_in), self.file(fh_out)
        self._drop_setid(fd_out)
        done = os.copy_file_range(fd_in, fd_out, count, off_in, off_out)
        return fuse.WRITE_OUT.pack(done, 0)

    def statfs(self, header: Header, body: Body) -> bytes:
        st = os.statvfs(self.inode(header.nodeid).fd)
        counts = (st.f_blocks, st.f_bfree, st.f_bavail, st.f_files, st.f_ffree)
        return fuse.STATFS_OUT.pack(*counts, st.f_bsize, st.f_namemax, st.f_frsize, 0)

    def access(self, header: Header, body: Body) -> bytes:
        mask, _ = body.take(fuse.ACCESS_IN)
        self.inode(header.nodeid)
        if self.read_only and mask & os.W_OK:
            raise FuseError(errno.EROFS)
        return b""  # permissions are checked by the guest kernel (default_permissions)

    def syncfs(self, header: Header, body: Body) -> bytes:
        return b""

    # -- directories ------------------------------------------------------------------------

    def opendir(self, header: Header, body: Body) -> bytes:
        node = self._dir(header.nodeid)
        fd = self._reopen(node, os.O_RDONLY | os.O_DIRECTORY)
        fh = self._next_fh
        self._next_fh += 1
        self.dirs[fh] = DirHandle(fd, header.nodeid)
        return fuse.OPEN_OUT.pack(fh, 0, 0)

    def _listing(self, fh: int, offset: int) -> list[tuple[bytes, int, int]]:
        handle = self.dirs.get(fh)
        if handle is None:
            raise FuseError(errno.EBADF, f"unknown directory handle {fh}")
        if handle.entries is None or offset == 0:
            here = os.fstat(handle.fd).st_ino
            entries = [(b".", here, fuse.DT_DIR), (b"..", here, fuse.DT_DIR)]
            with os.scandir(handle.fd) as it:
                for e in it:
                    entries.append((os.fsencode(e.name), e.inode(), _entry_type(e)))
            handle.entries = entries
        return handle.entries

    def readdir(self, header: Header, body: Body) -> bytes:
        fh, offset, size, *_ = body.take(fuse.READ_IN)
        entries = self._listing(fh, offset)
        out = bytearray()
        for index in range(offset, len(entries)):
            name, ino, kind = entries[index]
            if len(out) + fuse.dirent_size(name) > size:
                break
            out += fuse.pack_dirent(ino, index + 1, name, kind)
        return bytes(out)

    def readdirplus(self, header: Header, body: Body) -> bytes:
        fh, offset, size, *_ = body.take(fuse.READ_IN)
        entries = self._listing(fh, offset)
        parent = self._dir(header.nodeid)
        out = bytearray()
        entry_size = fuse.ENTRY_OUT.size + fuse.ATTR.size
        for index in range(offset, len(entries)):
            name, ino, kind = entries[index]
            if len(out) + entry_size + fuse.dirent_size(name) > size:
                break
            entry = b"\0" * entry_size  # '.', '..' and vanished names: no lookup counted
            if name not in (b".", b".."):
                try:
                    nodeid, st = self._lookup_child(parent, name)
                except OSError:
                    pass
                else:
                    entry, ino = self._entry(nodeid, st, header), st.st_ino
                    kind = fuse.dirent_type(st.st_mode)
            out += entry + fuse.pack_dirent(ino, index + 1, name, kind)
        return bytes(out)

    def releasedir(self, header: Header, body: Body) -> bytes:
        fh, *_ = body.take(fuse.RELEASE_IN)
        handle = self.dirs.pop(fh, None)
        if handle is not None:
            os.close(handle.fd)
        return b""

    def fsyncdir(self, header: Header, body: Body) -> bytes:
        fh, _, _ = body.take(fuse.FSYNC_IN)
        handle = self.dirs.get(fh)
        if handle is None:
            raise FuseError(errno.EBADF)
        os.fsync(handle.fd)
        return b""

    # -- extended attributes ----------------------------------------------------------------

    def _xattr_target(self, header: Header) -> str:
        node = self.inode(header.nodeid)
        if node.kind not in (stat.S_IFREG, stat.S_IFDIR):
            raise FuseError(errno.EOPNOTSUPP)  # user.* is only for files and directories
        return self._proc(node)

    @staticmethod
    def _user_name(name: bytes, denied: int) -> bytes:
        if not name.startswith(XATTR_NAMESPACE) or len(name) == len(XATTR_NAMESPACE):
            raise FuseError(denied, f"xattr {name!r} is outside the user namespace")
        return name

    def setxattr(self, header: Header, body: Body) -> bytes:
        size, flags = body.take(fuse.SETXATTR_IN)
        name = self._user_name(body.cstring(fuse.NAME_MAX), errno.EPERM)
        value = body.rest()
        if size > MAX_XATTR or len(value) != size:
            raise FuseError(errno.E2BIG if size > MAX_XATTR else errno.EINVAL)
        os.setxattr(self._xattr_target(header), name, value, flags)
        return b""

    def getxattr(self, header: Header, body: Body) -> bytes:
        size, _ = body.take(fuse.GETXATTR_IN)
        name = self._user_name(body.cstring(fuse.NAME_MAX), errno.ENODATA)
        value = os.getxattr(self._xattr_target(header), name)
        return self._sized(value, size)

    def listxattr(self, header: Header, body: Body) -> bytes:
        size, _ = body.take(fuse.GETXATTR_IN)
        node = self.inode(header.nodeid)
        names: list[str] = []
        if node.kind in (stat.S_IFREG, stat.S_IFDIR):
            names = [n for n in os.listxattr(self._proc(node)) if n.startswith("user.")]
        return self._sized(b"".join(os.fsencode(n) + b"\0" for n in names), size)

    def removexattr(self, header: Header, body: Body) -> bytes:
        name = self._user_name(body.cstring(fuse.NAME_MAX), errno.EPERM)
        os.removexattr(self._xattr_target(header), name)
        return b""

    @staticmethod
    def _sized(value: bytes, size: int) -> bytes:
        if size == 0:
            return fuse.XATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise FuseError(errno.ERANGE)
        return value


# What CREATE answers when the name it would open is not a regular file (O_NOFOLLOW's ELOOP
# for a symlink, as before); fifos, sockets and device nodes get ENXIO, as OPEN gives them.
_NOT_A_FILE_ERRNO = {stat.S_IFDIR: errno.EISDIR, stat.S_IFLNK: errno.ELOOP}


def _entry_type(entry: os.DirEntry[str]) -> int:
    """A directory entry's ``DT_*`` type, without following symlinks."""
    if entry.is_symlink():
        return fuse.DT_LNK
    if entry.is_dir(follow_symlinks=False):
        return fuse.DT_DIR
    if entry.is_file(follow_symlinks=False):
        return fuse.DT_REG
    return fuse.DT_UNKNOWN
