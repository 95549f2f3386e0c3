"""Shares against a hostile guest: a root guest can make its kernel send any FUSE request,
so the host side must hold whatever arrives.

- the share server itself, driven with raw FUSE requests: CREATE never opens what is not
  a regular file (a fifo would hang the share, a device node would hand the guest a host
  device), and a change to a set-id file takes its set-id bits away on the host;
- the helper's Landlock confinement, in a child interpreter (it lasts for life);
- a real sandbox whose root rewrites a set-uid program and tries to get out of its share.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import capsa
from capsa import MountMode, Ownership
from capsa._util import landlock
from capsa.devices import fuse
from capsa.devices.fuse import Op
from capsa.devices.shared_fs import SharedFs
from capsa.devices.virtio_fs_main import (
    SHARE_READ,
    SHARE_READ_WRITE,
    confine_to_share,
    share_rules,
)
from capsa.spec.shares import OwnershipMode
from tests.framework.factory import VmFactory
from tests.unit.test_shared_fs import ROOT, Client

REPO = Path(__file__).resolve().parents[2]
LANDLOCK = landlock.landlock_status()
needs_landlock = pytest.mark.skipif(
    not LANDLOCK.enabled, reason=f"the kernel cannot confine the helper: {LANDLOCK}"
)
DEADLINE_S = 5.0  # far beyond an answer, short enough for a hung server to fail the test
PROMPT_S = 2.0  # what "at once" means for a request that must not block


# -- raw requests ---------------------------------------------------------------------------


def create_body(name: bytes, flags: int, mode: int = 0o644) -> bytes:
    return fuse.CREATE_IN.pack(flags, stat.S_IFREG | mode, 0, 0) + name + b"\0"


def setattr_body(
    valid: int, *, fh: int = 0, size: int = 0, uid: int = 0, gid: int = 0, mode: int = 0
) -> bytes:
    return fuse.SETATTR_IN.pack(valid, 0, fh, size, 0, 0, 0, 0, 0, 0, 0, mode, 0, uid, gid, 0)


def opened(guest: Client, node: int, flags: int) -> int:
    err, fh = guest.open(node, flags)
    assert err == 0, os.strerror(err)
    return fh


def call_within_deadline(
    guest: Client, op: int, node: int, body: bytes, unblock: Callable[[], None]
) -> tuple[int, float]:
    """(errno, seconds) of a request that must not block the server; if it does, ``unblock``
    frees it so the test fails instead of hanging."""
    answers: list[tuple[int, bytes]] = []
    worker = threading.Thread(target=lambda: answers.append(guest.call(op, node, body)))
    start = time.monotonic()
    worker.start()
    worker.join(DEADLINE_S)
    elapsed = time.monotonic() - start
    if worker.is_alive():
        unblock()
        worker.join(DEADLINE_S)
        pytest.fail(f"the server blocked on opcode {op} for {DEADLINE_S} s")
    return answers[0][0], elapsed


def real_descriptors_of(path: Path) -> list[int]:
    """Our descriptors that have the inode at ``path`` open (O_PATH ones open nothing)."""
    target = path.lstat()
    found = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            st = os.stat(int(name))
            flags = int(Path(f"/proc/self/fdinfo/{name}").read_text().split()[3], 8)
            same = (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino)
            if same and not flags & os.O_PATH:
                found.append(int(name))
    return found


@pytest.fixture
def share(tmp_path: Path) -> Path:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("host secret\n")
    root = tmp_path / "share"
    root.mkdir()
    (root / "hello.txt").write_text("hello")
    return root


def client_of(root: Path, ownership: Ownership | None = None) -> Client:
    return Client(
        SharedFs(root, read_only=False, ownership=ownership or Ownership.squash_to_root())
    )


@pytest.fixture
def guest(share: Path) -> Iterator[Client]:
    client = client_of(share)
    yield client
    client.fs.close()


# -- row 6: CREATE opens nothing but a regular file -----------------------------------------


@pytest.mark.parametrize(
    "flags",
    [os.O_WRONLY, os.O_RDONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC],
    ids=["write-only", "read-only", "read-write", "truncating"],
)
def test_create_over_a_fifo_answers_at_once_and_opens_nothing(
    guest: Client, share: Path, flags: int
) -> None:
    mkfifo = fuse.MKNOD_IN.pack(stat.S_IFIFO | 0o666, 0, 0, 0) + b"trap\0"
    assert guest.call(Op.MKNOD, ROOT, mkfifo)[0] == 0
    trap = share / "trap"

    def unblock() -> None:  # a reader and a writer at once: any blocked open of it returns
        os.close(os.open(trap, os.O_RDWR | os.O_NONBLOCK))

    err, elapsed = call_within_deadline(
        guest, Op.CREATE, ROOT, create_body(b"trap", flags), unblock
    )
    assert err == errno.ENXIO and elapsed < PROMPT_S
    assert real_descriptors_of(trap) == []
    assert stat.S_ISFIFO(trap.lstat().st_mode)  # refused, not replaced
    # The share goes on serving, and an existing regular file is still opened by CREATE.
    _, fh = guest.create(ROOT, b"hello.txt", flags=flags)
    if flags & os.O_ACCMODE != os.O_RDONLY:
        assert guest.write(fh, b"again") == 5
        assert (share / "hello.txt").read_text()[:5] == "again"


def test_create_and_open_refuse_a_device_node_the_host_placed(guest: Client, share: Path) -> None:
    try:
        os.mknod(share / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # /dev/null's numbers
    except PermissionError:
        pytest.skip("making a device node needs root (CAP_MKNOD)")
    for flags in (os.O_RDWR, os.O_WRONLY | os.O_TRUNC, os.O_RDONLY | os.O_NONBLOCK):
        assert guest.call(Op.CREATE, ROOT, create_body(b"null", flags))[0] == errno.ENXIO
    _, node = guest.lookup(ROOT, b"null")
    assert guest.open(node, os.O_RDWR)[0] == errno.ENXIO
    assert real_descriptors_of(share / "null") == []
    assert stat.S_ISCHR((share / "null").lstat().st_mode)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(share / "sock"))
        assert guest.call(Op.CREATE, ROOT, create_body(b"sock", os.O_RDWR))[0] == errno.ENXIO
    secret = share.parent / "outside" / "secret"
    os.symlink(secret, share / "link")
    err, _ = guest.call(Op.CREATE, ROOT, create_body(b"link", os.O_WRONLY | os.O_TRUNC))
    assert err == errno.ELOOP and secret.read_text() == "host secret\n"


# -- row 7: a set-id file changed by the guest loses its set-id bits -----------------------

# host mode -> mode once the guest changed the file: set-uid always goes, set-gid only
# with group-exec (without it the bit asks for mandatory locking and grants nothing).
SETID_FILES = {
    b"suid": (0o4755, 0o755),
    b"sgid": (0o2755, 0o755),
    b"both": (0o6755, 0o755),
    b"sgid-locking": (0o2644, 0o2644),
}
PROGRAM = b"#!/bin/sh\necho the original program\n"


def place_setid_files(share: Path) -> dict[bytes, Path]:
    paths = {}
    for name, (mode, _) in SETID_FILES.items():
        path = share / name.decode()
        path.write_bytes(PROGRAM)
        os.chmod(path, mode)
        paths[name] = path
    return paths


@pytest.fixture
def setid_files(share: Path) -> dict[bytes, Path]:
    return place_setid_files(share)


def write_into(guest: Client, node: int, path: Path) -> None:
    assert guest.write(opened(guest, node, os.O_WRONLY), b"evil") == 4
    assert path.read_bytes().startswith(b"evil")


def truncate_by_name(guest: Client, node: int, path: Path) -> None:
    guest.ok(Op.SETATTR, node, setattr_body(fuse.FATTR_SIZE, size=1))
    assert path.stat().st_size == 1


def truncate_open_file(guest: Client, node: int, path: Path) -> None:
    fh = opened(guest, node, os.O_WRONLY)
    guest.ok(Op.SETATTR, node, setattr_body(fuse.FATTR_SIZE | fuse.FATTR_FH, fh=fh, size=2))
    assert path.stat().st_size == 2


def open_truncating(guest: Client, node: int, path: Path) -> None:
    opened(guest, node, os.O_WRONLY | os.O_TRUNC)
    assert path.stat().st_size == 0


def create_truncating(guest: Client, node: int, path: Path) -> None:
    guest.create(ROOT, path.name.encode(), flags=os.O_WRONLY | os.O_TRUNC)
    assert path.stat().st_size == 0


def fallocate(guest: Client, node: int, path: Path) -> None:
    fh = opened(guest, node, os.O_RDWR)
    guest.ok(Op.FALLOCATE, node, fuse.FALLOCATE_IN.pack(fh, 0, 1 << 16, 0, 0))
    assert path.stat().st_size == 1 << 16


def copy_into(guest: Client, node: int, path: Path) -> None:
    source, source_fh = guest.create(ROOT, b"payload-for-" + path.name.encode())
    guest.write(source_fh, b"evil")
    fh = opened(guest, node, os.O_WRONLY)
    body = fuse.COPY_FILE_RANGE_IN.pack(source_fh, 0, node, fh, 0, 4, 0)
    assert fuse.WRITE_OUT.unpack(guest.ok(Op.COPY_FILE_RANGE, source, body))[0] == 4
    assert path.read_bytes().startswith(b"evil")


@pytest.mark.parametrize(
    "change",
    [
        write_into,
        truncate_by_name,
        truncate_open_file,
        open_truncating,
        create_truncating,
        fallocate,
        copy_into,
    ],
)
def test_a_change_to_a_setid_file_takes_its_setid_bits(
    guest: Client, setid_files: dict[bytes, Path], change: Callable[[Client, int, Path], None]
) -> None:
    for name, path in setid_files.items():
        _, node = guest.lookup(ROOT, name)
        change(guest, node, path)
        assert stat.S_IMODE(path.stat().st_mode) == SETID_FILES[name][1], name


OWNERSHIPS = [
    Ownership.squash_to_root(),
    Ownership.squash(1234, 5678),
    Ownership.dynamic_caller(),
    Ownership.passthrough(),
]


def test_chown_of_a_setid_file_takes_its_setid_bits_in_every_ownership_mode(share: Path) -> None:
    # Squashed or per-caller owners change nothing on the host, but the guest was told its
    # chown happened, and a chown ends set-id; in passthrough the owner really changes.
    chown = setattr_body(fuse.FATTR_UID | fuse.FATTR_GID, uid=1000, gid=1000)
    for ownership in OWNERSHIPS:
        guest = client_of(share, ownership)
        for name, path in place_setid_files(share).items():
            _, node = guest.lookup(ROOT, name)
            guest.ok(Op.SETATTR, node, chown)
            assert stat.S_IMODE(path.stat().st_mode) == SETID_FILES[name][1], (ownership, name)
            if ownership.mode is OwnershipMode.PASSTHROUGH and os.geteuid() == 0:
                assert (path.stat().st_uid, path.stat().st_gid) == (1000, 1000)
        guest.fs.close()


# -- the helper's Landlock confinement ------------------------------------------------------


def test_the_ruleset_handles_what_each_abi_knows_and_nothing_more() -> None:
    first = landlock.Handled.for_abi(1)
    assert first.fs == landlock.Fs((1 << 13) - 1) and (first.net, first.scoped) == (0, 0)
    assert landlock.Fs.REFER in landlock.Handled.for_abi(2).fs
    assert landlock.Fs.TRUNCATE not in landlock.Handled.for_abi(2).fs
    assert landlock.Fs.TRUNCATE in landlock.Handled.for_abi(3).fs
    assert landlock.Handled.for_abi(4).net == landlock.NET_BIND_TCP | landlock.NET_CONNECT_TCP
    assert landlock.Fs.IOCTL_DEV not in landlock.Handled.for_abi(4).fs
    assert landlock.Handled.for_abi(5).fs == landlock.Fs((1 << 16) - 1)
    assert landlock.Handled.for_abi(5).scoped == 0
    assert landlock.Handled.for_abi(6).scoped == (
        landlock.SCOPE_ABSTRACT_UNIX_SOCKET | landlock.SCOPE_SIGNAL
    )
    assert len(landlock.Handled.for_abi(7).pack()) == 24
    old = landlock.Handled.for_abi(2).fs
    assert landlock.rule_access(SHARE_READ_WRITE, old, is_dir=True) == SHARE_READ_WRITE & ~(
        landlock.Fs.TRUNCATE
    )
    on_a_file = landlock.rule_access(landlock.READ_EXECUTE, old, is_dir=False)
    assert on_a_file == landlock.Fs.READ_FILE | landlock.Fs.EXECUTE


@pytest.mark.parametrize("read_only", [True, False], ids=["read-only", "read-write"])
def test_the_helper_may_write_in_its_share_and_nowhere_else(share: Path, read_only: bool) -> None:
    fd = os.open(share, os.O_PATH)
    try:
        rules = share_rules(fd, read_only)
    finally:
        os.close(fd)
    writing = ~(landlock.READ_EXECUTE)
    assert rules[0].path == Path(f"/proc/self/fd/{fd}")
    assert rules[0].access == (SHARE_READ if read_only else SHARE_READ_WRITE)
    assert not rules[0].access & (
        landlock.Fs.MAKE_CHAR | landlock.Fs.MAKE_BLOCK | landlock.Fs.IOCTL_DEV
    )
    assert all(not rule.access & writing for rule in rules[1:])
    allowed = [rule.path for rule in rules[1:]]
    assert Path(os.__file__).parent in allowed  # the standard library stays importable
    assert Path.cwd() not in allowed and Path("/") not in allowed and Path("/etc") not in allowed


@pytest.mark.parametrize(
    ("failure", "why"),
    [
        (errno.ENOSYS, "no Landlock"),
        (errno.EOPNOTSUPP, "not enabled"),
        (None, "ABI 1 cannot allow renames"),
    ],
    ids=["no-syscall", "disabled-at-boot", "abi-1"],
)
def test_without_landlock_the_helper_runs_unconfined_and_says_so(
    share: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failure: int | None,
    why: str,
) -> None:
    restricted: list[object] = []

    def kernel(number: int, *args: object) -> int:
        # Only the version probe may reach here; a ruleset would confine pytest itself.
        if number != landlock.SYS_CREATE_RULESET or args[0] is not None:
            restricted.append(number)
            raise OSError(errno.EPERM, "the test refuses to confine itself")
        if failure is not None:
            raise OSError(failure, os.strerror(failure))
        return 1

    monkeypatch.setattr(landlock, "_syscall", kernel)
    fs = SharedFs(share, read_only=False, ownership=Ownership.squash_to_root())
    with caplog.at_level("INFO", logger="capsa.virtio_fs"):
        status = confine_to_share(fs)
    fs.close()
    assert not status.enabled and why in status.reason and restricted == []
    assert str(status).startswith("landlock=off (")
    [record] = [r for r in caplog.records if hasattr(r, "capsa_landlock")]
    assert record.levelname == "INFO" and record.capsa_landlock is False


CHILD_PRELUDE = """
import errno, json, os, sys
from pathlib import Path
from capsa.devices.shared_fs import SharedFs
from capsa.devices.virtio_fs_main import confine_to_share
from capsa.spec.shares import Ownership

