"""Metrics that move with what the guest does, and sandboxes that end themselves: a
lifetime, an idle timeout that a running command holds off."""

from __future__ import annotations

import time

import pytest

import capsa
from tests.framework.factory import VmFactory
from tests.vm.netkit import guest_address

pytestmark = pytest.mark.vm


async def test_metrics_follow_memory_disk_cpu_and_network(vm_factory: VmFactory) -> None:
    builder = capsa.sandbox().image("debian").network(capsa.NetworkMode.user_nat())
    sb = await vm_factory.sandbox(builder)
    agent = await sb.agent(timeout=300)
    await guest_address(agent)
    route = await agent.exec("ip -4 route show default", check=True)
    gateway = route.stdout.split()[2].decode()
    base = await sb.metrics()
    assert base.memory_total > 256 << 20 and 0 < base.memory_used < base.memory_total
    assert base.cpus == 1 and base.uptime > 0

    async with await sb.code_context() as ctx:
        await ctx.run("blob = b'x' * (120 << 20)")  # resident, not lazily zero-mapped
        held = await sb.metrics()
        assert held.memory_used - base.memory_used > 100 << 20
    await agent.exec("head -c 30000000 /dev/urandom > /root/fill", check=True)
    filled = await sb.metrics()
    assert filled.disk_used - base.disk_used >= 29_000_000  # the writable layer

    send = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"for _ in range(50): s.sendto(b'x' * 1000, ('{gateway}', 9))"
    )
    before = await sb.metrics()
    await agent.exec("python3").arg("-c").arg(send).check().run()
    await agent.exec("timeout 2 sh -c 'while :; do :; done'")
    after = await sb.metrics()
    assert after.net_tx_bytes - before.net_tx_bytes >= 50_000
    assert after.cpu_seconds - before.cpu_seconds > 1.0 and after.cpu_percent > 40


async def test_a_lifetime_ends_the_sandbox_and_says_so(vm_factory: VmFactory) -> None:
    sb = await vm_factory.sandbox(capsa.sandbox().lifetime(4))
    agent = await sb.agent()
    started = time.monotonic()
    with pytest.raises(capsa.AgentError):
        await agent.exec("sleep 60")  # cut short by the lifetime, whatever it was doing
    status = await sb.wait(timeout=30)
    assert status.is_finished and time.monotonic() - started < 20
    assert sb.expired is not None and "lifetime of 4s" in str(sb.expired)
    with pytest.raises(capsa.SandboxExpired, match="lifetime"):
        await sb.agent()


async def test_an_idle_timeout_waits_for_running_work(vm_factory: VmFactory) -> None:
    sb = await vm_factory.sandbox(capsa.sandbox().idle_timeout(2))
    agent = await sb.agent()
    r = await agent.exec("sleep 4; echo worked")  # silent for longer than the timeout
    assert r.exit_code == 0 and r.stdout == b"worked\n"
    background = await agent.start(["sleep", "600"], background=True)  # followed, not use
    assert not background.keeps_busy
    await sb.wait(timeout=30)
    assert sb.expired is not None and "idle for 2s" in str(sb.expired)


def test_limits_are_checked_at_build_time() -> None:
    for bad in (0, -1, float("nan"), "5", True):
        with pytest.raises(capsa.InvalidConfig, match="lifetime"):
            capsa.sandbox().lifetime(bad)  # type: ignore[arg-type]
        with pytest.raises(capsa.InvalidConfig, match="idle_timeout"):
            capsa.sandbox().idle_timeout(bad)  # type: ignore[arg-type]


async def test_a_writable_layer_on_its_own_disk_holds_more_than_ram(
    vm_factory: VmFactory,
) -> None:
    from capsa._util.rundir import runtime_base

    builder = capsa.sandbox().image("debian").memory_mb(256).disk_size("2G")
    sb = await vm_factory.sandbox(builder)
    assert sb.template is None  # a writable disk boots
    (scratch,) = list(runtime_base().glob("capsa-rw-*.ext4"))
    agent = await sb.agent(timeout=300)
    usage = await sb.metrics()
    assert 1.9e9 < usage.disk_total <= 2 << 30
    # More than all of the guest's RAM: it could not be in a tmpfs.
    r = await agent.exec("dd if=/dev/zero of=/root/big bs=1M count=300 && sync", timeout=300)
    assert r.exit_code == 0, r.stderr
    assert (await sb.metrics()).disk_used - usage.disk_used >= 300 << 20
    assert scratch.stat().st_blocks * 512 >= 300 << 20  # sparse on the host, filled now
    await sb.kill()
    assert not scratch.exists()  # removed with its sandbox


def test_disk_size_is_checked_at_build_time() -> None:
    for bad in ("lots", "1K", "99T", 0, True):
        with pytest.raises(capsa.InvalidConfig, match="disk size"):
            capsa.sandbox().disk_size(bad)  # type: ignore[arg-type]
