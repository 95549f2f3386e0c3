"""Nothing outlives its owner: not after a clean exit, not after SIGKILL of the owner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import capsa

pytestmark = pytest.mark.vm

OWNER = """
import asyncio, os, sys, capsa
async def main():
    boot = capsa.LinuxDirectBoot(sys.argv[1], sys.argv[2])
    vm = await capsa.vm(boot).console_enabled().build()
    console = await vm.console()
    await console.wait_for("CAPSA-SHELL-READY", timeout=60)
    print(vm.pid, flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigkill_of_the_owner_takes_qemu_and_files_with_it(
    shell_boot: capsa.LinuxDirectBoot, tmp_path: Path
) -> None:
    runtime = tmp_path / "rt"
    runtime.mkdir()
    env = dict(os.environ, CAPSA_RUNTIME_DIR=str(runtime))
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(shell_boot.kernel), str(shell_boot.initrd)],
        stdout=subprocess.PIPE,
        env=env,
    )
    assert owner.stdout is not None
    line = owner.stdout.readline()
    assert line.strip().isdigit(), "owner did not boot its VM"
    qemu_pid = int(line)
    assert _alive(qemu_pid) and any(runtime.iterdir())
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    deadline = time.monotonic() + 10
    while (_alive(qemu_pid) or any(runtime.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(qemu_pid), "QEMU survived its owner"
    assert list(runtime.iterdir()) == [], "run files survived their owner"


async def test_context_manager_exit_on_error_tears_down(shell_boot: capsa.LinuxDirectBoot) -> None:
    with pytest.raises(RuntimeError):
        async with await capsa.vm(shell_boot).build() as vm:
            pid = vm.pid
            raise RuntimeError("user code failed")
    assert not _alive(pid)
    assert vm.status().is_finished