def outcome(action):
    try:
        action()
    except OSError as e:
        return e.errno
    return 0
"""

CONFINED_OPENS = (
    CHILD_PRELUDE
    + """
share, outside, read_only = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "ro"
fs = SharedFs(share, read_only=read_only, ownership=Ownership.squash_to_root())
# Held from before the confinement, as a node the guest knows is held.
outside_fd = os.open(outside / "secret", os.O_PATH)
inside_fd = os.open(share / "hello.txt", os.O_PATH)
status = confine_to_share(fs)

def read(path):
    with open(path, "rb") as f:
        f.read()

def append(path):
    with open(path, "ab") as f:
        f.write(b"pwned")

def reopen(fd, flags):
    os.close(os.open(f"/proc/self/fd/{fd}", flags))

print(json.dumps({
    "enabled": status.enabled,
    "read outside": outcome(lambda: read(outside / "secret")),
    "write outside": outcome(lambda: append(outside / "secret")),
    "create outside": outcome(lambda: append(outside / "planted")),
    "reopen outside": outcome(lambda: reopen(outside_fd, os.O_RDONLY)),
    "read inside": outcome(lambda: read(share / "hello.txt")),
    "write inside": outcome(lambda: append(share / "hello.txt")),
    "reopen inside": outcome(lambda: reopen(inside_fd, os.O_RDONLY)),
    "list /etc": outcome(lambda: os.listdir("/etc")),
    "import later": outcome(lambda: __import__("xml.dom.minidom")),
}))
"""
)


def run_child(script: str, *args: str) -> dict[str, int]:
    """``script`` run by a fresh interpreter (a confinement lasts for life), its JSON."""
    child = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert child.returncode == 0, child.stderr
    result: dict[str, int] = json.loads(child.stdout.splitlines()[-1])
    return result


@needs_landlock
@pytest.mark.parametrize("read_only", [True, False], ids=["read-only", "read-write"])
def test_a_confined_helper_cannot_open_anything_outside_its_share(
    share: Path, read_only: bool
) -> None:
    outside = share.parent / "outside"
    got = run_child(CONFINED_OPENS, str(share), str(outside), "ro" if read_only else "rw")
    assert got == {
        "enabled": True,
        "read outside": errno.EACCES,
        "write outside": errno.EACCES,
        "create outside": errno.EACCES,
        # A /proc/self/fd/N reopen is judged by where the file lives, not by /proc.
        "reopen outside": errno.EACCES,
        "read inside": 0,
        "write inside": errno.EACCES if read_only else 0,
        "reopen inside": 0,
        "list /etc": errno.EACCES,
        "import later": 0,
    }
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_text() == "host secret\n"


MOVED_OUT = (
    CHILD_PRELUDE
    + """
