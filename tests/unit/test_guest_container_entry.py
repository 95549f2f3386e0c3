"""How the agent enters a container root for a command: busybox's nsenter when it behaves
exactly as chroot + chdir would, else the Python path (``Container.enter``)."""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import pytest

from capsa.guest import agent
from capsa.guest.agent import Container
from capsa.guest.executable import resolve_in_root

PATH = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
LOADER = "/lib64/ld-linux.so.2"


def elf(loader: str | None = None, machine: bytes | None = None, phoff: int = 64) -> bytes:
    """A 64-bit ELF header for this machine (or ``machine``) with a ``PT_INTERP`` naming
    ``loader``, or none (a static program)."""
    with open(sys.executable, "rb") as f:
        ident = f.read(20)
    header = bytearray(64)
    header[:6] = ident[:6]
    header[6] = 1
    header[18:20] = machine or ident[18:20]
    phnum = 0 if loader is None else 1
    struct.pack_into("<QHH", header, 32, phoff, 0, 0)
    struct.pack_into("<HHH", header, 54, 56, phnum, 0)
    if loader is None:
        return bytes(header)
    name = loader.encode() + b"\0"
    at = phoff + 56
    phdr = struct.pack("<IIQQQQQQ", 3, 4, at, at, at, len(name), len(name), 1)
    return bytes(header).ljust(phoff, b"\0") + phdr + name


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
    # A relative symlink that stays in the image resolves the same from both sides.
    entry = container(root).entry(["/usr/bin/sh"], "/tmp/up")
    assert entry is not None and entry[1] == str(root / "usr/share")


@pytest.mark.parametrize(
    ("argv", "cwd"),
    [
        (["/bin/sh"], "/tmp/share"),  # an absolute symlink: chroot resolves it in the image
        (["/bin/sh"], "/../../.."),  # `..` above the root stays at the root in a chroot
        (["/bin/sh"], "relative"),
        (["/bin/sh"], "/missing"),  # enter() falls back to / (and nsenter would fail)
        (["sh"], None),  # busybox would run its own sh applet, not the image's
        (["/usr/bin/awk"], None),  # an absolute symlink
        (["/usr/bin/no-such-program"], None),  # enter() reports the error as the agent's
        (["/usr/bin/data"], None),  # not executable
        (["./sh"], None),
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
        ("script", b"#!/bin/sh -e\necho\n"),
        ("spaced", b"#! \t/usr/bin/sh\n"),
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
        ("missing-interpreter", b"#!/usr/bin/python9\n"),
        ("relative-interpreter", b"#!sh\n"),
        ("script-interpreter", b"#!/usr/bin/script\n"),  # Linux nests; enter() judges
        ("missing-loader", elf("/lib/ld-musl-x86_64.so.1")),
        ("other-machine", elf(LOADER, machine=b"\xff\x7f")),
        ("headers-past-the-head", elf(LOADER, phoff=8192)),
    ],
)
def test_programs_exec_would_refuse_take_the_chroot_path(
    root: Path, name: str, content: bytes
) -> None:
    """Through nsenter, exec failing would be busybox's exit 127, not the agent's error."""
    program(root / "usr/bin/script", b"#!/bin/sh\n")
    program(root / "usr/bin" / name, content)
    assert container(root).entry([f"/usr/bin/{name}"], None) is None


def test_a_loader_that_is_not_executable_takes_the_chroot_path(root: Path) -> None:
    (root / "usr/lib/ld-linux.so.2").chmod(0o644)
    assert container(root).entry(["/bin/sh"], None) is None


def test_paths_resolve_as_after_chroot(root: Path) -> None:
    inside = str(root)
    assert resolve_in_root(inside, LOADER) == str(root / "usr/lib/ld-linux.so.2")
    assert resolve_in_root(inside, "/../../usr/./bin/../bin/sh") == str(root / "usr/bin/sh")
    assert resolve_in_root(inside, "/tmp/share") == str(root / "usr/share")  # absolute link
    assert resolve_in_root(inside, "/usr/bin/awk") == str(root / "usr/bin/real-awk")
    assert resolve_in_root(inside, "/usr/missing/sh") is None
    (root / "tmp/loop").symlink_to("/tmp/loop")
    assert resolve_in_root(inside, "/tmp/loop") is None
    assert resolve_in_root(inside, "/") == inside


def test_this_hosts_own_programs_enter_through_nsenter(root: Path) -> None:
    """The host's userland as an image: real ELF programs, their loader through the
    distribution's own links, and a real "#!" script."""
    host = Container("/", dict(PATH), "/", 0, 0, [])
    for argv in (["/bin/sh", "-c", "true"], ["/usr/bin/env"], ["/usr/bin/ldd"]):
        assert host.entry(argv, None) is not None, argv
