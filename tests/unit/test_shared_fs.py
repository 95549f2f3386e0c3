"""The virtio-fs server without a VM: FUSE requests against a temporary folder.

Everything the guest could send is hostile; these tests check confinement (no way out of
the folder), read-only enforcement, ownership reporting, and that malformed requests
only ever produce error replies.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capsa.config import Ownership
from capsa.devices import fuse
from capsa.devices.fuse import Op
from capsa.devices.guest_memory import memfd_memory
from capsa.devices.shared_fs import SharedFs
from capsa.devices.virtio_fs import VirtioFsDevice
from capsa.devices.virtqueue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VirtQueue

ROOT = fuse.ROOT_ID


class Client:
    """The guest kernel's side of FUSE, reduced to what the tests need."""

    def __init__(self, fs: SharedFs, uid: int = 1000, gid: int = 1000) -> None:
        self.fs, self.uid, self.gid = fs, uid, gid
        self.unique = 0
        assert (
            self.call(Op.INIT, 0, fuse.INIT_IN.pack(7, 38, 1 << 20, 0xFFFFFFFF) + bytes(48))[0] == 0
        )

    def call(self, op: int, node: int, body: bytes = b"") -> tuple[int, bytes]:
        """(errno, reply payload)."""
        self.unique += 1
        header = fuse.IN_HEADER.pack(
            40 + len(body), op, self.unique, node, self.uid, self.gid, 1, 0, 0
        )
        reply = self.fs.handle(header + body)
        assert reply is not None
        length, error, unique = fuse.OUT_HEADER.unpack_from(reply)
        assert length == len(reply) and unique == self.unique
        return -error, reply[16:]

    def ok(self, op: int, node: int, body: bytes = b"") -> bytes:
        err, out = self.call(op, node, body)
        assert err == 0, os.strerror(err)
        return out

    def lookup(self, parent: int, name: bytes) -> tuple[int, int]:
        """(errno, node id)."""
        err, out = self.call(Op.LOOKUP, parent, name + b"\0")
        return err, (struct.unpack_from("<Q", out)[0] if err == 0 else 0)

    def attr(self, node: int) -> tuple[int, ...]:
        out = self.ok(Op.GETATTR, node, fuse.GETATTR_IN.pack(0, 0, 0))
        return fuse.ATTR.unpack_from(out, fuse.ATTR_OUT.size)

    def create(
        self, parent: int, name: bytes, mode: int = 0o644, flags: int = os.O_RDWR
    ) -> tuple[int, int]:
        out = self.ok(
            Op.CREATE, parent, fuse.CREATE_IN.pack(flags, stat.S_IFREG | mode, 0, 0) + name + b"\0"
        )
        node = struct.unpack_from("<Q", out)[0]
        fh = struct.unpack_from("<Q", out, fuse.ENTRY_OUT.size + fuse.ATTR.size)[0]
        return node, fh

    def open(self, node: int, flags: int = os.O_RDONLY) -> tuple[int, int]:
        err, out = self.call(Op.OPEN, node, fuse.OPEN_IN.pack(flags, 0))
        return err, (struct.unpack_from("<Q", out)[0] if err == 0 else 0)

    def write(self, fh: int, data: bytes, offset: int = 0) -> int:
        body = fuse.WRITE_IN.pack(fh, offset, len(data), 0, 0, 0, 0) + data
        return int(fuse.WRITE_OUT.unpack(self.ok(Op.WRITE, 0, body))[0])

    def read(self, fh: int, size: int, offset: int = 0) -> bytes:
        return self.ok(Op.READ, 0, fuse.READ_IN.pack(fh, offset, size, 0, 0, 0, 0))

    def symlink(self, parent: int, name: bytes, target: bytes) -> int:
        return self.call(Op.SYMLINK, parent, name + b"\0" + target + b"\0")[0]

    def listdir(self, node: int, plus: bool = False) -> list[bytes]:
        fh = struct.unpack_from("<Q", self.ok(Op.OPENDIR, node, fuse.OPEN_IN.pack(0, 0)))[0]
        op = Op.READDIRPLUS if plus else Op.READDIR
        out = self.ok(op, node, fuse.READ_IN.pack(fh, 0, 65536, 0, 0, 0, 0))
        names, pos = [], 0
        skip = fuse.ENTRY_OUT.size + fuse.ATTR.size if plus else 0
        while pos < len(out):
            pos += skip
            _ino, _off, namelen, _kind = fuse.DIRENT.unpack_from(out, pos)
            names.append(out[pos + 24 : pos + 24 + namelen])
            pos += fuse.dirent_size(names[-1])
        self.ok(Op.RELEASEDIR, node, fuse.RELEASE_IN.pack(fh, 0, 0, 0))
        return names


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("secret")
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello.txt").write_text("hello")
    (share / "sub").mkdir()
    return share


