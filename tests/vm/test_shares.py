"""Shared folders in a real sandbox: one VM with five virtio-fs shares, checked from both
sides (the guest's exit codes and file contents, the host's files)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import capsa
from capsa import MountMode, Ownership

PY = "/usr/lib/capsa/python/bin/python3 -I"
TOOLS = "/opt/tools"


@dataclass
class Shares:
    sb: capsa.Sandbox
    agent: capsa.AgentClient
    ro: Path
    rw: Path
    owners: Path
    dyn: Path
    outside: Path


def tree_state(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every entry under ``root``: its mode and content (symlinks: their target)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = (0, os.readlink(p).encode())
        elif p.is_file():
            out[str(p.relative_to(root))] = (p.stat().st_mode, p.read_bytes())
        else:
            out[str(p.relative_to(root))] = (p.stat().st_mode, b"")
    return out


def stage_git(dest: Path) -> None:
    """The host's git and the libraries it links against, runnable from a share."""
    git = shutil.which("git")
    assert git is not None, "git is needed on the host (scripts/install.sh --dev)"
    (dest / "bin").mkdir(parents=True)
    (dest / "lib").mkdir()
    shutil.copy2(git, dest / "bin" / "git")
    ldd = subprocess.run(["ldd", git], capture_output=True, text=True, check=True).stdout
    for line in ldd.splitlines():
        parts = line.split("=>")
        if len(parts) == 2 and parts[1].split() and parts[1].split()[0].startswith("/"):
            shutil.copy2(parts[1].split()[0], dest / "lib")


@pytest.fixture(scope="module")
async def shares(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Shares]:
    base = tmp_path_factory.mktemp("shares")
    names = ("ro", "rw", "owners", "dyn", "tools", "outside")
    ro, rw, owners, dyn, tools, outside = (base / n for n in names)
    for d in (ro, rw, owners, dyn, outside):
        d.mkdir()
    (ro / "readme.txt").write_text("read me\n")
    (ro / "nested").mkdir()
    (ro / "nested" / "deep.bin").write_bytes(bytes(range(256)) * 64)
    (owners / "owned").write_text("x")
    if os.geteuid() == 0:  # another user's file: only root can make one
        os.chown(owners / "owned", 1234, 5678)
    (outside / "secret").write_text("host secret\n")
    stage_git(tools)
    builder = (
        capsa.sandbox()
        .memory_mb(512)
        .share(ro, "/mnt/ro")
        .share(rw, "/mnt/rw", MountMode.READ_WRITE)
        .share(owners, "/mnt/owners", ownership=Ownership.passthrough())
        .share(tools, TOOLS)
        .virtio_fs(dyn, "dyn", MountMode.READ_WRITE, ownership=Ownership.dynamic_caller())
    )
    async with await builder.build() as sb:
        yield Shares(sb, await sb.agent(), ro, rw, owners, dyn, outside)


async def sh(s: Shares, cmd: str, timeout: float = 120) -> capsa.ExecResult:
    return await s.agent.exec(cmd, timeout=timeout)


async def test_read_only_share_reads_and_refuses_every_write(shares: Shares) -> None:
    before = tree_state(shares.ro)
    r = await sh(shares, "cat /mnt/ro/readme.txt; sha256sum /mnt/ro/nested/deep.bin")
    assert r.exit_code == 0
    assert r.stdout.startswith(b"read me\n")
    assert (
        hashlib.sha256((shares.ro / "nested" / "deep.bin").read_bytes()).hexdigest().encode()
        in r.stdout
    )
    refused = [
        "echo x > /mnt/ro/new",
        "echo x >> /mnt/ro/readme.txt",
        "rm /mnt/ro/readme.txt",
        "mv /mnt/ro/readme.txt /mnt/ro/moved",
        "mkdir /mnt/ro/d",
        "ln -s x /mnt/ro/l",
        "touch /mnt/ro/readme.txt",
        "chmod 777 /mnt/ro/readme.txt",
        "rmdir /mnt/ro/nested",
    ]
    for cmd in refused:
        assert (await sh(shares, cmd)).exit_code != 0, cmd
    # The host enforces it too, not only the guest's read-only mount: remount rw and retry.
    probe = (
        "import errno, os\n"
        "try:\n    os.open('/mnt/ro/readme.txt', os.O_WRONLY)\nexcept OSError as e:\n"
        "    raise SystemExit(e.errno)\n"
    )
    await shares.agent.write_file("/tmp/probe.py", probe.encode())
    r = await sh(shares, f"mount -o remount,rw /mnt/ro && {PY} /tmp/probe.py")
    assert r.exit_code == 30  # EROFS, from the host side
    r = await sh(
        shares, "echo x > /mnt/ro/new2; rm -f /mnt/ro/readme.txt; mount -o remount,ro /mnt/ro"
    )
    assert tree_state(shares.ro) == before


