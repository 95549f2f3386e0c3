from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import capsa
from capsa.images.kernel import KernelImage
from capsa.images.shell import MARKER, shell_initramfs
from tests.framework.fixtures import boot_shell

pytestmark = pytest.mark.vm


async def test_graceful_stop_uses_the_power_button(shell_boot: capsa.LinuxDirectBoot) -> None:
    vm, _ = await boot_shell(capsa.vm(shell_boot))
    assert vm.status() == capsa.VmStatus.RUNNING
    loop = asyncio.get_running_loop()
    start = loop.time()
    status = await vm.stop(timeout=20)
    # Exit code 0 from a guest-initiated power-off, well before the kill deadline.
    assert status == capsa.VmStatus(capsa.VmState.STOPPED, exit_code=0)
    assert loop.time() - start < 15
    assert "reboot: Power down" in vm.console_tail()


async def test_stop_kills_a_guest_that_ignores_the_power_button(
    kernel: KernelImage, tmp_path: Path
) -> None:
    deaf_init = (
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\n"
        "echo CAPSA-SHELL-READY\nexec setsid cttyhack sh\n"
    )
    deaf = shell_initramfs(kernel, tmp_path / "deaf.cpio", init=deaf_init)
    vm, _ = await boot_shell(capsa.vm(capsa.LinuxDirectBoot(kernel.path, deaf)))
    status = await vm.stop(timeout=1)
    # Killed after the grace period: stopped, with no exit code from the guest.
    assert status == capsa.VmStatus(capsa.VmState.STOPPED, None)


async def test_kill_and_wait_and_status_transitions(shell_boot: capsa.LinuxDirectBoot) -> None:
    vm, _ = await boot_shell(capsa.vm(shell_boot))
    with pytest.raises(capsa.CapsaTimeout):
        await vm.wait(timeout=0.2)
    assert vm.status().is_running
    status = await vm.kill()
    assert status == capsa.VmStatus(capsa.VmState.STOPPED, None)
    # kill() always works, also twice; wait() returns the final status.
    assert await vm.kill() == status
    assert await vm.wait() == status
    with pytest.raises(capsa.NotRunning):
        await vm.console()


async def test_guest_exit_is_seen_by_wait(shell_boot: capsa.LinuxDirectBoot) -> None:
    vm, console = await boot_shell(capsa.vm(shell_boot).cpus(2).memory_mb(256))
    async with vm:
        assert await console.exec("grep -c ^processor /proc/cpuinfo", timeout=20) == "2\n"
        mem_kb = int(await console.exec("awk '/MemTotal/ {print $2}' /proc/meminfo", timeout=20))
        assert 200_000 < mem_kb <= 256 * 1024
        assert vm.resources() == capsa.ResourceConfig(2, 256)
        assert vm.guest_os() is capsa.GuestOs.LINUX
        await console.write_line("poweroff -f")
        status = await vm.wait(timeout=30)
    assert status == capsa.VmStatus(capsa.VmState.STOPPED, exit_code=0)


async def test_sequential_boots(shell_boot: capsa.LinuxDirectBoot) -> None:
    for i in range(2):
        vm, console = await boot_shell(capsa.vm(shell_boot))
        async with vm:
            assert await console.exec(f"echo $(({i} + 40))", timeout=20) == f"{i + 40}\n"


async def test_kernel_panic_ends_in_failed_with_console_tail(
    shell_boot: capsa.LinuxDirectBoot,
) -> None:
    # init=/nonexistent makes the kernel panic: the VM must end, not hang.
    builder = capsa.vm(shell_boot).console_enabled().cmdline_arg("rdinit", "/nonexistent")
    async with await builder.build() as vm:
        status = await vm.wait(timeout=60)
    assert status.state is capsa.VmState.FAILED
    assert status.message is not None and "Kernel panic" in status.message


async def test_cmdline_args_reach_the_guest(shell_boot: capsa.LinuxDirectBoot) -> None:
    builder = capsa.vm(shell_boot).cmdline_arg("capsa.test", "one").cmdline_flag("capsaflag")
    builder.cmdline_arg("capsa.test", "two")
    vm, console = await boot_shell(builder)
    async with vm:
        words = (await console.exec("cat /proc/cmdline", timeout=20)).split()
    assert "capsa.test=two" in words and "capsa.test=one" not in words
    # A replaced argument moves to the end, like the original library.
    assert words[-2:] == ["capsaflag", "capsa.test=two"]


async def test_missing_qemu_is_a_clear_error(
    shell_boot: capsa.LinuxDirectBoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(capsa.BackendUnavailable, match="apt-get install qemu-system-x86"):
        await capsa.vm(shell_boot).build()


async def test_ready_when_returns_once_the_guest_printed_the_marker(
    shell_boot: capsa.LinuxDirectBoot,
) -> None:
    async with await capsa.vm(shell_boot).console_enabled().ready_when(MARKER).build() as vm:
        console = await vm.console()
        assert await console.exec("echo $((2 * 21))", timeout=20) == "42\n"


async def test_a_guest_that_never_boots_fails_within_the_timeout(
    shell_boot: capsa.LinuxDirectBoot,
) -> None:
    # busybox as init, sleeping silently: the marker never comes.
    builder = capsa.vm(shell_boot).timeout(8).ready_when(MARKER)
    builder.cmdline_arg("rdinit", "/bin/busybox").cmdline_flag("--").cmdline_flag("sleep")
    builder.cmdline_flag("1000")
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(capsa.BootTimeout, match="did not boot within 8"):
        await builder.build()
    assert loop.time() - start < 20


async def test_sandbox_without_an_agent_ends_failed(
    kernel: KernelImage, shell_initrd: Path
) -> None:
    # Long enough for the shell to come up on a busy machine; the agent never will.
    sb = await capsa.sandbox().kernel(kernel.path).initrd(shell_initrd).timeout(12).build()
    with pytest.raises(capsa.BootTimeout) as err:
        await sb.agent()
    assert MARKER in err.value.console_tail
    status = sb.status()
    assert status.state is capsa.VmState.FAILED and "agent not ready" in (status.message or "")