@pytest.fixture
def rw(tree: Path) -> Iterator[Client]:
    fs = SharedFs(tree, read_only=False, ownership=Ownership.squash_to_root())
    yield Client(fs)
    fs.close()


def test_create_write_read_rename_unlink(rw: Client, tree: Path) -> None:
    node, fh = rw.create(ROOT, b"new.txt")
    assert rw.write(fh, b"abc" * 1000) == 3000
    assert rw.read(fh, 10, offset=2997) == b"abc"
    rw.ok(Op.RELEASE, node, fuse.RELEASE_IN.pack(fh, 0, 0, 0))
    assert (tree / "new.txt").read_bytes() == b"abc" * 1000
    _, sub = rw.lookup(ROOT, b"sub")
    rw.ok(Op.RENAME, ROOT, fuse.RENAME_IN.pack(sub) + b"new.txt\0moved.txt\0")
    assert (tree / "sub" / "moved.txt").exists() and not (tree / "new.txt").exists()
    rw.ok(Op.UNLINK, sub, b"moved.txt\0")
    assert not (tree / "sub" / "moved.txt").exists()
    assert set(rw.listdir(ROOT)) == {b".", b"..", b"hello.txt", b"sub"}
    assert set(rw.listdir(ROOT, plus=True)) == {b".", b"..", b"hello.txt", b"sub"}


def test_create_exclusive_read_only_mode_like_git(rw: Client, tree: Path) -> None:
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
    _, fh = rw.create(ROOT, b"obj", mode=0o444, flags=flags)
    assert rw.write(fh, b"packed") == 6
    assert stat.S_IMODE((tree / "obj").stat().st_mode) == 0o444
    err, _ = rw.call(
        Op.CREATE, ROOT, fuse.CREATE_IN.pack(flags, stat.S_IFREG | 0o444, 0, 0) + b"obj\0"
    )
    assert err == errno.EEXIST


def test_dot_dot_and_slashes_never_leave_the_share(rw: Client) -> None:
    assert rw.lookup(ROOT, b"..")[0] == errno.EPERM
    assert rw.lookup(ROOT, b".")[0] == errno.EPERM
    assert rw.lookup(ROOT, b"../outside")[0] == errno.EINVAL
    assert rw.lookup(ROOT, b"sub/../../outside")[0] == errno.EINVAL
    _, sub = rw.lookup(ROOT, b"sub")
    assert rw.lookup(sub, b"..")[0] == errno.EPERM


def test_symlinks_are_never_followed_on_the_host(rw: Client, tree: Path) -> None:
    secret = tree.parent / "outside" / "secret"
    assert rw.symlink(ROOT, b"abs", str(secret).encode()) == 0
    assert rw.symlink(ROOT, b"rel", b"../outside/secret") == 0
    os.symlink(tree.parent / "outside", tree / "dirlink")  # planted on the host side
    for name in (b"abs", b"rel", b"dirlink"):
        err, node = rw.lookup(ROOT, name)
        assert err == 0 and stat.S_ISLNK(rw.attr(node)[9])
        assert rw.open(node)[0] == errno.ENXIO  # a link is data to the guest, never a path
        assert rw.open(node, os.O_WRONLY | os.O_TRUNC)[0] == errno.ENXIO
        assert rw.lookup(node, b"secret")[0] == errno.ENOTDIR
    assert secret.read_text() == "secret"


