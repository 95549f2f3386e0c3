"""The sandbox agent tests, ported to ``capsa.sync``: the same calls without ``await``,
the same result types and errors, from several threads at once."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import capsa
import capsa.sync as sync

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def sb() -> Iterator[Any]:
    with sync.sandbox().env("CAPSA_TEST", "from env").build() as sandbox:
        yield sandbox


@pytest.fixture
def agent(sb: Any) -> Any:
    return sb.agent()


def test_ping_and_exec(agent: Any) -> None:
    agent.ping()
    r = agent.exec("echo $((40 + 2)); echo oops >&2; exit 42").run()
    assert isinstance(r, capsa.ExecResult)  # the async API's own result type
    assert (r.stdout, r.stderr, r.exit_code) == (b"42\n", b"oops\n", 42)


def test_exec_env_cwd_stdin_and_builder_form(agent: Any) -> None:
    r = agent.exec('echo "$CAPSA_TEST/$X"; pwd; wc -c', env={"X": "y"}, cwd="/tmp", stdin=b"12345")
    assert r.run().stdout.split(b"\n")[:3] == [b"from env/y", b"/tmp", b"5"]
    r = agent.exec("uname").arg("-r").run()
    assert r.ok and r.stdout.strip() == agent.info().kernel_version.split()[2].encode()


def test_timeout_and_errors_are_the_async_apis(agent: Any) -> None:
    r = agent.exec("sleep 60", timeout=1).run()
    assert r.timed_out and r.exit_code == 137
    with pytest.raises(capsa.ProcessError) as caught:
        agent.exec("exit 5", check=True).run()
    assert caught.value.exit_code == 5
    with pytest.raises(capsa.AgentError) as missing:
        agent.stat("/no/such/file")
    assert missing.value.errno == 2


def test_calls_from_many_threads_at_once(agent: Any) -> None:
    def square(i: int) -> bytes:
        out: bytes = agent.exec(f"sleep 1; echo $(({i} * {i}))").run().stdout
        return out

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(square, range(16)))
    assert results == [f"{i * i}\n".encode() for i in range(16)]
    assert threading.active_count() < 40


def test_streaming_output_before_the_command_ends(agent: Any) -> None:
    proc = agent.start("echo $((2 + 3)); read x; echo $((x * 2))")
    out = iter(proc.stdout)
    assert next(out) == b"5\n"
    proc.write_stdin(b"21\n")
    assert b"".join(out) == b"42\n"
    assert proc.wait(20) == 0


def test_pty_shell(agent: Any) -> None:
    proc = agent.start("/bin/sh", pty=True, rows=33, cols=101)
    stream = iter(proc.stdout)
    proc.write_stdin(b"stty size; exit 7\n")
    seen = b"".join(stream)
    assert b"33 101" in seen and proc.wait(20) == 7


def test_fifty_megabyte_round_trip_and_trees(agent: Any, tmp_path: Path) -> None:
    data = os.urandom(50 * 1024 * 1024)
    agent.write_file("/tmp/big.bin", data)
    guest_sum = agent.exec("sha256sum /tmp/big.bin").run().stdout.split()[0].decode()
    assert guest_sum == hashlib.sha256(data).hexdigest()
    assert hashlib.sha256(agent.read_file("/tmp/big.bin")).digest() == hashlib.sha256(data).digest()
    streamed = b"".join(agent.iter_file("/tmp/big.bin"))
    assert len(streamed) == len(data)
    agent.remove("/tmp/big.bin")
    src = tmp_path / "tree"
    (src / "a").mkdir(parents=True)
    (src / "a" / "leaf").write_bytes(b"leaf")
    agent.copy_to(src, "/root/tree")
    agent.copy_from("/root/tree", tmp_path / "back")
    assert (tmp_path / "back" / "a" / "leaf").read_bytes() == b"leaf"


def test_file_queries(agent: Any) -> None:
    agent.mkdir("/tmp/q/sub")
    agent.write_file("/tmp/q/f", b"abc", mode=0o640)
    assert agent.exists("/tmp/q/f") and not agent.exists("/tmp/q/missing")
    st = agent.stat("/tmp/q/f")
    assert (st.size, st.mode & 0o777, st.is_dir) == (3, 0o640, False)
    entries = {e.name: e for e in agent.list_dir("/tmp/q")}
    assert entries["sub"].is_dir and entries["f"].size == 3
    agent.remove("/tmp/q", recursive=True)
    assert not agent.exists("/tmp/q")


def test_background_processes_watch_and_code(sb: Any, agent: Any) -> None:
    proc = agent.start(["sh", "-c", "echo bg; exit 4"], background=True)
    assert proc.wait(20) == 4
    assert [p.exit_code for p in agent.processes() if p.pid == proc.pid] == [4]
    with agent.watch("/tmp") as events:
        agent.exec("touch /tmp/watched").run()
        event = next(iter(events))
    assert (event.kind, event.path) == ("create", "/tmp/watched")
    with sb.code_context("bash") as ctx:
        assert ctx.run("X=41; echo $((X + 1))").stdout == "42\n"


def test_main_process_exit_code_reaches_wait() -> None:
    sandbox = sync.sandbox().run("/bin/sh", ["-c", "exit $((40 + 3))"]).build()
    try:
        assert sandbox.wait(60).exit_code == 43
    finally:
        sandbox.kill()
    with pytest.raises(capsa.InvalidConfig, match="exclusive"):
        sync.sandbox().oci("alpine").run("/bin/true")


def test_a_sandbox_never_closed_dies_with_its_process() -> None:
    import subprocess
    import sys
    import time

    script = (
        "import capsa.sync as capsa\n"
        "sb = capsa.sandbox().build()\n"
        "print(sb.vm.pid, flush=True)\n"
        "assert sb.agent().exec('true').run().exit_code == 0\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout.split()[0])
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists()  # its QEMU went with it
