"""Processes that outlive a call (listed, reattached, bounded buffers, true exit codes),
exec(check=True), and timeouts that end a whole process tree."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import pytest

import capsa

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
async def agent() -> AsyncIterator[capsa.AgentClient]:
    async with await capsa.sandbox().build() as sb:
        yield await sb.agent()


async def _read(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in stream])


async def _info(agent: capsa.AgentClient, pid: int) -> capsa.ProcessInfo:
    (info,) = [p for p in await agent.processes() if p.pid == pid]
    return info


async def test_a_background_process_is_listed_and_reattached(agent: capsa.AgentClient) -> None:
    script = "echo started; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo finished >&2; exit 7"
    first = await agent.start(["sh", "-c", script], background=True)
    pid = first.pid
    await first.detach()  # the process runs on without anyone following it
    info = await _info(agent, pid)
    assert info.running and info.exit_code is None and info.argv == ("sh", "-c", script)
    again = await agent.attach(pid)
    with pytest.raises(capsa.CapsaTimeout):
        await again.wait(timeout=0.5)  # still running: no made-up exit code
    await agent.write_file("/tmp/go", b"")
    out, err, code = await asyncio.gather(_read(again.stdout), _read(again.stderr), again.wait(30))
    assert (out, err, code) == (b"started\n", b"finished\n", 7)
    info = await _info(agent, pid)
    assert not info.running and info.exit_code == 7
    late = await agent.attach(pid)  # after the end: its output and its exit code
    assert await _read(late.stdout) == b"started\n" and await late.wait(10) == 7


async def test_background_output_is_kept_in_a_bounded_ring(agent: capsa.AgentClient) -> None:
    proc = await agent.start(
        ["sh", "-c", "head -c 3145728 /dev/zero | tr '\\0' x"], background=True
    )
    await proc.detach()
    for _ in range(200):
        if not (await _info(agent, proc.pid)).running:
            break
        await asyncio.sleep(0.05)
    attached = await agent.attach(proc.pid)
    kept = await _read(attached.stdout)
    assert await attached.wait(10) == 0
    assert kept == b"x" * (1 << 20)  # the last MiB
    assert attached.dropped == (2 << 20, 0)  # and how much went before it


async def test_signals_and_kill_give_true_exit_codes(agent: capsa.AgentClient) -> None:
    proc = await agent.start(["sleep", "300"], background=True)
    await proc.kill(signal.SIGTERM)
    assert await proc.wait(10) == 128 + signal.SIGTERM
    assert (await _info(agent, proc.pid)).exit_code == 128 + signal.SIGTERM


async def test_check_raises_with_the_exit_code_and_output(agent: capsa.AgentClient) -> None:
    assert (await agent.exec("true", check=True)).exit_code == 0
    with pytest.raises(capsa.ProcessError, match="exited with status 3: bad thing") as caught:
        await agent.exec("echo partial; echo bad thing >&2; exit 3", check=True)
    assert caught.value.exit_code == 3
    assert caught.value.stdout == b"partial\n" and caught.value.stderr == b"bad thing\n"
    with pytest.raises(capsa.ProcessError, match="killed at its timeout") as timed:
        await agent.exec("sleep").arg("30").timeout(1).check().run()
    assert timed.value.timed_out


async def test_a_timeout_ends_the_whole_process_tree(agent: capsa.AgentClient) -> None:
    r = await agent.exec("sleep 301 & sleep 302 & sleep 303", timeout=1)
    assert r.timed_out
    await asyncio.sleep(0.5)
    left = await agent.exec("ps -o args | grep -c '^sleep 30[123]'")
    assert left.stdout.strip() == b"0"


async def test_a_cancelled_exec_ends_its_command(agent: capsa.AgentClient) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(agent.exec("sleep 304"), 1)
    for _ in range(20):
        left = await agent.exec("ps -o args | grep -c '^sleep 304'")
        if left.stdout.strip() == b"0":
            return
        await asyncio.sleep(0.25)
    raise AssertionError("the cancelled command still runs")


async def test_a_background_child_may_write_after_its_command_returned(
    agent: capsa.AgentClient,
) -> None:
    # The command returns (its exit waits a few seconds at most for the child's pipe);
    # the child's late write must not find its pipe closed (SIGPIPE would end it).
    result = await agent.exec("(sleep 8; echo late; touch /tmp/late-write) & sleep 1")
    assert result.exit_code == 0
    for _ in range(60):
        if await agent.exists("/tmp/late-write"):
            return
        await asyncio.sleep(0.25)
    raise AssertionError("the background child did not get past its write")
