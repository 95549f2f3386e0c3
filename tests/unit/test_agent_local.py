"""The real guest agent, run on the host as a subprocess, driven by the real host client."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import capsa
from capsa.api.agent import AgentClient


@pytest.fixture
async def agent() -> AsyncIterator[AgentClient]:
    host, guest = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-m", "capsa.guest.agent", "--fd", str(guest.fileno())],
        pass_fds=[guest.fileno()],
    )
    guest.close()
    client = await AgentClient.connect_socket(host)
    await client.wait_ready(10)
    yield client
    await client.close()
    proc.kill()
    proc.wait()


async def test_exec_results(agent: AgentClient) -> None:
    r = await agent.exec("echo out; echo err >&2; exit 42")
    assert (r.stdout, r.stderr, r.exit_code, r.timed_out) == (b"out\n", b"err\n", 42, False)
    r = await agent.exec('printf %s "$A-$B"; pwd', env={"A": "1"}, cwd="/tmp").env("B", "2")
    assert r.stdout == b"1-2/tmp\n"
    assert (await agent.exec("tr a-z A-Z", stdin=b"hello")).stdout == b"HELLO"


async def test_builder_form_runs_without_a_shell(agent: AgentClient) -> None:
    r = await agent.exec("printf").arg("%s|%s").arg("a b").arg("$HOME").run()
    assert r.stdout == b"a b|$HOME"


async def test_timeout_kills_and_is_reported(agent: AgentClient) -> None:
    r = await agent.exec("sleep 30; echo never", timeout=0.5)
    assert r.timed_out and r.exit_code == 128 + 9 and r.stdout == b""


async def test_twenty_concurrent_execs(agent: AgentClient) -> None:
    results = await asyncio.gather(
        *(agent.exec(f"sleep 0.3; echo $(({i} * 7))") for i in range(20))
    )
    assert [r.stdout for r in results] == [f"{i * 7}\n".encode() for i in range(20)]


async def test_streaming_output_arrives_before_exit(agent: AgentClient) -> None:
    proc = await agent.start("echo first; read line; echo got-$line")
    first = await asyncio.wait_for(proc.stdout.__anext__(), 10)
    assert first == b"first\n"
    await proc.write_stdin(b"abc\n")
    await proc.close_stdin()
    rest = b"".join([c async for c in proc.stdout])
    assert rest == b"got-abc\n" and await proc.wait(10) == 0


async def test_kill_a_started_process(agent: AgentClient) -> None:
    proc = await agent.start(["sleep", "60"])
    await proc.kill(15)
    assert await proc.wait(10) == 128 + 15


async def test_pty_shell_and_resize(agent: AgentClient) -> None:
    proc = await agent.start("sh", pty=True, rows=30, cols=100)
    stream = proc.stdout
    await proc.write_stdin(b"stty size; echo $((6 * 7))\n")
    seen = b""
    while b"\n42" not in seen.replace(b"\r", b""):
        seen += await asyncio.wait_for(stream.__anext__(), 10)
    assert b"30 100\n" in seen.replace(b"\r", b"")
    await proc.resize(40, 120)
    await proc.write_stdin(b"stty size; exit 3\n")
    rest = b"".join([c async for c in stream])
    assert b"40 120\n" in rest.replace(b"\r", b"")
    assert await proc.wait(10) == 3


async def test_big_file_round_trip(agent: AgentClient, tmp_path: Path) -> None:
    data = os.urandom(50 * 1024 * 1024)
    target = tmp_path / "big.bin"
    await agent.write_file(str(target), data, mode=0o600)
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert (target.stat().st_mode & 0o777) == 0o600
    assert await agent.read_file(str(target)) == data


async def test_file_operations(agent: AgentClient, tmp_path: Path) -> None:
    d = tmp_path / "a" / "b"
    await agent.mkdir(str(d))
    await agent.write_file(str(d / "f.txt"), b"12345", make_parents=True)
    assert await agent.exists(str(d / "f.txt")) and not await agent.exists(str(d / "nope"))
    st = await agent.stat(str(d / "f.txt"))
    assert st.size == 5 and not st.is_dir
    entries = await agent.list_dir(str(tmp_path / "a"))
    assert [(e.name, e.is_dir) for e in entries] == [("b", True)]
    with pytest.raises(capsa.AgentError) as err:
        await agent.remove(str(tmp_path / "a"))
    assert err.value.errno == 39  # ENOTEMPTY without recursive=True
    await agent.remove(str(tmp_path / "a"), recursive=True)
    assert not (tmp_path / "a").exists()


async def test_errors_carry_errno(agent: AgentClient) -> None:
    with pytest.raises(capsa.AgentError) as err:
        await agent.read_file("/nonexistent/file")
    assert err.value.errno == 2
    with pytest.raises(capsa.AgentError) as err:
        await agent.write_file("/nonexistent/dir/f", b"x")
    assert err.value.errno == 2
    await agent.ping()  # the agent is still fine


async def test_copy_tree_both_ways(agent: AgentClient, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"alpha")
    (src / "sub" / "b.bin").write_bytes(os.urandom(700_000))
    (src / "sub" / "deeper" / "c").write_bytes(b"")
    (src / "link").symlink_to("a.txt")
    (src / "run.sh").write_text("#!/bin/sh\n")
    (src / "run.sh").chmod(0o755)
    guest = tmp_path / "guest-copy"
    await agent.copy_to(src, str(guest))
    back = tmp_path / "back"
    await agent.copy_from(str(guest), back)
    for f in ("a.txt", "sub/b.bin", "sub/deeper/c", "run.sh"):
        assert (back / f).read_bytes() == (src / f).read_bytes()
    assert os.readlink(back / "link") == "a.txt"
    assert (back / "run.sh").stat().st_mode & 0o111


async def test_info(agent: AgentClient) -> None:
    info = await agent.info()
    assert info.cpus >= 1 and info.memory_bytes > 0 and info.uptime > 0
    # The agent runs on this machine here: it must report exactly its mount table (under a
    # chroot, as in CI's fresh Debian root, "/" itself need not be a mount point).
    with open("/proc/mounts") as f:
        expected = {line.split()[1] for line in f if line.strip()}
    assert expected and {m.target for m in info.mounts} == expected


async def test_garbage_on_the_channel_is_a_protocol_error() -> None:
    host, guest = socket.socketpair()
    client = await AgentClient.connect_socket(host)
    guest.sendall(b"\x00\x00\x00\x05\x00\x00\x00\x01{")
    with pytest.raises(capsa.AgentProtocolError):
        await asyncio.wait_for(client.wait_ready(5), 5)
    with pytest.raises(capsa.AgentProtocolError):
        await client.ping()
    guest.close()
    await client.close()


async def test_agent_death_fails_pending_calls(agent: AgentClient) -> None:
    pending = asyncio.ensure_future(agent.exec("sleep 30"))
    await asyncio.sleep(0.3)
    with pytest.raises(capsa.AgentDisconnected):
        await agent.exec("kill -9 $PPID")  # the shell's parent is the agent itself
    with pytest.raises(capsa.AgentDisconnected):
        await asyncio.wait_for(pending, 10)


def test_a_request_without_a_thread_fails_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from capsa.guest.agent import Workers

    ran: list[int] = []
    workers = Workers()

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    with pytest.raises(RuntimeError):
        workers.submit(ran.append, 1)
    monkeypatch.undo()
    workers.submit(ran.append, 2)  # the failed one is not left queued to run later
    for _ in range(200):
        if ran:
            break
        threading.Event().wait(0.01)
    assert ran == [2]