def test_hard_links_and_device_nodes(rw: Client, tree: Path) -> None:
    err, _ = rw.call(
        Op.MKNOD, ROOT, fuse.MKNOD_IN.pack(stat.S_IFCHR | 0o666, os.makedev(1, 3), 0, 0) + b"null\0"
    )
    assert err == errno.EPERM and not (tree / "null").exists()
    assert (
        rw.call(Op.MKNOD, ROOT, fuse.MKNOD_IN.pack(stat.S_IFIFO | 0o600, 0, 0, 0) + b"fifo\0")[0]
        == 0
    )
    _, fifo = rw.lookup(ROOT, b"fifo")
    assert rw.open(fifo)[0] == errno.ENXIO  # a host fifo would block the server
    _, hello = rw.lookup(ROOT, b"hello.txt")
    rw.ok(Op.LINK, ROOT, fuse.LINK_IN.pack(hello) + b"again\0")
    assert os.path.samefile(tree / "again", tree / "hello.txt")
    assert rw.call(Op.LINK, ROOT, fuse.LINK_IN.pack(999) + b"x\0")[0] == errno.ESTALE


def test_setid_bits_and_privileged_xattrs_are_refused(rw: Client, tree: Path) -> None:
    node, _ = rw.create(ROOT, b"tool", mode=0o4755)
    assert not (tree / "tool").stat().st_mode & (stat.S_ISUID | stat.S_ISGID)
    body = fuse.SETATTR_IN.pack(fuse.FATTR_MODE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0o6755, 0, 0, 0, 0)
    rw.ok(Op.SETATTR, node, body)
    assert stat.S_IMODE((tree / "tool").stat().st_mode) == 0o755
    for name in (b"security.capability", b"trusted.x", b"system.posix_acl_access"):
        err, _ = rw.call(Op.SETXATTR, node, fuse.SETXATTR_IN.pack(1, 0) + name + b"\0" + b"v")
        assert err == errno.EPERM
    rw.ok(Op.SETXATTR, node, fuse.SETXATTR_IN.pack(2, 0) + b"user.tag\0" + b"ok")
    assert os.getxattr(tree / "tool", "user.tag") == b"ok"


def test_read_only_share_refuses_every_change(tree: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in tree.rglob("*")}
    fs = SharedFs(tree, read_only=True, ownership=Ownership.squash_to_root())
    ro = Client(fs)
    _, hello = ro.lookup(ROOT, b"hello.txt")
    assert ro.open(hello, os.O_WRONLY)[0] == errno.EROFS
    assert ro.open(hello, os.O_RDONLY | os.O_TRUNC)[0] == errno.EROFS
    err, fh = ro.open(hello)
    assert err == 0 and ro.read(fh, 100) == b"hello"
    refused = [
        (Op.CREATE, ROOT, fuse.CREATE_IN.pack(os.O_RDWR, 0o100644, 0, 0) + b"n\0"),
        (Op.MKDIR, ROOT, fuse.MKDIR_IN.pack(0o755, 0) + b"d\0"),
        (Op.UNLINK, ROOT, b"hello.txt\0"),
        (Op.RMDIR, ROOT, b"sub\0"),
        (Op.SYMLINK, ROOT, b"l\0/etc\0"),
        (Op.RENAME, ROOT, fuse.RENAME_IN.pack(ROOT) + b"hello.txt\0x\0"),
        (Op.WRITE, 0, fuse.WRITE_IN.pack(fh, 0, 1, 0, 0, 0, 0) + b"x"),
        (Op.SETATTR, hello, fuse.SETATTR_IN.pack(fuse.FATTR_SIZE, *[0] * 15)),
        (Op.LINK, ROOT, fuse.LINK_IN.pack(hello) + b"h2\0"),
        (Op.SETXATTR, hello, fuse.SETXATTR_IN.pack(1, 0) + b"user.a\0v"),
    ]
    for op, node, body in refused:
        assert ro.call(op, node, body)[0] == errno.EROFS, op
    assert {p: p.stat().st_mtime_ns for p in tree.rglob("*")} == before
    assert (tree / "hello.txt").read_text() == "hello"
    fs.close()


