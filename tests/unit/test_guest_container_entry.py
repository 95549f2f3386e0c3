"""How the agent enters a container root for a command: busybox's nsenter when it behaves
exactly as chroot + chdir would, else the Python path (``Container.enter``)."""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from capsa.guest import agent, executable
from capsa.guest.agent import Container
from capsa.guest.executable import judge, resolve_in_root

PATH = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
LOADER = "/lib64/ld-linux.so.2"


def elf(
    loader: str | None = None,
    *,
    machine: bytes | None = None,
    kind: int = 2,
    phoff: int = 64,
    phentsize: int = 56,
    phnum: int | None = None,
    interp: bytes | None = None,
) -> bytes:
    """A 64-bit ELF for this machine (or ``machine``) of type ``kind`` (ET_EXEC), with a
    ``PT_LOAD`` and, if ``loader`` (or raw ``interp``) is given, a ``PT_INTERP`` naming it."""
    with open(sys.executable, "rb") as f:
        ident = f.read(20)
    if interp is None and loader is not None:
        interp = loader.encode() + b"\0"
    headers = [struct.pack("<IIQQQQQQ", 1, 5, 0, 0, 0, 64, 64, 4096)]
    at = phoff + 2 * 56
    if interp is not None:
        headers.append(struct.pack("<IIQQQQQQ", 3, 4, at, at, at, len(interp), len(interp), 1))
    header = bytearray(64)
    header[:6] = ident[:6]
    header[6] = 1
    struct.pack_into("<H", header, 16, kind)
    header[18:20] = machine or ident[18:20]
    count = len(headers) if phnum is None else phnum
    struct.pack_into("<Q", header, 32, phoff)
    struct.pack_into("<HHH", header, 54, phentsize, count, 0)
    table = b"".join(headers).ljust(2 * 56, b"\0")
    return bytes(header).ljust(phoff, b"\0") + table + (interp or b"")


def program(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    path.chmod(0o755)


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"")
    busybox.chmod(0o755)
    monkeypatch.setattr(agent, "BUSYBOX", str(busybox))
    monkeypatch.setattr(os, "getgroups", lambda: [0])  # the agent's own, as in the guest
    image = tmp_path / "image"
    for d in ("usr/bin", "usr/share", "root", "etc/alternatives", "tmp"):
        (image / d).mkdir(parents=True)
    (image / "bin").symlink_to("usr/bin")
    # The loader as Debian has it: /lib64 -> usr/lib64, and an absolute link from there.
    (image / "usr/lib64").mkdir()
    (image / "usr/lib").mkdir()
    (image / "lib64").symlink_to("usr/lib64")
    (image / "usr/lib64/ld-linux.so.2").symlink_to("/usr/lib/ld-linux.so.2")
    program(image / "usr/lib/ld-linux.so.2", elf())
    for name in ("sh", "real-awk"):
        program(image / "usr/bin" / name, elf(LOADER))
    (image / "usr/bin/data").write_bytes(b"")  # not executable
    (image / "etc/alternatives/awk").symlink_to("/usr/bin/real-awk")  # absolute
    (image / "usr/bin/awk").symlink_to("/etc/alternatives/awk")
    (image / "tmp/share").symlink_to("/usr/share")  # absolute
    (image / "tmp/up").symlink_to("../usr/share")  # relative, stays inside
    return image


def container(root: Path, uid: int = 0, gid: int = 0, groups: list[int] | None = None) -> Container:
    return Container(str(root), dict(PATH), "/root", uid, gid, groups or [])


def test_root_commands_enter_through_nsenter_in_their_directory(root: Path) -> None:
    argv, cwd = container(root).entry(["/bin/sh", "-c", "true"], None) or ([], "")
    assert argv == [agent.BUSYBOX, "nsenter", f"-r{root}", "-F", "--", "/bin/sh", "-c", "true"]
    assert cwd == str(root / "root")
    assert container(root).entry(["/bin/sh"], "/usr/share") == (
        [agent.BUSYBOX, "nsenter", f"-r{root}", "-F", "--", "/bin/sh"],
        str(root / "usr/share"),
    )