async def test_guest_changes_appear_on_the_host_exactly(shares: Shares) -> None:
    script = (
        "set -e; cd /mnt/rw; mkdir -p a/b; printf 'one' > a/b/f1; printf 'two' > a/f2;"
        "mv a/f2 a/b/f2; printf 'tmp' > gone; rm gone; mkdir empty; rmdir empty;"
        "ln -s b/f1 a/link; chmod 600 a/b/f1; printf 'more' >> a/b/f1"
    )
    assert (await sh(shares, script)).exit_code == 0
    state = tree_state(shares.rw / "a")
    assert state["b/f1"][1] == b"onemore" and state["b/f1"][0] & 0o777 == 0o600
    assert state["b/f2"][1] == b"two"
    assert state["link"] == (0, b"b/f1")
    assert set(state) == {"b", "b/f1", "b/f2", "link"}
    assert not (shares.rw / "gone").exists() and not (shares.rw / "empty").exists()


async def test_host_changes_appear_in_the_guest(shares: Shares) -> None:
    (shares.rw / "from-host.txt").write_text("written on the host\n")
    r = await sh(shares, "cat /mnt/rw/from-host.txt")
    assert r.exit_code == 0 and r.stdout == b"written on the host\n"


async def test_ownership_modes_are_visible_through_stat(shares: Shares) -> None:
    r = await sh(shares, "stat -c %u:%g /mnt/owners/owned /mnt/ro/readme.txt")
    owned = (shares.owners / "owned").stat()
    assert owned.st_uid == (1234 if os.geteuid() == 0 else os.geteuid())
    passthrough = f"{owned.st_uid}:{owned.st_gid}".encode()
    assert r.stdout.split() == [passthrough, b"0:0"]  # passthrough, squash to root
    owner = shares.rw.stat().st_uid
    assert (
        await sh(shares, "chown 42:42 /mnt/rw && stat -c %u:%g /mnt/rw")
    ).stdout.strip() == b"0:0"
    assert shares.rw.stat().st_uid == owner  # squash: chown succeeds without effect
    r = await sh(shares, "mkdir -p /mnt/dyn && mount -t virtiofs dyn /mnt/dyn && touch /mnt/dyn/f")
    assert r.exit_code == 0
    probe = (
        "import os\nos.setgid(2000)\nos.setuid(1000)\nst = os.stat('/mnt/dyn/f')\n"
        "raise SystemExit(0 if (st.st_uid, st.st_gid) == (1000, 2000) else 1)\n"
    )
    await shares.agent.write_file("/tmp/dyn.py", probe.encode())
    assert (await sh(shares, f"{PY} /tmp/dyn.py")).exit_code == 0  # dynamic caller
    assert (await sh(shares, "stat -c %u /mnt/dyn/f")).stdout.strip() == b"0"
    assert (shares.dyn / "f").exists()


async def test_hundred_megabyte_round_trip(shares: Shares) -> None:
    block = os.urandom(1 << 20)
    with open(shares.rw / "big.in", "wb") as f:
        for i in range(100):
            f.write(block[i:] + block[:i])
    want = hashlib.sha256((shares.rw / "big.in").read_bytes()).hexdigest()
    r = await sh(
        shares, "sha256sum /mnt/rw/big.in && cp /mnt/rw/big.in /mnt/rw/big.out", timeout=600
    )
    assert r.exit_code == 0 and r.stdout.split()[0].decode() == want
    assert hashlib.sha256((shares.rw / "big.out").read_bytes()).hexdigest() == want
    (shares.rw / "big.in").unlink()
    (shares.rw / "big.out").unlink()