from capsa.devices import fuse
from capsa.devices.fuse import Op
from tests.unit.test_shared_fs import ROOT, Client

share, outside = Path(sys.argv[1]), Path(sys.argv[2])
guest = Client(SharedFs(share, read_only=False, ownership=Ownership.squash_to_root()))
_, folder = guest.lookup(ROOT, b"folder")
_, data = guest.lookup(folder, b"data")
os.rename(share / "folder", outside / "folder")  # the host tidies up under the guest's feet
confine_to_share(guest.fs)
truncate = fuse.SETATTR_IN.pack(fuse.FATTR_SIZE, *[0] * 15)
create = fuse.CREATE_IN.pack(os.O_WRONLY, 0o100644, 0, 0) + b"planted\\0"
print(json.dumps({
    "open": guest.open(data, os.O_RDWR)[0],
    "truncate": guest.call(Op.SETATTR, data, truncate)[0],
    "create": guest.call(Op.CREATE, folder, create)[0],
    "mkdir": guest.call(Op.MKDIR, folder, fuse.MKDIR_IN.pack(0o755, 0) + b"made\\0")[0],
    "unlink": guest.call(Op.UNLINK, folder, b"data\\0")[0],
    "list": guest.call(Op.OPENDIR, folder, fuse.OPEN_IN.pack(0, 0))[0],
    "link in": guest.call(Op.LINK, ROOT, fuse.LINK_IN.pack(data) + b"pulled\\0")[0],
    "rename in": guest.call(Op.RENAME, folder, fuse.RENAME_IN.pack(ROOT) + b"data\\0got\\0")[0],
}))
"""
)


@needs_landlock
def test_a_confined_helper_refuses_a_folder_the_host_moved_out_of_the_share(share: Path) -> None:
    # The guest's nodes are descriptors, not paths: a folder the host moves out of the share
    # stays in reach of the guest through them. Only the confinement stops that.
    (share / "folder").mkdir()
    (share / "folder" / "data").write_text("now outside\n")
    outside = share.parent / "outside"
    got = run_child(MOVED_OUT, str(share), str(outside))
    assert got == {
        "open": errno.EACCES,
        "truncate": errno.EACCES,
        "create": errno.EACCES,
        "mkdir": errno.EACCES,
        "unlink": errno.EACCES,
        "list": errno.EACCES,
        "link in": errno.EXDEV,
        "rename in": errno.EACCES,  # removing it from there is refused first
    }
    assert sorted(p.name for p in (outside / "folder").iterdir()) == ["data"]
    assert (outside / "folder" / "data").read_text() == "now outside\n"
    assert sorted(p.name for p in share.iterdir()) == ["hello.txt"]


THREADED = (
    CHILD_PRELUDE
    + """