@pytest.mark.parametrize(
    ("cwd", "where"),
    [
        ("/tmp/up", "usr/share"),  # a relative symlink
        ("/tmp/share", "usr/share"),  # an absolute one: the chroot resolves it in the image
        ("/../../..", ""),  # `..` above the root stays at the root
        ("/usr/bin/../share/", "usr/share"),
    ],
)
def test_directories_resolve_as_in_the_chroot(root: Path, cwd: str, where: str) -> None:
    entry = container(root).entry(["/bin/sh"], cwd)
    assert entry is not None and entry[1] == str(root / where)


def test_programs_resolve_as_in_the_chroot(root: Path) -> None:
    # Debian's alternatives: absolute links, which the kernel follows inside the chroot.
    assert container(root).entry(["/usr/bin/awk"], None) is not None
    # A relative link out of the image and back in lands elsewhere in the chroot.
    (root / "tmp/out").symlink_to(f"../../{root.name}/usr/bin/sh")
    assert (root / "tmp/out").resolve() == root / "usr/bin/sh"
    assert container(root).entry(["/tmp/out"], None) is None


@pytest.mark.parametrize(
    ("argv", "cwd"),
    [
        (["/bin/sh"], "relative"),
        (["/bin/sh"], "/missing"),  # enter() falls back to / (and nsenter would fail)
        (["/bin/sh"], "/usr/bin/sh"),  # not a directory
        (["sh"], None),  # busybox would run its own sh applet, not the image's
        (["/usr/bin/no-such-program"], None),  # enter() reports the error as the agent's
        (["/usr/bin/data"], None),  # not executable
        (["./sh"], None),
        (["/usr/bin/sh/"], None),  # ENOTDIR for the kernel
        (["/usr/bin/data/../sh"], None),
        (["/usr/bin/sh/."], None),
    ],
)
def test_everything_else_takes_the_chroot_path(root: Path, argv: list[str], cwd: str) -> None:
    assert container(root).entry(argv, cwd) is None


def test_other_users_and_groups_take_the_chroot_path(root: Path) -> None:
    assert container(root, uid=1000, gid=1000).entry(["/bin/sh"], None) is None
    assert container(root, groups=[0, 27]).entry(["/bin/sh"], None) is None
    assert container(root, groups=[0]).entry(["/bin/sh"], None) is not None


def test_an_agent_with_other_groups_takes_the_chroot_path(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "getgroups", lambda: [0, 4])
    assert container(root).entry(["/bin/sh"], None) is None


