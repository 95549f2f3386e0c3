"""Confinement (defence in depth): QEMU runs under its seccomp filter, as an identity of its
own with no capabilities; the helpers drop to identities of their own before anything of
the guest's reaches them. Read from the kernel's view of the running processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import capsa
from capsa._util.privileges import (
    CAPABILITIES,
    Identity,
    confinement,
    is_capsa_id,
    new_identity,
)
from tests.framework.factory import VmFactory
from tests.vm.netkit import guest_address

pytestmark = pytest.mark.vm

needs_root = pytest.mark.skipif(
    not confinement().active, reason=f"confinement is off here: {confinement().reason}"
)


def status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def capabilities(names: set[str]) -> int:
    return sum(1 << CAPABILITIES[name] for name in names)


def children_running(module: str) -> list[int]:
    """Our child processes running ``python -m module``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == os.getpid() and module.encode() in cmdline(int(entry.name)):
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


@needs_root
async def test_qemu_and_the_vsock_helper_run_unprivileged(vm_factory: VmFactory) -> None:
    sb = await vm_factory.sandbox(capsa.sandbox().vsock_listen(1234))
    agent = await sb.agent()
    assert (await agent.exec("true")).exit_code == 0
    qemu = status(sb.vm.pid)
    uid = int(qemu["Uid"].split()[0])
    assert is_capsa_id(uid) and qemu["Uid"].split() == [str(uid)] * 4
    assert int(qemu["CapEff"], 16) == 0 and int(qemu["CapBnd"], 16) == 0
    assert qemu["NoNewPrivs"] == "1" and qemu["Seccomp"] == "2"
    (helper,) = children_running("capsa.devices.vsock_main")
    vsock = status(helper)
    helper_uid = int(vsock["Uid"].split()[0])
    # Its own identity: QEMU cannot signal or trace it, nor it QEMU.
    assert is_capsa_id(helper_uid) and helper_uid != uid
    assert int(vsock["CapEff"], 16) == 0 and vsock["NoNewPrivs"] == "1"


async def test_without_confinement_qemu_keeps_capsas_identity(
    vm_factory: VmFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAPSA_CONFINE", "0")
    vm = await vm_factory.sandbox()
    await vm.agent()
    qemu = status(vm.vm.pid)
    assert qemu["Uid"].split()[0] == str(os.getuid())
    assert qemu["Seccomp"] == "0"


DROP = """
import os, sys
from capsa._util.privileges import Identity, drop_privileges
drop_privileges(Identity.from_arg(sys.argv[1]))
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
try:
    open(sys.argv[2]).read()
    readable = "yes"
except PermissionError:
    readable = "no"
print(os.getuid(), int(status["CapEff"], 16), int(status["CapBnd"], 16),
      status["NoNewPrivs"].strip(), readable)
"""


@needs_root
@pytest.mark.parametrize("keep", [set(), {"net_raw", "net_bind_service"}])
def test_a_helper_drops_to_its_identity_for_good(tmp_path: Path, keep: set[str]) -> None:
    secret = tmp_path / "secret"
    secret.write_text("root only")
    secret.chmod(0o600)
    identity = new_identity(keep=keep)
    out = subprocess.run(
        [sys.executable, "-c", DROP, identity.to_arg(), str(secret)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == [str(identity.uid), str(capabilities(keep)), str(capabilities(keep)), "1", "no"]


def test_identities_round_trip_and_refuse_unknown_capabilities() -> None:
    identity = Identity(uid=7, gid=8, groups=(9, 10), keep=frozenset({"net_raw"}))
    assert Identity.from_arg(identity.to_arg()) == identity
    with pytest.raises(ValueError, match="sys_admin"):
        Identity(uid=1, gid=1, keep=frozenset({"sys_admin"}))
    assert all(is_capsa_id(new_identity().uid) for _ in range(100))


@needs_root
async def test_a_share_helper_runs_as_the_folders_owner_with_three_capabilities(
    vm_factory: VmFactory, tmp_path: Path
) -> None:
    folder = tmp_path / "owned"
    folder.mkdir()
    os.chown(folder, 4321, 4321)
    tmp_path.chmod(0o755)
    sb = await vm_factory.sandbox(
        capsa.sandbox().mount(folder, "/work", capsa.MountMode.READ_WRITE)
    )
    agent = await sb.agent()
    assert (await agent.exec("echo data > /work/made-by-guest")).exit_code == 0
    # What the guest creates belongs to the share's owner on the host.
    made = (folder / "made-by-guest").stat()
    assert (made.st_uid, made.st_gid) == (4321, 4321)
    (helper,) = children_running("capsa.devices.virtio_fs_main")
    fs = status(helper)
    assert fs["Uid"].split() == ["4321"] * 4 and fs["NoNewPrivs"] == "1"
    kept = {"dac_override", "dac_read_search", "fowner"}
    assert int(fs["CapEff"], 16) == capabilities(kept) == int(fs["CapBnd"], 16)


@needs_root
async def test_a_network_helper_keeps_only_raw_icmp_and_low_ports(vm_factory: VmFactory) -> None:
    sb = await vm_factory.sandbox(capsa.sandbox().network(capsa.NetworkMode.user_nat()))
    agent = await sb.agent()
    # The network works through the confined helper: a lease, and the gateway answers.
    assert (await guest_address(agent)).startswith("10.0.2.")
    assert (await agent.exec("ping -c 1 -W 5 10.0.2.2", timeout=30)).exit_code == 0
    (helper,) = children_running("capsa.net.stack_main")
    net = status(helper)
    assert is_capsa_id(int(net["Uid"].split()[0])) and net["NoNewPrivs"] == "1"
    kept = {"net_raw", "net_bind_service"}
    assert int(net["CapEff"], 16) == capabilities(kept) == int(net["CapBnd"], 16)