import threading
from capsa._util.landlock import LandlockError

fs = SharedFs(Path(sys.argv[1]), read_only=True, ownership=Ownership.squash_to_root())
release = threading.Event()
threading.Thread(target=release.wait).start()
try:
    confine_to_share(fs)
except LandlockError:
    refused = True
else:
    refused = False
release.set()
print(json.dumps({"refused": refused, "still free": outcome(lambda: os.listdir("/etc"))}))
"""
)


@needs_landlock
def test_confinement_is_refused_while_other_threads_would_escape_it(share: Path) -> None:
    assert run_child(THREADED, str(share)) == {"refused": True, "still free": 0}


# -- black box: a real sandbox's root against its share -------------------------------------

PY = "/usr/lib/capsa/python/bin/python3 -I"


@dataclass
class Box:
    agent: capsa.AgentClient
    rw: Path
    outside: Path


@pytest.fixture(scope="module")
async def box(
    module_vm_factory: VmFactory, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Box]:
    base = tmp_path_factory.mktemp("hostile")
    rw, outside = base / "rw", base / "outside"
    rw.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("host secret\n")
    (outside / "dir").mkdir()
    (outside / "dir" / "inner").write_text("inner\n")
    builder = capsa.sandbox().memory_mb(512).share(rw, "/mnt/rw", MountMode.READ_WRITE)
    sandbox = await module_vm_factory.sandbox(builder)
    yield Box(await sandbox.agent(), rw, outside)
    await sandbox.kill()


def tree_state(root: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Every entry under ``root`` (and ``root``): type and mode, owner, and content."""
    out = {}
    for p in [root, *sorted(root.rglob("*"))]:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            content = os.readlink(p).encode()
        elif stat.S_ISREG(st.st_mode):
            content = p.read_bytes()
        else:
            content = b""
        out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, content)
    return out