def test_without_busybox_it_takes_the_chroot_path(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent, "BUSYBOX", os.devnull + "-missing")
    assert container(root).entry(["/bin/sh"], None) is None


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("static", elf()),
        ("dynamic-pie", elf(LOADER, kind=3)),
        ("headers-past-the-first-page", elf(LOADER, phoff=8192)),
        ("loader-name-then-nul", elf(interp=LOADER.encode() + b"\0junk\0")),
        ("script", b"#!/bin/sh -e\necho\n"),
        ("spaced", b"#! \t/usr/bin/sh\n"),
        ("tab-before-argument", b"#!/usr/bin/sh\t-e\n"),
        ("nul-after-name", b"#!/bin/sh\0ignored\n"),
        ("no-newline", b"#!/bin/sh"),
    ],
)
def test_programs_exec_will_take_enter_through_nsenter(
    root: Path, name: str, content: bytes
) -> None:
    program(root / "usr/bin" / name, content)
    assert container(root).entry([f"/usr/bin/{name}"], None) is not None


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty", b""),
        ("text", b"echo no interpreter line\n"),  # a shell runs it; execve refuses it
        ("no-interpreter", b"#!\n"),
        ("blank-interpreter", b"#!  \t \n"),
        ("missing-interpreter", b"#!/usr/bin/python9\n"),
        ("relative-interpreter", b"#!sh\n"),
        ("crlf", b"#!/bin/sh\r\necho\r\n"),  # the kernel looks for "/bin/sh\r"
        ("cut-off-name", b"#!/" + b"a" * 300),  # the kernel reads 256 bytes: ENOEXEC
        ("script-interpreter", b"#!/usr/bin/script\n"),  # Linux nests; enter() judges
        ("interpreter-not-a-directory", b"#!/bin/sh/\n"),
        ("missing-loader", elf("/lib/ld-musl-x86_64.so.1")),
        ("relative-loader", elf("ld-linux.so.2")),
        ("empty-loader-name", elf(interp=b"\0\0")),
        ("loader-name-without-nul", elf(interp=LOADER.encode())),
        ("other-machine", elf(LOADER, machine=b"\xff\x7f")),
        ("relocatable", elf(LOADER, kind=1)),
        ("core", elf(LOADER, kind=4)),
        ("no-program-headers", elf(phnum=0)),
        ("other-header-size", elf(LOADER, phentsize=64)),
        ("table-past-the-end", elf(LOADER, phnum=40)),
        ("truncated", elf(LOADER)[:40]),
    ],
)
def test_programs_exec_would_refuse_take_the_chroot_path(
    root: Path, name: str, content: bytes
) -> None:
    """Through nsenter, exec failing would be busybox's exit 127, not the agent's error."""
    program(root / "usr/bin/script", b"#!/bin/sh\n")
    program(root / "usr/bin" / name, content)
    assert container(root).entry([f"/usr/bin/{name}"], None) is None


@pytest.mark.parametrize(
    "loader",
    [b"", b"#!/bin/sh\n", elf(kind=1), elf(machine=b"\xff\x7f"), elf()[:63]],
)
def test_a_loader_the_kernel_would_not_map_takes_the_chroot_path(root: Path, loader: bytes) -> None:
    program(root / "usr/lib/ld-linux.so.2", loader)
    assert container(root).entry(["/bin/sh"], None) is None


def test_a_loader_that_is_not_executable_takes_the_chroot_path(root: Path) -> None:
    (root / "usr/lib/ld-linux.so.2").chmod(0o644)
    assert container(root).entry(["/bin/sh"], None) is None


def test_a_fifo_in_place_of_the_program_does_not_block(root: Path) -> None:
    os.mkfifo(root / "usr/bin/fifo")
    (root / "usr/bin/fifo").chmod(0o755)
    assert container(root).entry(["/usr/bin/fifo"], None) is None


def test_paths_resolve_as_after_chroot(root: Path) -> None:
    inside = str(root)
    assert resolve_in_root(inside, LOADER) == str(root / "usr/lib/ld-linux.so.2")
    assert resolve_in_root(inside, "/../../usr/./bin/../bin/sh") == str(root / "usr/bin/sh")
    assert resolve_in_root(inside, "/tmp/share") == str(root / "usr/share")  # absolute link
    assert resolve_in_root(inside, "/tmp/share/") == str(root / "usr/share")
    assert resolve_in_root(inside, "/usr/bin/awk") == str(root / "usr/bin/real-awk")
    assert resolve_in_root(inside, "/") == inside
    for refused in ("/usr/missing/sh", "/usr/bin/sh/", "/usr/bin/sh/.", "/bin/data/../sh"):
        assert resolve_in_root(inside, refused) is None, refused
    (root / "tmp/loop").symlink_to("/tmp/loop")
    assert resolve_in_root(inside, "/tmp/loop") is None
    (root / "tmp/file-dir").symlink_to("/usr/bin/sh/")  # a link to a file, with a "/"
    assert resolve_in_root(inside, "/tmp/file-dir") is None
    assert resolve_in_root(inside, "/tmp/a\0b") is None


