"""Pools of pre-booted VMs and sandboxes (the first member boots, the rest are restored)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import capsa
from capsa.images.kernel import KernelImage
from capsa.images.shell import MARKER

pytestmark = pytest.mark.vm


async def _until(predicate: object, timeout: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


async def test_sandbox_pool_reserve_release_refill_close() -> None:
    pool = await capsa.sandbox().pool(2)
    try:
        first = await pool.reserve(timeout=60)
        sb = first.member
        assert (await (await sb.agent()).exec("echo $((3 * 5))")).stdout == b"15\n"
        await _until(lambda: _eq(pool.available_count(), 1))
        second = pool.try_reserve()
        with pytest.raises(capsa.PoolEmpty):
            pool.try_reserve()
        async with second as sb2:
            assert sb2 is not sb and (await sb2.agent()).exec is not None
        await first.release()
        assert sb.status().is_finished  # a released member is destroyed, never reused
        await _until(lambda: _eq(pool.available_count(), 2))
        assert pool.failures == []
    finally:
        await pool.close()
    with pytest.raises(capsa.PoolShutdown):
        pool.try_reserve()


async def _eq(coro: object, value: int) -> bool:
    return await coro == value  # type: ignore[misc]


async def test_close_wakes_waiters_and_destroys_reserved_members() -> None:
    pool = await capsa.sandbox().pool(1)
    held = await pool.reserve(timeout=60)
    waiter = asyncio.ensure_future(pool.reserve())
    await asyncio.sleep(0.2)
    await pool.close()
    with pytest.raises(capsa.PoolShutdown):
        await waiter
    assert held.member.status().is_finished


@pytest.mark.parametrize("form", ["vm(boot).pool(n)", "pool(boot).build(n)"])
async def test_vm_pool_members_are_booted(shell_boot: capsa.LinuxDirectBoot, form: str) -> None:
    if form == "vm(boot).pool(n)":
        starting = capsa.vm(shell_boot).console_enabled().timeout(60).ready_when(MARKER).pool(1)
    else:
        starting = capsa.pool(shell_boot).console_enabled().timeout(60).ready_when(MARKER).build(1)
    # Used directly as a context manager: the pool is closed when the block ends.
    async with starting as pool, await pool.reserve(timeout=60) as vm:
        console = await vm.console()
        assert await console.exec("echo $((4 * 4))", timeout=20) == "16\n"


async def test_failures_are_reported_not_swallowed(kernel: KernelImage, shell_initrd: Path) -> None:
    # The shell image has no agent: every member times out and the pool says so. Waiting
    # for a full pool, build() raises; without waiting, the failures are kept.
    builder = capsa.sandbox().kernel(kernel.path).initrd(shell_initrd).timeout(4)
    with pytest.raises(capsa.BootTimeout, match="not ready within 4s"):
        await builder.pool(1)
    async with await builder.pool(1, wait=False) as pool:
        await _until(lambda: _true(len(pool.failures) >= 1), timeout=60)
        assert isinstance(pool.failures[0], capsa.BootTimeout)
        with pytest.raises(capsa.PoolEmpty):
            await pool.reserve(timeout=0.5)


async def _true(value: bool) -> bool:
    return value


def test_size_zero_is_invalid() -> None:
    with pytest.raises(capsa.InvalidConfig, match="at least 1"):
        asyncio.run(capsa.sandbox().pool(0))


async def test_waiting_reserve_is_served_by_the_replacement_and_three_at_once() -> None:
    async with await capsa.sandbox().pool(3) as pool:
        held = [await pool.reserve(timeout=120) for _ in range(3)]
        with pytest.raises(capsa.PoolEmpty):
            pool.try_reserve()
        waiter = asyncio.ensure_future(pool.reserve(timeout=120))
        await asyncio.sleep(0.2)
        assert not waiter.done()
        await held[0].release()
        replacement = await waiter
        assert replacement.member not in [h.member for h in held]
        agents = [await h.member.agent() for h in (replacement, *held[1:])]
        results = await asyncio.gather(*(a.exec("echo $$") for a in agents))
        assert all(r.exit_code == 0 for r in results)
        for h in (replacement, *held[1:]):
            await h.release()
        assert pool.failures == []