async def test_host_and_guest_write_different_files_at_once(shares: Shares) -> None:
    (shares.rw / "both").mkdir()
    guest = asyncio.ensure_future(
        sh(shares, "cd /mnt/rw/both && for i in $(seq 1 60); do printf guest$i > g$i; done")
    )
    for i in range(1, 61):
        (shares.rw / "both" / f"h{i}").write_text(f"host{i}")
        await asyncio.sleep(0.005)
    assert (await guest).exit_code == 0
    r = await sh(shares, "cd /mnt/rw/both && for i in $(seq 1 60); do cat h$i; echo; done")
    assert r.stdout.split() == [f"host{i}".encode() for i in range(1, 61)]
    for i in range(1, 61):
        assert (shares.rw / "both" / f"g{i}").read_text() == f"guest{i}"


async def test_git_commit_inside_the_share(shares: Shares) -> None:
    (shares.rw / "repo").mkdir()
    (shares.rw / "repo" / "main.py").write_text("print('hi')\n")
    (shares.rw / "repo" / "pkg").mkdir()
    (shares.rw / "repo" / "pkg" / "mod.py").write_text("X = 1\n")
    git = f"LD_LIBRARY_PATH={TOOLS}/lib {TOOLS}/bin/git -c user.name=t -c user.email=t@e"
    r = await sh(
        shares,
        f"cd /mnt/rw/repo && {git} init -q && {git} add . && {git} commit -q -m 'from the guest'",
    )
    assert r.exit_code == 0, r.stderr
    host = subprocess.run(
        ["git", "-C", str(shares.rw / "repo"), "log", "--format=%s"], capture_output=True, text=True
    )
    assert host.stdout.strip() == "from the guest"
    fsck = subprocess.run(
        ["git", "-C", str(shares.rw / "repo"), "fsck", "--strict"], capture_output=True, text=True
    )
    assert fsck.returncode == 0, fsck.stderr
    files = subprocess.run(
        ["git", "-C", str(shares.rw / "repo"), "ls-files"], capture_output=True, text=True
    ).stdout.split()
    assert files == ["main.py", "pkg/mod.py"]


@pytest.fixture
def swapper(shares: Shares) -> Iterator[Path]:
    """A host thread swapping rw/swap between a real directory and a link to outside."""
    swap, real = shares.rw / "swap", shares.rw / "real"
    real.mkdir()
    (real / "secret").write_text("inside\n")
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            tmp = shares.rw / "swap.new"
            if swap.is_symlink():
                tmp.symlink_to("real")
            else:
                tmp.symlink_to(shares.outside)
            os.replace(tmp, swap)

    os.symlink("real", swap)
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield swap
    stop.set()
    thread.join()


async def test_escape_attempts_fail_and_outside_stays_untouched(
    shares: Shares, swapper: Path
) -> None:
    outside_before = tree_state(shares.outside)
    os.symlink(shares.outside, shares.rw / "abs")
    os.symlink("../outside", shares.rw / "rel")
    attempts = [
        "cat /mnt/rw/../outside/secret",
        "cat /mnt/rw/abs/secret",
        "cat /mnt/rw/rel/secret",
        "echo pwned > /mnt/rw/abs/secret",
        "echo pwned > /mnt/rw/rel/secret",
        "ln -s ../../../../../outside /mnt/rw/up && cat /mnt/rw/up/secret",
        "ln /etc/passwd /mnt/rw/pw",
        "ln /mnt/ro/readme.txt /mnt/rw/cross",
        "mknod /mnt/rw/null c 1 3",
    ]
    for cmd in attempts:
        r = await sh(shares, cmd)
        assert r.exit_code != 0, cmd
        assert b"host secret" not in r.stdout
    # The swap race: the guest keeps opening swap/secret while the host flips the link.
    loop = (
        "for i in $(seq 1 300); do cat /mnt/rw/swap/secret 2>/dev/null; "
        "echo pwned 2>/dev/null > /mnt/rw/swap/secret; done; true"
    )
    r = await sh(shares, loop, timeout=300)
    assert r.exit_code == 0
    assert b"host secret" not in r.stdout
    assert tree_state(shares.outside) == outside_before
    assert not (shares.rw / "null").exists() and not (shares.rw / "pw").exists()