@pytest.mark.usefixtures("root")  # its busybox and the agent's groups
def test_this_hosts_own_programs_enter_through_nsenter() -> None:
    """The host's userland as an image: real ELF programs, their loader through the
    distribution's own links, and a real "#!" script."""
    host = Container("/", dict(PATH), "/", 0, 0, [])
    for argv in (["/bin/sh", "-c", "true"], ["/usr/bin/env"], ["/usr/bin/ldd"]):  # ldd: "#!"
        assert host.entry(argv, None) is not None, argv


def test_walks_the_kernel_refuses_or_that_take_long_are_declined(root: Path) -> None:
    inside = str(root)
    assert resolve_in_root(inside, "/." * 2100 + "/tmp") is None  # ENAMETOOLONG
    (root / "tmp/long").symlink_to("/" + "./" * 1100 + "usr")  # one link of 1 100 steps
    assert resolve_in_root(inside, "/tmp/long") is None
    assert resolve_in_root(inside, "/" + "./" * 900 + "usr") == str(root / "usr")
    # A link in /proc leads where the kernel says (/proc/1/root is another root), not to
    # where its text points from the agent's side.
    (root / "proc").mkdir()
    (root / "proc/self").symlink_to("/usr")
    assert resolve_in_root(inside, "/proc/self/bin") is None
    assert container(root).entry(["/bin/sh"], "/proc/self/share") is None


def test_a_device_in_place_of_the_program_is_not_opened(root: Path) -> None:
    try:
        os.mknod(root / "usr/bin/device", 0o755 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs CAP_MKNOD")
    assert container(root).entry(["/usr/bin/device"], None) is None


def test_the_checks_agree_with_this_kernel(tmp_path: Path) -> None:
    """Each file judged against the host's own root, then exec'd by the kernel: where the
    fast path is taken, exec must succeed, and for these plain cases the reverse too."""
    true = Path("/bin/true").read_bytes()
    mutated = bytearray(true)
    mutated[16] = 1  # ET_REL
    cases = {
        "true": true,
        "rel": bytes(mutated),
        "cut": true[:100],
        "script": b"#!/bin/sh\nexit 0\n",
        "tab": b"#!/bin/sh\t-e\nexit 0\n",
        "nul": b"#!/bin/sh\0x\nexit 0\n",
        "crlf": b"#!/bin/sh\r\nexit 0\r\n",
        "long-name": b"#!/" + b"a" * 300,
        "blank": b"#!  \t \n",
        "missing": b"#!/no/such/interpreter\n",
        "plain-text": b"exit 0\n",
    }
    for name, content in cases.items():
        program(tmp_path / name, content)
        predicted = judge("/", str(tmp_path / name)) is not None
        try:
            subprocess.run([str(tmp_path / name)], capture_output=True, timeout=30, check=False)
            ran = True
        except OSError:
            ran = False
        assert predicted == ran, name


def test_verdicts_are_kept_while_the_files_they_read_stay_the_same(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    judge = executable.judge
    monkeypatch.setattr(executable, "judge", lambda r, p: calls.append(p) or judge(r, p))
    box = container(root)
    for _ in range(3):
        assert box.entry(["/bin/sh"], None) is not None
    assert calls == [str(root / "usr/bin/sh")]
    # Any of the files changed: judged again, and refused where exec would refuse.
    (root / "usr/lib/ld-linux.so.2").chmod(0o644)
    assert box.entry(["/bin/sh"], None) is None
    (root / "usr/lib/ld-linux.so.2").chmod(0o755)
    assert box.entry(["/bin/sh"], None) is not None
    (root / "usr/bin/sh").unlink()
    program(root / "usr/bin/sh", b"exit 0\n")
    assert box.entry(["/bin/sh"], None) is None
    assert len(calls) == 4
