"""Snapshots, restores, clones and fork with real VMs."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import capsa
from capsa import NetworkCluster
from capsa.images.shell import MARKER
from tests.framework.factory import VmFactory
from tests.vm.netkit import guest_address

CLUSTER = f"snap-{os.getpid()}"


@pytest.fixture(scope="module")
async def source() -> AsyncIterator[capsa.Sandbox]:
    """A booted sandbox (its RAM in a shared file) on a shared cluster network, with state
    worth keeping."""
    NetworkCluster.create(CLUSTER, subnet="10.0.9.0/24")
    builder = capsa.sandbox().network(capsa.NetworkMode.cluster(CLUSTER)).template(False)
    try:
        async with await builder.build() as sb:
            agent = await sb.agent()
            r = await agent.exec("echo kept > /tmp/state && (sleep 3600 & echo $! > /tmp/pid)")
            assert r.exit_code == 0
            await guest_address(agent)
            yield sb
    finally:
        NetworkCluster.remove(CLUSTER)


async def test_restore_keeps_guest_state_and_the_source_runs_on(
    source: capsa.Sandbox, tmp_path: Path
) -> None:
    snap = await source.snapshot(tmp_path / "snap")
    files = sorted(p.name for p in snap.path.iterdir())
    assert files == ["qemu.json", "ram", "snapshot.json", "state"]
    assert (snap.path / "state").stat().st_size < 4 << 20  # RAM is not in the state stream
    assert (await (await source.agent()).exec("cat /tmp/state")).stdout == b"kept\n"
    restored = await capsa.restore(snap.path)
    assert isinstance(restored, capsa.Sandbox)
    async with restored:
        agent = await restored.agent()
        r = await agent.exec("cat /tmp/state && kill -0 $(cat /tmp/pid)")
        assert r.exit_code == 0 and r.stdout == b"kept\n"  # tmpfs file and process survive
        guest_now = int((await agent.exec("date +%s")).stdout)
        assert abs(guest_now - time.time()) < 5  # the clock was set, not left in the past
    # State written by one QEMU is never handed to another: refused before anything starts.
    made_by = json.loads((snap.path / "qemu.json").read_text())
    (snap.path / "qemu.json").write_text(json.dumps({**made_by, "version": "7.1.0"}))
    with pytest.raises(capsa.SnapshotError, match=r"made by QEMU 7\.1\.0"):
        await capsa.restore(snap.path)


async def test_clones_are_distinct_machines_that_run_at_once(source: capsa.Sandbox) -> None:
    clones = await source.fork(2)
    try:
        agents = [await c.agent() for c in clones]
        macs, addresses, randoms = [], [], []
        for agent in agents:
            macs.append((await agent.exec("cat /sys/class/net/eth0/address")).stdout.strip())
            addresses.append(await guest_address(agent))
        # Both at once: each draws from its own (reseeded) RNG.
        draws = await asyncio.gather(
            *(a.exec("head -c 32 /dev/urandom | od -An -tx1") for a in agents)
        )
        randoms = [d.stdout for d in draws]
        source_agent = await source.agent()
        source_mac = (await source_agent.exec("cat /sys/class/net/eth0/address")).stdout.strip()
        source_ip = await guest_address(source_agent)
        assert len({*macs, source_mac}) == 3
        assert len({*addresses, source_ip}) == 3
        assert randoms[0] != randoms[1] and all(len(r.split()) == 32 for r in randoms)
        # The switch knows each by its new MAC: they reach each other and the source.
        ping = f"ping -c 2 -W 5 {addresses[1]} && ping -c 2 -W 5 {source_ip}"
        assert (await agents[0].exec(ping, timeout=60)).exit_code == 0
    finally:
        await asyncio.gather(*(c.kill() for c in clones))


async def test_plain_vm_restores_from_a_directory(
    shell_boot: capsa.LinuxDirectBoot, tmp_path: Path
) -> None:
    vm = await capsa.vm(shell_boot).console_enabled().timeout(60).build()
    async with vm:
        console = await vm.console()
        await console.wait_for(MARKER, timeout=60)
        assert await console.exec("echo 42 > /tmp/mark && echo ok", timeout=30) == "ok\n"
        snap = await vm.snapshot(tmp_path / "vm", resume=False)
        assert snap.kind == "vm"
    assert vm.status().is_finished
    restored = await capsa.restore(tmp_path / "vm")
    assert isinstance(restored, capsa.VmHandle)
    async with restored:
        console = await restored.console()
        assert await console.exec("cat /tmp/mark", timeout=30) == "42\n"


async def test_snapshot_refusals_are_clear(tmp_path: Path) -> None:
    (tmp_path / "share").mkdir()
    sb = await capsa.sandbox().share(tmp_path / "share", "/mnt/s").vsock_listen(1024).build()
    async with sb:
        await sb.agent()
        with pytest.raises(capsa.UnsupportedFeature, match="vhost-user"):
            await sb.snapshot(tmp_path / "snap")
        with pytest.raises(capsa.UnsupportedFeature, match="vhost-user"):
            await sb.fork(1)
    assert not (tmp_path / "snap").exists()
    with pytest.raises(capsa.SnapshotError, match="not a capsa snapshot"):
        await capsa.restore(tmp_path)
    with pytest.raises(capsa.InvalidConfig, match="at least 1"):
        await sb.fork(0)


async def test_pool_members_come_from_one_template() -> None:
    pool = await capsa.sandbox().pool(2)
    try:
        assert await pool.available_count() == 2  # build() returns with the pool filled
        async with await pool.reserve(timeout=120) as a, await pool.reserve(timeout=120) as b:
            sources = {m.vm.backend_vm.restore_from for m in (a, b)}  # type: ignore[attr-defined]
            # Both from the template, or (on its first use) its maker and one restore.
            templates = sources - {None}
            assert len(templates) == 1 and next(iter(templates)).parent.name == "templates"
            for member in (a, b):
                agent = await member.agent()
                assert (await agent.exec("echo $((6 * 7))")).stdout == b"42\n"
        replacement = await pool.reserve(timeout=120)
        assert replacement.member.vm.backend_vm.restore_from is not None  # type: ignore[attr-defined]
        await replacement.release()
    finally:
        await pool.close()


async def test_a_restore_rejoins_its_virtual_network_without_being_told(
    vm_factory: VmFactory,
) -> None:
    network = capsa.VirtualNetwork.with_gateway(capsa.Gateway("10.0.11.0/24"))
    source = await vm_factory.sandbox(capsa.sandbox().network(network))
    source_ip = await guest_address(await source.agent())
    clone = await vm_factory.restored(source)  # no network= given
    agent = await clone.agent()
    clone_ip = await guest_address(agent)
    assert clone_ip != source_ip and clone_ip.startswith("10.0.11.")
    assert (await agent.exec(f"ping -c 2 -W 5 {source_ip}", timeout=60)).exit_code == 0


RESTORE_ELSEWHERE = """
import asyncio, json, sys, capsa
async def main():
    async with await capsa.restore(sys.argv[1]) as clone:
        agent = await clone.agent()
        for _ in range(100):
            out = (await agent.exec("ip -4 -o addr show eth0")).stdout.decode().split()
            if "inet" in out:
                break
            await asyncio.sleep(0.1)
        ping = await agent.exec("ping -c 2 -W 5 10.0.9.1", timeout=60)
        state = await agent.exec("cat /tmp/state")
        print(json.dumps({"inet": out[out.index("inet") + 1], "ping": ping.exit_code,
                          "state": state.stdout.decode()}))
asyncio.run(main())
"""


async def test_another_process_restores_the_cluster_from_the_snapshot(
    source: capsa.Sandbox, tmp_path: Path
) -> None:
    snap = await source.snapshot(tmp_path / "snap")
    script = tmp_path / "restore.py"
    script.write_text(RESTORE_ELSEWHERE)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(snap.path), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode == 0
    seen = json.loads(out)
    # That process had no such cluster: it made one from the saved definition.
    assert seen["inet"].startswith("10.0.9.") and seen["inet"].endswith("/24")
    assert seen["ping"] == 0 and seen["state"] == "kept\n"