@pytest.mark.parametrize(
    ("ownership", "expected"),
    [
        (Ownership.squash_to_root(), (0, 0)),
        (Ownership.squash(1234, 5678), (1234, 5678)),
        (Ownership.dynamic_caller(), (1000, 1000)),
        (Ownership.passthrough(), None),
    ],
)
def test_ownership_modes(
    tree: Path, ownership: Ownership, expected: tuple[int, int] | None
) -> None:
    fs = SharedFs(tree, read_only=False, ownership=ownership)
    client = Client(fs, uid=1000, gid=1000)
    _, hello = client.lookup(ROOT, b"hello.txt")
    attr = client.attr(hello)
    host = (tree / "hello.txt").stat()
    assert (attr[11], attr[12]) == (expected or (host.st_uid, host.st_gid))
    fs.close()


def test_forget_releases_host_descriptors(rw: Client) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    _, node = rw.lookup(ROOT, b"hello.txt")
    rw.lookup(ROOT, b"hello.txt")  # same inode: same node, two lookups
    assert rw.lookup(ROOT, b"hello.txt")[1] == node
    assert len(os.listdir("/proc/self/fd")) == fds + 1
    rw.fs.handle(
        fuse.IN_HEADER.pack(48, Op.FORGET, 99, node, 0, 0, 0, 0, 0) + fuse.FORGET_IN.pack(3)
    )
    assert len(os.listdir("/proc/self/fd")) == fds
    assert rw.call(Op.GETATTR, node, fuse.GETATTR_IN.pack(0, 0, 0))[0] == errno.ESTALE


def test_requests_before_init_and_unknown_opcodes() -> None:
    fs = SharedFs(Path("/tmp"), read_only=True, ownership=Ownership.squash_to_root())
    reply = fs.handle(fuse.IN_HEADER.pack(40, Op.GETATTR, 7, ROOT, 0, 0, 0, 0, 0))
    assert reply is not None and fuse.OUT_HEADER.unpack(reply)[1] == -errno.EIO
    Client(fs)
    reply = fs.handle(fuse.IN_HEADER.pack(40, 4242, 8, ROOT, 0, 0, 0, 0, 0))
    assert reply is not None and fuse.OUT_HEADER.unpack(reply)[1] == -errno.ENOSYS
    fs.close()


@pytest.fixture(scope="module")
def fuzz_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("fuzz")
    (base / "outside").write_text("keep")
    share = base / "share"
    share.mkdir()
    (share / "f").write_text("data")
    return share


@settings(
    max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    op=st.one_of(st.sampled_from(list(Op)), st.integers(0, 60)),
    node=st.sampled_from([0, 1, 2, 3, 2**64 - 1]),
    body=st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda n: n + b"\0", st.sampled_from([b"..", b".", b"f", b"../outside", b"/etc"])
        ),
    ),
    length_delta=st.sampled_from([0, 0, 0, 1, -1, 1000]),
)
def test_malformed_requests_only_get_error_replies(
    fuzz_tree: Path, op: int, node: int, body: bytes, length_delta: int
) -> None:
    fs = SharedFs(fuzz_tree, read_only=False, ownership=Ownership.squash_to_root())
    Client(fs)
    raw = (
        fuse.IN_HEADER.pack(
            (40 + len(body) + length_delta) & 0xFFFFFFFF, op, 5, node, 0, 0, 0, 0, 0
        )
        + body
    )
    reply = fs.handle(raw)
    if reply is not None:
        length, error, unique = fuse.OUT_HEADER.unpack_from(reply)
        assert length == len(reply) and unique == 5 and error <= 0
    assert (fuzz_tree.parent / "outside").read_text() == "keep"
    assert sorted(p.name for p in fuzz_tree.parent.iterdir()) == ["outside", "share"]
    fs.close()


