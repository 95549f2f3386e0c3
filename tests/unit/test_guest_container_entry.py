"""How the agent enters a container root for a command: busybox's nsenter when it behaves
exactly as chroot + chdir would, else the Python path (``Container.enter``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from capsa.guest import agent
from capsa.guest.agent import Container

PATH = {"PATH": "/usr/local/bin:/usr/bin:/bin"}


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
    for name in ("sh", "real-awk"):
        (image / "usr/bin" / name).write_bytes(b"")
        (image / "usr/bin" / name).chmod(0o755)
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
