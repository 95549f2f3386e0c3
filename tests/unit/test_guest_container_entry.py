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
    argv, cwd = container(root).entry(["sh", "-c", "true"], None, PATH) or ([], "")
    assert argv == [agent.BUSYBOX, "nsenter", f"-r{root}", "-F", "--", "sh", "-c", "true"]
    assert cwd == str(root / "root")
    assert container(root).entry(["/bin/sh"], "/usr/share", PATH) == (
        [agent.BUSYBOX, "nsenter", f"-r{root}", "-F", "--", "/bin/sh"],
        str(root / "usr/share"),
    )
    # A relative symlink that stays in the image resolves the same from both sides.
    entry = container(root).entry(["sh"], "/tmp/up", PATH)
    assert entry is not None and entry[1] == str(root / "usr/share")


@pytest.mark.parametrize(
    ("argv", "cwd"),
    [
        (["sh"], "/tmp/share"),  # an absolute symlink: chroot resolves it in the image
        (["sh"], "/../../.."),  # `..` above the root stays at the root in a chroot
        (["sh"], "relative"),
        (["sh"], "/missing"),  # enter() falls back to / (and nsenter would fail)
        (["awk"], None),  # found through an absolute symlink
        (["no-such-program"], None),  # enter() reports the error as the agent's
        (["data"], None),  # not executable
        (["./sh"], None),
    ],
)
def test_everything_else_takes_the_chroot_path(root: Path, argv: list[str], cwd: str) -> None:
    assert container(root).entry(argv, cwd, PATH) is None


def test_other_users_and_groups_take_the_chroot_path(root: Path) -> None:
    assert container(root, uid=1000, gid=1000).entry(["sh"], None, PATH) is None
    assert container(root, groups=[0, 27]).entry(["sh"], None, PATH) is None
    assert container(root, groups=[0]).entry(["sh"], None, PATH) is not None


def test_without_busybox_it_takes_the_chroot_path(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent, "BUSYBOX", os.devnull + "-missing")
    assert container(root).entry(["sh"], None, PATH) is None