# -- the device: requests in descriptor chains ------------------------------------------------

QSIZE = 256
USER_BASE = 0x7F00_0000_0000
DESC, AVAIL, USED, DATA = 0x1000, 0x2000, 0x3000, 0x10000


class Queue:
    def __init__(self) -> None:
        self.mem, self.fd = memfd_memory(4 << 20)
        self.q = VirtQueue(1)
        self.q.set_num(QSIZE)
        self.q.desc, self.q.avail, self.q.used = (USER_BASE + o for o in (DESC, AVAIL, USED))
        self.q.start(self.mem)
        self.next, self.data, self.avail = 0, DATA, 0

    def submit(self, request: list[bytes], reply_sizes: list[int]) -> list[tuple[int, int]]:
        """Lay out one chain; returns the (addr, len) of its writable buffers."""
        parts = [(r, 0) for r in request] + [(bytes(n), VIRTQ_DESC_F_WRITE) for n in reply_sizes]
        head = self.next
        out = []
        for i, (data, flags) in enumerate(parts):
            index = self.next
            self.next += 1
            self.mem.write(self.data, data)
            more = VIRTQ_DESC_F_NEXT if i + 1 < len(parts) else 0
            self.mem.write(
                DESC + 16 * index,
                struct.pack("<QIHH", self.data, len(data), flags | more, index + 1),
            )
            if flags:
                out.append((self.data, len(data)))
            self.data += len(data) + 64
        self.mem.write(AVAIL + 4 + 2 * (self.avail % QSIZE), struct.pack("<H", head))
        self.avail += 1
        self.mem.write(AVAIL + 2, struct.pack("<H", self.avail))
        return out

    def used(self, n: int) -> int:
        return int(struct.unpack("<I", self.mem.read(USED + 4 + 8 * n + 4, 4))[0])


def test_device_moves_large_reads_and_writes_through_guest_buffers(tree: Path) -> None:
    fs = SharedFs(tree, read_only=False, ownership=Ownership.squash_to_root())
    client = Client(fs)
    device = VirtioFsDevice(fs)
    ring = Queue()
    _, fh = client.create(ROOT, b"big")
    payload = os.urandom(50 * 4096)
    pieces = [payload[i : i + 4096] for i in range(0, len(payload), 4096)]
    head = fuse.IN_HEADER.pack(80 + len(payload), Op.WRITE, 1, 0, 0, 0, 0, 0, 0)
    ring.submit([head + fuse.WRITE_IN.pack(fh, 0, len(payload), 0, 0, 0, 0), *pieces], [16, 8])
    device.queue_kicked(ring.q)
    assert ring.used(0) == 24 and (tree / "big").read_bytes() == payload
    read = fuse.IN_HEADER.pack(80, Op.READ, 2, 0, 0, 0, 0, 0, 0) + fuse.READ_IN.pack(
        fh, 0, len(payload), 0, 0, 0, 0
    )
    bufs = ring.submit([read], [16] + [4096] * 50)
    device.queue_kicked(ring.q)
    assert ring.used(1) == 16 + len(payload)
    got = b"".join(ring.mem.read(a, n) for a, n in bufs)
    assert fuse.OUT_HEADER.unpack_from(got) == (16 + len(payload), 0, 2)
    assert got[16 : 16 + len(payload)] == payload
    fs.close()
    ring.mem.close()
    os.close(ring.fd)


