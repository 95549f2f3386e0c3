"""The FUSE wire format (linux/fuse.h, protocol 7.31) as the virtio-fs server needs it.

Requests come from the guest kernel and are hostile input: :func:`parse_header` and
:meth:`Body.take` check every length against the bytes actually received, and names must
be one path component. Replies are built with the ``pack_*`` helpers.
"""

from __future__ import annotations

import enum
import errno
import os
import stat
import struct
from dataclasses import dataclass

MAJOR = 7
MINOR = 31
ROOT_ID = 1
NAME_MAX = 255
PATH_MAX = 4096


class Op(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SYNCFS = 50


# Requests that change the file system: refused with EROFS on a read-only share.
WRITE_OPS = frozenset({Op.SETATTR, Op.SYMLINK, Op.MKNOD, Op.MKDIR, Op.UNLINK, Op.RMDIR,
                       Op.RENAME, Op.RENAME2, Op.LINK, Op.WRITE, Op.CREATE, Op.SETXATTR,
                       Op.REMOVEXATTR, Op.FALLOCATE, Op.COPY_FILE_RANGE})  # fmt: skip
# Requests the kernel sends without waiting for (and expecting) a reply.
NO_REPLY_OPS = frozenset({Op.FORGET, Op.BATCH_FORGET})

# INIT flags
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23

# SETATTR valid bits
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8

FSYNC_FDATASYNC = 1
GETATTR_FH = 1

IN_HEADER = struct.Struct("<IIQQIIIHH")
OUT_HEADER = struct.Struct("<IiQ")
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ENTRY_OUT = struct.Struct("<QQQQII")  # followed by ATTR
ATTR_OUT = struct.Struct("<QII")  # followed by ATTR
OPEN_OUT = struct.Struct("<QII")
WRITE_OUT = struct.Struct("<II")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
XATTR_OUT = struct.Struct("<II")
LSEEK_OUT = struct.Struct("<Q")
DIRENT = struct.Struct("<QQII")
INIT_IN = struct.Struct("<IIII")
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")

# Request bodies by operation (the fixed part; names and data follow).
GETATTR_IN = struct.Struct("<IIQ")
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
MKNOD_IN = struct.Struct("<IIII")
MKDIR_IN = struct.Struct("<II")
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QII")
LINK_IN = struct.Struct("<Q")
OPEN_IN = struct.Struct("<II")
CREATE_IN = struct.Struct("<IIII")
RELEASE_IN = struct.Struct("<QIIQ")
FLUSH_IN = struct.Struct("<QIIQ")
READ_IN = struct.Struct("<QQIIQII")
WRITE_IN = struct.Struct("<QQIIQII")
FSYNC_IN = struct.Struct("<QII")
SETXATTR_IN = struct.Struct("<II")
GETXATTR_IN = struct.Struct("<II")
ACCESS_IN = struct.Struct("<II")
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
FALLOCATE_IN = struct.Struct("<QQQII")
LSEEK_IN = struct.Struct("<QQII")
COPY_FILE_RANGE_IN = struct.Struct("<QQQQQQQ")

DT_UNKNOWN, DT_DIR, DT_REG, DT_LNK = 0, 4, 8, 10


class FuseError(Exception):
    """A request fails with ``errno``; the guest sees ``-errno`` in the reply header."""

    def __init__(self, err: int, why: str = "") -> None:
        super().__init__(why or errno.errorcode.get(err, str(err)))
        self.errno = err


@dataclass(frozen=True)
class Header:
    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int


def parse_header(data: bytes, total: int | None = None) -> Header:
    """The request header; ``total`` is the request's full size when ``data`` is its start."""
    if len(data) < IN_HEADER.size:
        raise FuseError(errno.EINVAL, "request shorter than its header")
    length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = IN_HEADER.unpack_from(data)
    carried = len(data) if total is None else total
    if length != carried or extlen:
        raise FuseError(errno.EINVAL, f"request claims {length} bytes, carries {carried}")
    return Header(length, opcode, unique, nodeid, uid, gid, pid)


class Body:
    """The bytes after the header, consumed front to back with bounds checks."""

    def __init__(self, data: bytes | memoryview, offset: int = IN_HEADER.size) -> None:
        self.data = memoryview(data)
        self.pos = offset

    def take(self, fmt: struct.Struct) -> tuple[int, ...]:
        if self.pos + fmt.size > len(self.data):
            raise FuseError(errno.EINVAL, "request body too short")
        values = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        return values

    def name(self) -> bytes:
        """One NUL-terminated path component, never '.', '..' or containing '/'."""
        raw = self.cstring(NAME_MAX)
        if not raw or raw in (b".", b".."):
            raise FuseError(errno.EPERM, f"name {raw!r} is not allowed")
        if b"/" in raw:
            raise FuseError(errno.EINVAL, "a name with '/'")
        return raw

    def cstring(self, limit: int) -> bytes:
        end = bytes(self.data[self.pos : self.pos + limit + 1]).find(b"\0")
        if end < 0:
            raise FuseError(errno.ENAMETOOLONG, "string without NUL within its limit")
        value = bytes(self.data[self.pos : self.pos + end])
        self.pos += end + 1
        return value

    def rest(self) -> bytes:
        value = bytes(self.data[self.pos :])
        self.pos = len(self.data)
        return value


def pack_attr(st_ino: int, st: os.stat_result, uid: int, gid: int) -> bytes:
    return ATTR.pack(
        st_ino, st.st_size, st.st_blocks,
        _sec(st.st_atime_ns), _sec(st.st_mtime_ns), _sec(st.st_ctime_ns),
        _nsec(st.st_atime_ns), _nsec(st.st_mtime_ns), _nsec(st.st_ctime_ns),
        st.st_mode, min(st.st_nlink, 0xFFFFFFFF), uid, gid, encode_dev(st.st_rdev),
        st.st_blksize, 0,
    )  # fmt: skip


def _sec(ns: int) -> int:
    return max(ns, 0) // 1_000_000_000


def _nsec(ns: int) -> int:
    return max(ns, 0) % 1_000_000_000


def encode_dev(dev: int) -> int:
    """The kernel's ``new_encode_dev``: a 32-bit device number for fuse_attr.rdev."""
    major, minor = os.major(dev), os.minor(dev)
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def dirent_type(mode: int) -> int:
    return stat.S_IFMT(mode) >> 12


def pack_dirent(ino: int, offset: int, name: bytes, kind: int) -> bytes:
    raw = DIRENT.pack(ino, offset, len(name), kind) + name
    return raw + b"\0" * (-len(raw) % 8)


def dirent_size(name: bytes) -> int:
    return (DIRENT.size + len(name) + 7) & ~7


def pack_reply(unique: int, payload: bytes = b"", error: int = 0) -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), -error, unique) + payload
