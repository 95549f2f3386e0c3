"""Console behaviour on one shared shell VM (each test leaves the shell at a prompt)."""

from __future__ import annotations

import asyncio
import re

import pytest

import capsa

pytestmark = pytest.mark.vm
Shell = tuple[capsa.VmHandle, capsa.Console]


async def test_exec_returns_output_without_the_echoed_command(shell_vm: Shell) -> None:
    _, console = shell_vm
    out = await console.exec("echo $((6 * 7)); echo second-line", timeout=20)
    assert out == "42\nsecond-line\n"


async def test_thirty_execs_stay_in_order(shell_vm: Shell) -> None:
    _, console = shell_vm
    for i in range(30):
        assert await console.exec(f"echo $(({i} * 3 + 1))", timeout=20) == f"{i * 3 + 1}\n"


async def test_exec_with_quotes_comment_and_exit_status(shell_vm: Shell) -> None:
    _, console = shell_vm
    assert await console.exec('false; echo "it\'s $?" # trailing comment', timeout=20) == "it's 1\n"


async def test_prompt_without_newline_is_matched(shell_vm: Shell) -> None:
    _, console = shell_vm
    await console.write_line("read -p 'Value? ' v; echo result=$((v * 2))")
    await console.wait_for("Value? ", timeout=20)
    await console.write_line("21")
    await console.wait_for("result=42", timeout=20)
    await console.wait_for("# ", timeout=20)


async def test_ctrl_c_interrupts_the_foreground_command(shell_vm: Shell) -> None:
    _, console = shell_vm
    await console.read_available()
    await console.write_line("echo started-$((1 + 1)); sleep 300")
    await console.wait_for("started-2", timeout=20)
    await asyncio.sleep(0.3)
    await console.send_interrupt()
    await console.wait_for("# ", timeout=20)
    # 130 = 128 + SIGINT: the shell saw sleep die of the interrupt. (exec() would run its
    # own printf first, so read $? with a plain line.)
    await console.write_line("echo $(($? + 1000))")
    await console.wait_for("1130", timeout=20)
    await console.wait_for("# ", timeout=20)


async def test_wait_for_any_returns_the_earliest_match(shell_vm: Shell) -> None:
    _, console = shell_vm
    await console.write_line("echo $((1+1))BETA; echo $((1+2))ALPHA")
    idx, text = await console.wait_for_any(["3ALPHA", re.compile(r"\d+BETA")], timeout=20)
    assert idx == 1 and text.endswith("2BETA")
    await console.wait_for("# ", timeout=20)


async def test_wait_for_times_out_with_a_clear_error(shell_vm: Shell) -> None:
    _, console = shell_vm
    with pytest.raises(capsa.CapsaTimeout, match="not found within"):
        await console.wait_for("never-printed-marker", timeout=0.5)


async def test_read_available_returns_pending_output(shell_vm: Shell) -> None:
    _, console = shell_vm
    await console.read_available()
    await console.write_line("echo $((100 + 23))")
    await console.wait_for("# ", timeout=20)
    await console.write_line("echo $((200 + 34))")
    await asyncio.sleep(1.0)
    assert "234" in await console.read_available()


async def test_run_command_returns_text_up_to_prompt(shell_vm: Shell) -> None:
    _, console = shell_vm
    await console.read_available()
    text = await console.run_command("echo $((5 * 5))", "# ", timeout=20)
    assert "\n25\r\n" in text


async def test_send_eof_ends_a_reading_command(shell_vm: Shell) -> None:
    _, console = shell_vm
    await console.write_line("cat > /tmp/eof-test")
    await asyncio.sleep(0.3)
    await console.write_str("abc\n")
    await console.send_eof()
    await console.wait_for("# ", timeout=20)
    assert await console.exec("wc -c < /tmp/eof-test", timeout=20) == "4\n"


async def test_console_of_a_vm_without_console_is_an_error(
    shell_boot: capsa.LinuxDirectBoot,
) -> None:
    async with await capsa.vm(shell_boot).build() as vm:
        with pytest.raises(capsa.ConsoleNotEnabled):
            await vm.console()
        # The serial output is still captured for diagnostics.
        for _ in range(200):
            if "CAPSA-SHELL-READY" in vm.console_tail():
                break
            await asyncio.sleep(0.1)
        assert "CAPSA-SHELL-READY" in vm.console_tail()