def test_file_operations_beyond_read_and_write(rw: Client, tree: Path) -> None:
    node, fh = rw.create(ROOT, b"sparse")
    assert rw.write(fh, b"end", offset=1 << 20) == 3
    blocks = (tree / "sparse").stat().st_blocks
    keep_size = 1  # FALLOC_FL_KEEP_SIZE: room reserved past the end, size unchanged
    rw.ok(Op.FALLOCATE, node, fuse.FALLOCATE_IN.pack(fh, 2 << 20, 1 << 16, keep_size, 0))
    assert (tree / "sparse").stat().st_size == (1 << 20) + 3
    assert (tree / "sparse").stat().st_blocks >= blocks + 128
    seek = fuse.LSEEK_IN.pack(fh, 0, os.SEEK_DATA, 0)
    assert fuse.LSEEK_OUT.unpack(rw.ok(Op.LSEEK, node, seek)) == (1 << 20,)
    _, copy = rw.create(ROOT, b"copy")
    body = fuse.COPY_FILE_RANGE_IN.pack(fh, 1 << 20, 0, copy, 0, 3, 0)
    assert fuse.WRITE_OUT.unpack(rw.ok(Op.COPY_FILE_RANGE, node, body))[0] == 3
    assert (tree / "copy").read_bytes() == b"end"
    rw.ok(Op.FSYNC, node, fuse.FSYNC_IN.pack(fh, 1, 0))
    assert len(rw.ok(Op.STATFS, ROOT)) == fuse.STATFS_OUT.size
    assert rw.symlink(ROOT, b"ln", b"sparse") == 0
    _, ln = rw.lookup(ROOT, b"ln")
    assert rw.ok(Op.READLINK, ln) == b"sparse"
    body = fuse.RENAME2_IN.pack(ROOT, 1, 0) + b"copy\0sparse\0"  # RENAME_NOREPLACE
    assert rw.call(Op.RENAME2, ROOT, body)[0] == errno.EEXIST
    body = fuse.RENAME2_IN.pack(ROOT, 2, 0) + b"copy\0sparse\0"  # RENAME_EXCHANGE
    rw.ok(Op.RENAME2, ROOT, body)
    assert (tree / "sparse").read_bytes() == b"end"
    rw.ok(Op.SETXATTR, node, fuse.SETXATTR_IN.pack(1, 0) + b"user.k\0v")
    size = fuse.XATTR_OUT.unpack(rw.ok(Op.LISTXATTR, node, fuse.GETXATTR_IN.pack(0, 0)))[0]
    assert rw.ok(Op.LISTXATTR, node, fuse.GETXATTR_IN.pack(size, 0)) == b"user.k\0"
    assert rw.ok(Op.GETXATTR, node, fuse.GETXATTR_IN.pack(10, 0) + b"user.k\0") == b"v"
    err, _ = rw.call(Op.GETXATTR, node, fuse.GETXATTR_IN.pack(10, 0) + b"security.selinux\0")
    assert err == errno.ENODATA
    size_body = fuse.SETATTR_IN.pack(fuse.FATTR_SIZE, 0, 0, 10, *[0] * 12)
    rw.ok(Op.SETATTR, node, size_body)
    assert (tree / "copy").stat().st_size == 10  # the exchanged name now holds the sparse file


