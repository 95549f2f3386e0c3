"""Pause and resume: a sandbox saved and stopped in one process runs on in another as the
same machine, once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import capsa
from tests.framework.factory import VmFactory

pytestmark = pytest.mark.vm

RESUMER = """
import asyncio, json, sys
import capsa

async def main():
    sb = await capsa.resume(sys.argv[1])
    async with sb:
        agent = await sb.agent()

        async def wait_for(path):
            for _ in range(200):
                if await agent.exists(path):
                    return
                await asyncio.sleep(0.05)
            raise SystemExit(f"{path} never appeared")

        async def read(command):
            r = await agent.exec(command)
            return r.stdout.decode() if r.exit_code == 0 else None

        out = {"ok": True}
%s
        print(json.dumps(out))

asyncio.run(main())
"""


def resume_elsewhere(path: Path, body: str) -> dict[str, Any]:
    """Resume the sandbox paused in ``path`` in a new Python process, run ``body`` there
    (``agent``, ``read()``, ``wait_for()`` and the ``out`` dict at hand); ``out`` back."""
    script = RESUMER % textwrap.indent(body, " " * 8)
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


async def _identity(agent: capsa.AgentClient) -> dict[str, bytes]:
    commands = {
        "mac": "cat /sys/class/net/eth0/address",
        "machine_id": "cat /etc/machine-id",
        "hostname": "hostname",
        "boot_id": "cat /proc/sys/kernel/random/boot_id",
    }
    return {k: (await agent.exec(c)).stdout for k, c in commands.items()}


async def test_a_paused_sandbox_resumes_in_another_process_as_the_same_machine(
    tmp_path: Path, vm_factory: VmFactory
) -> None:
    sb = await vm_factory.sandbox(
        capsa.sandbox().hostname("kept").network(capsa.NetworkMode.user_nat())
    )
    agent = await sb.agent()
    setup = "echo kept > /tmp/state && (sleep 3600 & echo $! > /tmp/pid)"
    assert (await agent.exec(setup)).exit_code == 0
    before = await _identity(agent)
    snap = await sb.pause(tmp_path / "paused")
    assert snap.paused and sb.status().is_finished
    assert json.loads((snap.path / "snapshot.json").read_text())["paused"] is True

    out = resume_elsewhere(
        snap.path,
        """\
out["state"] = await read("cat /tmp/state")
out["alive"] = await read("kill -0 $(cat /tmp/pid) && echo alive")
for key, command in (
    ("mac", "cat /sys/class/net/eth0/address"),
    ("machine_id", "cat /etc/machine-id"),
    ("hostname", "hostname"),
    ("boot_id", "cat /proc/sys/kernel/random/boot_id"),
):
    out[key] = await read(command)
""",
    )
    assert out["state"] == "kept\n" and out["alive"] == "alive\n"
    for key, value in before.items():
        assert out[key] == value.decode(), key  # the same machine, not a copy
    # Used up: the directory went once the resumed sandbox ran.
    assert not snap.path.exists()
    with pytest.raises(capsa.SnapshotError, match="not a capsa snapshot"):
        await capsa.resume(snap.path)


async def test_resume_takes_only_paused_sandboxes_and_a_failed_one_keeps_them(
    tmp_path: Path, vm_factory: VmFactory
) -> None:
    sb = await vm_factory.sandbox()
    await (await sb.agent()).exec("echo 1 > /tmp/one")
    snap = await sb.snapshot(tmp_path / "snap")
    with pytest.raises(capsa.SnapshotError, match="not a paused VM"):
        await capsa.resume(snap.path)
    paused = await sb.pause(tmp_path / "paused")
    # State from another QEMU is refused before anything runs: the pause is kept.
    qemu_json = paused.path / "qemu.json"
    made_by = qemu_json.read_text()
    qemu_json.write_text(json.dumps({**json.loads(made_by), "version": "7.1.0"}))
    with pytest.raises(capsa.SnapshotError, match=r"made by QEMU 7\.1\.0"):
        await capsa.resume(paused.path)
    assert (paused.path / "snapshot.json").is_file()
    # Another resume owns it (or one was cut short): said so, nothing started.
    os.rename(paused.path / "snapshot.json", paused.path / "snapshot.json.resuming")
    with pytest.raises(capsa.SnapshotError, match=r"being resumed .*rename"):
        await capsa.resume(paused.path)
    os.rename(paused.path / "snapshot.json.resuming", paused.path / "snapshot.json")
    qemu_json.write_text(made_by)
    resumed = await capsa.resume(paused.path)
    assert isinstance(resumed, capsa.Sandbox)
    async with resumed:
        r = await (await resumed.agent()).exec("cat /tmp/one")
        assert r.exit_code == 0 and r.stdout == b"1\n"
    assert not paused.path.exists()
