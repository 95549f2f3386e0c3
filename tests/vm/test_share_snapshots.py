"""Sandboxes with shared folders through snapshots, forks, pools and templates.

QEMU 8.2 and later carry vhost-user-fs state in the migration stream: there a snapshot
keeps the guest's open files on the share, and each copy goes on with the host folder.
Older QEMU refuses clearly, and such sandboxes boot cold."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import capsa
from capsa import MountMode
from capsa.backends.qemu.backend import find_qemu
from capsa.backends.qemu.probe import probe
from capsa.backends.qemu.snapshot import SHARE_MIGRATION
from capsa.config import host_arch
from tests.framework.factory import VmFactory

pytestmark = pytest.mark.vm

SHARES_MIGRATE = probe(find_qemu(host_arch())).version >= SHARE_MIGRATION
needs_share_migration = pytest.mark.skipif(
    not SHARES_MIGRATE, reason="QEMU < 8.2 cannot migrate vhost-user-fs (refusal tested)"
)

# A guest process that holds the share's log open, writes one line, then waits for a
# go file and writes another through the same descriptor.
WRITER = (
    "sh -c 'exec 3>>/mnt/s/log; echo one >&3; "
    "while [ ! -e /tmp/go ]; do sleep 0.05; done; echo two >&3; touch /tmp/done' "
    ">/dev/null 2>&1 &"
)


@pytest.fixture
async def source(tmp_path: Path) -> AsyncIterator[tuple[capsa.Sandbox, Path]]:
    folder = tmp_path / "share"
    folder.mkdir()
    (folder / "host.txt").write_text("from the host\n")
    builder = capsa.sandbox().share(folder, "/mnt/s", MountMode.READ_WRITE).template(False)
    async with await builder.build() as sb:
        yield sb, folder


async def _wait_for(agent: capsa.AgentClient, path: str) -> None:
    for _ in range(200):
        if await agent.exists(path):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} never appeared in the guest")


async def _start_writer(agent: capsa.AgentClient, folder: Path) -> None:
    """WRITER in the guest, once its first line is in the host's file."""
    assert (await agent.exec(WRITER)).exit_code == 0
    for _ in range(100):
        if (folder / "log").exists() and (folder / "log").read_text() == "one\n":
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the writer's first line never reached {folder / 'log'}")


async def test_refused_where_qemu_cannot_migrate_shares(
    source: tuple[capsa.Sandbox, Path], tmp_path: Path
) -> None:
    if SHARES_MIGRATE:
        pytest.skip("this QEMU migrates vhost-user-fs (tested below)")
    sb, _ = source
    with pytest.raises(capsa.UnsupportedFeature, match=r"vhost-user-fs.*8\.2"):
        await sb.pause(tmp_path / "paused")
    assert not (tmp_path / "paused").exists()
    agent = await sb.agent()  # the refusal left it running
    assert (await agent.exec("cat /mnt/s/host.txt")).stdout == b"from the host\n"


@needs_share_migration
async def test_a_restored_copy_goes_on_writing_through_an_open_file(
    source: tuple[capsa.Sandbox, Path], vm_factory: VmFactory
) -> None:
    sb, folder = source
    agent = await sb.agent()
    await _start_writer(agent, folder)
    clone = await vm_factory.restored(sb)
    clone_agent = await clone.agent()
    await clone_agent.write_file("/tmp/go", b"")
    await _wait_for(clone_agent, "/tmp/done")
    assert (folder / "log").read_text() == "one\ntwo\n"  # the clone's saved descriptor
    # The copy sees the host folder as it is now, both ways.
    (folder / "later.txt").write_text("written after the snapshot\n")
    r = await clone_agent.exec("cat /mnt/s/later.txt && echo clone > /mnt/s/from-clone")
    assert r.exit_code == 0 and r.stdout == b"written after the snapshot\n"
    assert (folder / "from-clone").read_text() == "clone\n"
    assert (await agent.exec("test -e /tmp/done")).exit_code == 1  # the source waits on


@needs_share_migration
async def test_forks_each_write_to_the_host_folder(source: tuple[capsa.Sandbox, Path]) -> None:
    sb, folder = source
    await (await sb.agent()).exec("echo base > /mnt/s/base")
    clones = await sb.fork(2)
    try:
        for i, clone in enumerate(clones):
            r = await (await clone.agent()).exec(f"cat /mnt/s/base && echo {i} > /mnt/s/fork-{i}")
            assert r.exit_code == 0 and r.stdout == b"base\n"
    finally:
        await asyncio.gather(*(c.kill() for c in clones))
    assert [(folder / f"fork-{i}").read_text() for i in range(2)] == ["0\n", "1\n"]


@needs_share_migration
async def test_a_paused_sandbox_resumes_in_another_process_with_its_share(
    source: tuple[capsa.Sandbox, Path], tmp_path: Path
) -> None:
    from tests.vm.test_pause import resume_elsewhere

    sb, folder = source
    agent = await sb.agent()
    await _start_writer(agent, folder)
    await sb.pause(tmp_path / "paused")
    assert sb.status().is_finished
    out = resume_elsewhere(
        tmp_path / "paused", "await agent.write_file('/tmp/go', b'')\nawait wait_for('/tmp/done')"
    )
    assert out["ok"] is True
    assert (folder / "log").read_text() == "one\ntwo\n"
    assert not (tmp_path / "paused").exists()


@needs_share_migration
async def test_a_template_with_a_share_serves_each_sandbox_its_own_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vm_factory: VmFactory
) -> None:
    monkeypatch.setenv("CAPSA_TEMPLATE_DIR", str(tmp_path / "templates"))
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        folder.mkdir()
        (folder / "name").write_text(folder.name)
    first, second = [
        await vm_factory.sandbox(capsa.sandbox().share(f, "/mnt/s", MountMode.READ_WRITE))
        for f in folders
    ]
    assert first.template is None and second.template is not None  # one template for both
    for sb, folder in ((first, folders[0]), (second, folders[1])):
        agent = await sb.agent()
        r = await agent.exec("ls /mnt/s && cat /mnt/s/name && echo hi > /mnt/s/out")
        assert r.exit_code == 0 and r.stdout == f"name\n{folder.name}".encode()
        assert (folder / "out").read_text() == "hi\n"


async def test_a_share_whose_folder_vanished_is_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "gone"
    folder.mkdir()
    builder = capsa.sandbox().share(folder, "/mnt/s").template(False)
    folder.rmdir()
    with pytest.raises(capsa.InvalidConfig, match="gone"):
        await builder.build()


@needs_share_migration
async def test_restoring_after_the_share_folder_vanished_is_a_clear_error(
    source: tuple[capsa.Sandbox, Path], tmp_path: Path
) -> None:
    sb, folder = source
    snap = await sb.snapshot(tmp_path / "snap")
    (folder / "host.txt").unlink()
    folder.rmdir()
    with pytest.raises(capsa.CapsaError, match="share"):
        await capsa.restore(snap.path)
