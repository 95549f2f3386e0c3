from __future__ import annotations

import asyncio

import pytest

import capsa
from tests.framework.fixtures import boot_shell

pytestmark = pytest.mark.vm


async def test_split_gives_stream_reader_and_writer(shell_boot: capsa.LinuxDirectBoot) -> None:
    vm, console = await boot_shell(capsa.vm(shell_boot))
    async with vm:
        reader, writer = await console.split()
        writer.write(b"echo $((7 * 6))X\n")
        await writer.drain()
        data = b""
        while b"42X" not in data:
            chunk = await asyncio.wait_for(reader.read(4096), 20)
            assert chunk, "console closed early"
            data += chunk
        writer.write(b"poweroff -f\n")
        await writer.drain()
        status = await vm.wait(timeout=30)
        assert status.state is capsa.VmState.STOPPED and status.exit_code == 0
        assert await asyncio.wait_for(reader.read(), 10) is not None