async def guest_sh(box: Box, cmd: str, timeout: float = 120) -> capsa.ExecResult:
    # A guest process waiting on a hung share cannot even be killed (the guest waits
    # uninterruptibly for a FUSE request the server holds), so the host gives up itself.
    try:
        return await asyncio.wait_for(box.agent.exec(cmd, timeout=timeout), timeout + 30)
    except TimeoutError:
        pytest.fail(f"no answer from the guest within {timeout + 30:.0f} s: {cmd}")


REWRITE_SETUID = """
import os
with open("/mnt/rw/su-tool", "w") as f:  # O_TRUNC: a new program in place
    f.write("#!/bin/sh\\necho pwned\\n")
with open("/mnt/rw/sg-tool", "a") as f:  # appended
    f.write("echo pwned\\n")
fd = os.open("/mnt/rw/both-tool", os.O_WRONLY)  # overwritten in place, no truncation
os.pwrite(fd, b"#!/bin/sh\\necho pwned\\n", 0)
os.close(fd)
"""


async def test_guest_root_rewriting_a_setuid_program_leaves_no_setid_bit(box: Box) -> None:
    tools = {"su-tool": 0o4755, "sg-tool": 0o2755, "both-tool": 0o6755}
    for name, mode in tools.items():
        (box.rw / name).write_text("#!/bin/sh\necho the original program\n")
        os.chmod(box.rw / name, mode)
    await box.agent.write_file("/tmp/rewrite.py", REWRITE_SETUID.encode())
    result = await guest_sh(box, f"{PY} /tmp/rewrite.py")
    assert result.exit_code == 0, result.stderr
    for name in tools:
        host = box.rw / name
        assert b"pwned" in host.read_bytes(), name  # the guest did rewrite it
        assert not host.stat().st_mode & (stat.S_ISUID | stat.S_ISGID), name


