"""Every QEMU this machine has runs the sandbox agent; a guest whose agent port is missing
says which devices it saw. CI runs this on QEMU 7.2 (Debian 12), 10.0 (Debian 13) and
10.0 from bookworm-backports with Debian 12's kernel."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from pathlib import Path

import pytest

import capsa
from capsa.backends.qemu.probe import probe
from capsa.config import host_arch
from capsa.images.sandbox import sandbox_image
from tests.conftest import qemu_children

pytestmark = pytest.mark.vm


def available_qemus() -> list[str]:
    """QEMU binaries for this host's architecture: on PATH, in the usual places, CAPSA_QEMU,
    and any listed in CAPSA_TEST_QEMUS (colon-separated), each once."""
    name = f"qemu-system-{host_arch()}"
    candidates = [
        shutil.which(name),
        f"/usr/bin/{name}",
        f"/usr/local/bin/{name}",
        os.environ.get("CAPSA_QEMU"),
        *os.environ.get("CAPSA_TEST_QEMUS", "").split(":"),
    ]
    found: dict[str, str] = {}
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            found.setdefault(os.path.realpath(candidate), candidate)
    return list(found.values())


@pytest.mark.parametrize("qemu", available_qemus())
async def test_the_sandbox_agent_comes_up(qemu: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPSA_QEMU", qemu)
    info = probe(qemu)
    assert info.supported
    payload = os.urandom(200_000)
    async with await capsa.sandbox().build() as sb:
        # The VM really runs on this binary.
        exes = {os.path.realpath(f"/proc/{pid}/exe") for pid in qemu_children()}
        assert os.path.realpath(qemu) in exes
        agent = await sb.agent()
        await agent.write_file("/tmp/payload", payload)
        result = await agent.exec("sha256sum").arg("/tmp/payload").run()
        assert result.exit_code == 0
        assert result.stdout_text.split()[0] == hashlib.sha256(payload).hexdigest()
        failed = await agent.exec("sh").arg("-c").arg("exit 7").run()
        assert failed.exit_code == 7


async def test_a_guest_without_its_agent_port_names_what_it_saw() -> None:
    image = await asyncio.to_thread(sandbox_image)
    # The sandbox image booted as a plain VM: no virtio-serial port for the agent.
    boot = capsa.LinuxDirectBoot(image.kernel, image.initrd)
    async with await capsa.vm(boot).console_enabled().timeout(60).build() as vm:
        console = await vm.console()
        line = await console.wait_for("virtio-serial port org.capsa.agent.0 not found", 60)
        rest = await console.wait_for("powering off", 30)
        report = line + rest
        # The guest lists its devices (the RNG device capsa always attaches) and no ports.
        assert "virtio devices: " in report and "=rng" in report
        assert "virtio-serial ports: none" in report
        status = await vm.wait(30)
    assert status.state is capsa.VmState.STOPPED


def test_each_qemu_is_listed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    qemu = available_qemus()[0]
    (tmp_path / "qemu-link").symlink_to(qemu)
    monkeypatch.setenv("CAPSA_TEST_QEMUS", f"{tmp_path / 'qemu-link'}:{qemu}:/nonexistent")
    found = available_qemus()
    assert qemu in found and len(found) == len({os.path.realpath(q) for q in found})
