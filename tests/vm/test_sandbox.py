"""The sandbox agent in a real VM. The agent tests run three times: on a booted sandbox, on
one made from a template (restored, then set up) and on a restored copy of a running one
(the path that changes MAC, lease, RNG and clock); lifecycle tests start their own. Every
VM comes from a factory that owns it."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import capsa
from capsa.backends.qemu.accel import Accel, choose_accel
from tests.framework.factory import VmFactory

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module", params=["booted", "template", "restored"])
async def sb(
    request: pytest.FixtureRequest, module_vm_factory: VmFactory
) -> AsyncIterator[capsa.Sandbox]:
    builder = capsa.sandbox().env("CAPSA_TEST", "from env").network(capsa.NetworkMode.user_nat())
    if request.param == "template":
        maker = await module_vm_factory.sandbox(builder)
        await maker.agent()  # the template exists now
        await maker.kill()
    sandbox = await module_vm_factory.sandbox(builder.template(request.param != "booted"))
    if request.param == "template":
        assert sandbox.template is not None
    if request.param == "restored":
        booted, sandbox = sandbox, await module_vm_factory.restored(sandbox)
        await booted.kill()  # the copy runs on its own
    yield sandbox
    await sandbox.kill()


@pytest.fixture
async def agent(sb: capsa.Sandbox) -> capsa.AgentClient:
    return await sb.agent()


async def test_ping_and_exec(agent: capsa.AgentClient) -> None:
    await agent.ping()
    r = await agent.exec("echo $((40 + 2)); echo oops >&2; exit 42")
    assert (r.stdout, r.stderr, r.exit_code) == (b"42\n", b"oops\n", 42)


async def test_exec_env_cwd_stdin(agent: capsa.AgentClient) -> None:
    r = await agent.exec(
        'echo "$CAPSA_TEST/$X"; pwd; wc -c', env={"X": "y"}, cwd="/tmp", stdin=b"12345"
    )
    assert r.stdout.split(b"\n")[:3] == [b"from env/y", b"/tmp", b"5"]


async def test_seed_builder_form(agent: capsa.AgentClient) -> None:
    r = await agent.exec("uname").arg("-r").run()
    assert r.ok and r.stdout.strip() == (await agent.info()).kernel_version.split()[2].encode()


async def test_exec_timeout(agent: capsa.AgentClient) -> None:
    r = await agent.exec("sleep 60", timeout=1)
    assert r.timed_out and r.exit_code == 137
    await agent.ping()


async def test_twenty_concurrent_execs(agent: capsa.AgentClient) -> None:
    rs = await asyncio.gather(*(agent.exec(f"sleep 1; echo $(({i} * {i}))") for i in range(20)))
    assert [r.stdout for r in rs] == [f"{i * i}\n".encode() for i in range(20)]


async def test_streaming_output_before_the_command_ends(agent: capsa.AgentClient) -> None:
    proc = await agent.start("echo $((2 + 3)); read x; echo $((x * 2))")
    out = proc.stdout
    assert await asyncio.wait_for(out.__anext__(), 20) == b"5\n"
    await proc.write_stdin(b"21\n")
    assert b"".join([c async for c in out]) == b"42\n"
    assert await proc.wait(20) == 0


async def test_pty_shell(agent: capsa.AgentClient) -> None:
    proc = await agent.start("/bin/sh", pty=True, rows=33, cols=101)
    stream = proc.stdout
    await proc.write_stdin(b"stty size; sleep 30\n")
    seen = b""
    while b"33 101" not in seen:
        seen += await asyncio.wait_for(stream.__anext__(), 20)
    await asyncio.sleep(0.3)
    await proc.write_stdin(b"\x03")  # Ctrl-C reaches the foreground job through the terminal
    seen = b""
    while b"# " not in seen:
        seen += await asyncio.wait_for(stream.__anext__(), 20)
    await proc.write_stdin(b"echo rc=$(($? + 1000)); exit 7\n")
    rest = b"".join([c async for c in stream])
    assert b"rc=1130" in rest  # 130: sleep died of SIGINT
    assert await proc.wait(20) == 7


async def test_fifty_megabyte_round_trip(agent: capsa.AgentClient, tmp_path: Path) -> None:
    data = os.urandom(50 * 1024 * 1024)
    await agent.write_file("/tmp/big.bin", data)
    guest_sum = (await agent.exec("sha256sum /tmp/big.bin")).stdout.split()[0].decode()
    assert guest_sum == hashlib.sha256(data).hexdigest()
    back = await agent.read_file("/tmp/big.bin")
    assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
    await agent.remove("/tmp/big.bin")


async def test_copy_tree_both_ways(agent: capsa.AgentClient, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    (src / "a" / "b").mkdir(parents=True)
    (src / "top.txt").write_text("top")
    (src / "a" / "mid.bin").write_bytes(os.urandom(300_000))
    (src / "a" / "b" / "leaf").write_bytes(b"leaf")
    await agent.copy_to(src, "/root/tree")
    listing = (await agent.exec("cd /root/tree && find . -type f | sort")).stdout.decode().split()
    assert listing == ["./a/b/leaf", "./a/mid.bin", "./top.txt"]
    back = tmp_path / "back"
    await agent.copy_from("/root/tree", back)
    for rel in ("top.txt", "a/mid.bin", "a/b/leaf"):
        assert (back / rel).read_bytes() == (src / rel).read_bytes()


async def test_file_queries(agent: capsa.AgentClient) -> None:
    await agent.mkdir("/tmp/q/sub")
    await agent.write_file("/tmp/q/f", b"abc", mode=0o640)
    assert await agent.exists("/tmp/q/f") and not await agent.exists("/tmp/q/missing")
    st = await agent.stat("/tmp/q/f")
    assert (st.size, st.mode & 0o777, st.is_dir) == (3, 0o640, False)
    entries = {e.name: e for e in await agent.list_dir("/tmp/q")}
    assert entries["sub"].is_dir and entries["f"].size == 3
    await agent.remove("/tmp/q", recursive=True)
    assert not await agent.exists("/tmp/q")
    with pytest.raises(capsa.AgentError) as err:
        await agent.stat("/tmp/q")
    assert err.value.errno == 2


async def test_info(agent: capsa.AgentClient) -> None:
    info = await agent.info()
    assert info.hostname == "sandbox" and info.cpus == 1
    assert 400 * 2**20 < info.memory_bytes <= 512 * 2**20
    assert {"/proc", "/tmp"} <= {m.target for m in info.mounts}
    assert info.uptime > 0


async def test_agent_survives_a_command_killing_everything_it_can(agent: capsa.AgentClient) -> None:
    await agent.exec("kill -9 -1", timeout=10)  # every process but init
    assert (await agent.exec("echo alive")).stdout == b"alive\n"


async def test_guest_aslr_is_off_only_under_tcg(agent: capsa.AgentClient) -> None:
    # Translated code is reused only at the same addresses: see qemu/cmdline.py.
    expected = b"0" if choose_accel().accel is Accel.TCG else b"2"
    got = await agent.read_file("/proc/sys/kernel/randomize_va_space")
    assert got.strip() == expected


async def test_the_user_keeps_guest_aslr_with_a_kernel_argument(vm_factory: VmFactory) -> None:
    builder = capsa.sandbox().cmdline_arg("sysctl.kernel.randomize_va_space", "2")
    agent = await (await vm_factory.sandbox(builder)).agent()
    assert (await agent.read_file("/proc/sys/kernel/randomize_va_space")).strip() == b"2"
    # Two runs of one program see their stack at different addresses again.
    stacks = {(await agent.exec("grep stack /proc/self/maps")).stdout for _ in range(3)}
    assert len(stacks) > 1


async def test_main_process_exit_code_reaches_wait(vm_factory: VmFactory) -> None:
    sb = await vm_factory.sandbox(capsa.sandbox().run("/bin/sh", ["-c", "exit $((40 + 3))"]))
    status = await sb.wait(timeout=60)
    assert status == capsa.VmStatus(capsa.VmState.STOPPED, exit_code=43)


async def test_shutdown_ends_the_vm(vm_factory: VmFactory) -> None:
    sb = await vm_factory.sandbox()
    await (await sb.agent()).shutdown()
    status = await sb.wait(timeout=60)
    assert status == capsa.VmStatus(capsa.VmState.STOPPED, exit_code=0)


async def test_graceful_stop_terminates_the_main_process(vm_factory: VmFactory) -> None:
    sb = await vm_factory.sandbox(capsa.sandbox().run("/bin/sleep", ["600"]))
    await sb.agent()
    status = await sb.vm.stop(timeout=30)  # ACPI power button -> SIGTERM to main
    assert status == capsa.VmStatus(capsa.VmState.STOPPED, exit_code=128 + 15)


async def test_broken_init_fails_fast_with_the_console_tail(
    tmp_path: Path, vm_factory: VmFactory
) -> None:
    from capsa.images.kernel import default_kernel

    bogus = tmp_path / "empty.cpio"
    bogus.write_bytes(b"070701" + b"0" * 104)  # no /init at all
    builder = capsa.sandbox().kernel(default_kernel().path).initrd(bogus).timeout(60)
    sb = await vm_factory.sandbox(builder)
    with pytest.raises(capsa.StartFailed) as err:
        await sb.agent()
    assert "Kernel panic" in err.value.console_tail
    assert sb.status().is_finished


def test_oci_and_run_are_exclusive_and_references_checked() -> None:
    with pytest.raises(capsa.InvalidConfig, match="exclusive"):
        capsa.sandbox().oci("python:3.11").run("/bin/true")
    with pytest.raises(capsa.InvalidConfig, match="exclusive"):
        capsa.sandbox().run("/bin/true").oci("python:3.11")
    with pytest.raises(capsa.InvalidConfig, match="reference"):
        capsa.sandbox().oci("not a reference")


async def test_instant_main_exit_code_is_not_lost(vm_factory: VmFactory) -> None:
    sb = await vm_factory.sandbox(capsa.sandbox().run("/bin/false"))
    status = await sb.wait(timeout=60)
    assert status.exit_code == 1


async def test_missing_main_program_ends_with_127(vm_factory: VmFactory) -> None:
    sb = await vm_factory.sandbox(capsa.sandbox().run("/nonexistent/prog"))
    status = await sb.wait(timeout=60)
    assert status == capsa.VmStatus(capsa.VmState.STOPPED, exit_code=127)
    assert "cannot start /nonexistent/prog" in sb.vm.console_tail()