FIFO_TRAP = """
import contextlib, errno, os, signal

def give_up(*_):
    raise TimeoutError  # a fifo the guest kernel opens itself waits for a reader

signal.signal(signal.SIGALRM, give_up)
refused = 0
for _ in range(300):
    with contextlib.suppress(OSError):  # the guest forgets the name: CREATE goes to the host
        os.unlink("/mnt/rw/trap")
    signal.setitimer(signal.ITIMER_REAL, 0.1)
    try:
        os.close(os.open("/mnt/rw/trap", os.O_WRONLY | os.O_CREAT, 0o644))
    except OSError as e:
        refused += e.errno == errno.ENXIO
    except TimeoutError:
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
raise SystemExit(min(refused, 100))
"""


@contextlib.contextmanager
def flipping_fifo(path: Path) -> Iterator[None]:
    """A host thread making ``path`` a fifo and removing it again, so a guest CREATE (sent
    after its LOOKUP found nothing) keeps meeting a fifo on the host."""
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            with contextlib.suppress(FileExistsError):
                os.mkfifo(path)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    thread = threading.Thread(target=flip, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


async def test_share_escape_attempts_leave_the_outside_untouched(box: Box) -> None:
    outside = box.outside
    os.symlink(outside, box.rw / "abs")
    os.symlink(f"../{outside.name}", box.rw / "rel")
    os.symlink(outside / "secret", box.rw / "abs-file")
    os.symlink(f"../{outside.name}/secret", box.rw / "rel-file")
    (box.rw / "payload").write_text("pwned\n")
    before = tree_state(outside)
    must_fail = [
        "cat /mnt/rw/../outside/secret",
        "cat /mnt/rw/abs/secret",
        "cat /mnt/rw/rel/secret",
        "cat /mnt/rw/abs-file",
        "cat /mnt/rw/rel-file",
        "echo pwned > /mnt/rw/abs/secret",
        "echo pwned > /mnt/rw/rel/secret",
        "echo pwned > /mnt/rw/rel-file",
        "echo pwned > /mnt/rw/../outside/secret",
        "ls /mnt/rw/abs/dir",
        "ln -s ../../../../../../../outside /mnt/rw/up && cat /mnt/rw/up/secret",
        "ln /mnt/rw/abs/secret /mnt/rw/hard",
        "ln /etc/hostname /mnt/rw/hard",
        "mknod /mnt/rw/null c 1 3",
        "mknod /mnt/rw/disk b 8 0",
        "mv /mnt/rw/payload /mnt/rw/abs/secret",
        "mv /mnt/rw/payload /mnt/rw/rel/secret",
        "mv /mnt/rw/payload /mnt/rw/../outside/secret",
        "mv /mnt/rw/abs/dir /mnt/rw/stolen",
    ]
    for cmd in must_fail:
        result = await guest_sh(box, cmd)
        assert result.exit_code != 0, cmd
        assert b"host secret" not in result.stdout + result.stderr, cmd
    # Renaming over a planted link replaces the link, never the file it names.
    assert (await guest_sh(box, "mv /mnt/rw/payload /mnt/rw/abs-file")).exit_code == 0
    assert (box.rw / "abs-file").read_text() == "pwned\n"
    # The fifo trap: the guest creates a name the host keeps turning into a fifo.
    await box.agent.write_file("/tmp/fifo_trap.py", FIFO_TRAP.encode())
    with flipping_fifo(box.rw / "trap"):
        trap = await guest_sh(box, f"{PY} /tmp/fifo_trap.py", timeout=60)
    # Its exit code counts the CREATEs the host refused (ENXIO): the trap was sprung.
    assert not trap.timed_out and trap.exit_code > 0, trap.stderr
    listing = await guest_sh(box, "ls /mnt/rw", timeout=30)  # the share still answers
    assert listing.exit_code == 0
    assert tree_state(outside) == before
    leftovers = {p.name for p in box.rw.iterdir()}
    assert not leftovers & {"null", "disk", "hard", "stolen"}


MOVED_OUT_GUEST = """
cd /mnt/rw/folder || exit 90
touch /mnt/rw/ready
while [ ! -e /mnt/rw/moved ]; do sleep 0.1; done
cat data; echo pwned > data; echo pwned > planted; mkdir made; rm -f data
ls
exit 0
"""


@needs_landlock
async def test_a_folder_moved_out_under_the_guest_stays_out_of_its_reach(box: Box) -> None:
    folder = box.rw / "folder"
    folder.mkdir()
    (folder / "data").write_text("moving out\n")
    await box.agent.write_file("/tmp/moved_out.sh", MOVED_OUT_GUEST.encode())
    guest = asyncio.ensure_future(guest_sh(box, "sh /tmp/moved_out.sh"))
    for _ in range(600):
        if (box.rw / "ready").exists() or guest.done():
            break
        await asyncio.sleep(0.1)
    assert (box.rw / "ready").exists()
    os.rename(folder, box.outside / "folder")  # the host tidies up while the guest sits in it
    (box.rw / "moved").touch()
    result = await guest
    assert result.exit_code == 0, result.stderr
    assert b"moving out" not in result.stdout
    moved = box.outside / "folder"
    assert sorted(p.name for p in moved.iterdir()) == ["data"]
    assert (moved / "data").read_text() == "moving out\n"