async def test_large_reads_and_fsync_finish_on_workers(tree: Path) -> None:
    fs = SharedFs(tree, read_only=False, ownership=Ownership.squash_to_root())
    client = Client(fs)
    device = VirtioFsDevice(fs)
    ring = Queue()
    payload = os.urandom(256 * 1024)
    (tree / "big").write_bytes(payload)
    _, node = client.lookup(ROOT, b"big")
    _, fh = client.open(node)
    read = fuse.IN_HEADER.pack(80, Op.READ, 7, node, 0, 0, 0, 0, 0)
    bufs = ring.submit(
        [read + fuse.READ_IN.pack(fh, 0, len(payload), 0, 0, 0, 0)], [16, len(payload)]
    )
    sync = fuse.IN_HEADER.pack(56, Op.FSYNC, 8, node, 0, 0, 0, 0, 0) + fuse.FSYNC_IN.pack(fh, 0, 0)
    ring.submit([sync], [16])
    device.queue_kicked(ring.q)
    client.ok(Op.RELEASE, node, fuse.RELEASE_IN.pack(fh, 0, 0, 0))  # racing close: harmless
    for _ in range(1000):
        if ring.q.used_idx == 2:
            break
        await asyncio.sleep(0.01)
    assert ring.q.used_idx == 2
    got = b"".join(ring.mem.read(a, n) for a, n in bufs)
    assert fuse.OUT_HEADER.unpack_from(got) == (16 + len(payload), 0, 7)
    assert got[16:] == payload
    device.close()
    fs.close()
    ring.mem.close()
    os.close(ring.fd)


# -- a session saved and taken over (snapshots, pause/resume) ---------------------------------


def _take_over(old: SharedFs, root: Path) -> SharedFs:
    fresh = SharedFs(root, read_only=False, ownership=Ownership.squash_to_root())
    fresh.import_state(old.export_state())
    return fresh


def test_a_saved_session_goes_on_in_another_server(rw: Client, tree: Path) -> None:
    node, fh = rw.create(ROOT, b"notes.txt")
    rw.write(fh, b"first ")
    _, sub = rw.lookup(ROOT, b"sub")
    deep, deep_fh = rw.create(sub, b"deep.txt")
    gone, _ = rw.create(ROOT, b"gone.txt")
    (tree / "gone.txt").unlink()  # deleted on the host while the guest holds it
    after = Client.__new__(Client)
    after.fs, after.uid, after.gid, after.unique = _take_over(rw.fs, tree), 1000, 1000, 100
    try:
        # No INIT again: the guest's mount, inodes and open files simply go on.
        assert after.write(fh, b"second", offset=6) == 6
        assert (tree / "notes.txt").read_bytes() == b"first second"
        assert after.write(deep_fh, b"deep") == 4
        assert (tree / "sub" / "deep.txt").read_bytes() == b"deep"
        assert after.attr(deep)[0] == (tree / "sub" / "deep.txt").stat().st_ino
        assert after.call(Op.GETATTR, gone, fuse.GETATTR_IN.pack(0, 0, 0))[0] == errno.ESTALE
        # New ids never collide with the ones the guest still holds.
        new_node, new_fh = after.create(ROOT, b"new.txt")
        assert new_node not in (node, deep, gone) and new_fh not in (fh, deep_fh)
    finally:
        after.fs.close()


def test_a_saved_session_cannot_name_a_path_outside_the_share(rw: Client, tree: Path) -> None:
    import json

    state = json.loads(rw.fs.export_state())
    fresh = SharedFs(tree, read_only=False, ownership=Ownership.squash_to_root())
    try:
        for bad in ("../outside/secret", "/etc/passwd", "sub/../../outside", "", "a\0b"):
            hostile = {**state, "inodes": [[7, bad, stat.S_IFREG, 1]]}
            with pytest.raises(ValueError, match="bad path"):
                fresh.import_state(json.dumps(hostile).encode())
        (tree / "link").symlink_to(tree.parent / "outside")
        through_link = {**state, "inodes": [[7, "link/secret", stat.S_IFREG, 1]]}
        fresh.import_state(json.dumps(through_link).encode())
        assert 7 not in fresh.inodes  # the symlink is not followed: the inode is lost
        for bad_state in (b"{}", b"[]", b'{"v": 1, "inodes": 5}', b"\xff"):
            with pytest.raises(ValueError):
                fresh.import_state(bad_state)
    finally:
        fresh.close()
