"""Contract tests for the macOS paths (QEMU with HVF, and vfkit), run on Linux.

None of this has run on a Mac. What is checked here: the command lines capsa produces for
representative configurations, the HVF check, the capability tables, and the vfkit
backend's lifecycle against a stand-in vfkit (tests/fakes/vfkit.py) that speaks vfkit's
documented REST API on a Unix socket and serves real PTYs.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import capsa
from capsa.backends.qemu import backend as qemu_backend
from capsa.backends.qemu.accel import Accel, hvf_usability
from capsa.backends.qemu.cmdline import HostFacts, build_argv, kernel_cmdline
from capsa.backends.registry import select_backend
from capsa.backends.vfkit.cmdline import VfkitFacts, build_vfkit_argv
from capsa.backends.vfkit.rest import VfkitApiError, VfkitClient, VfkitState
from capsa.config import (
    DiskImage,
    ImageFormat,
    LinuxDirectBoot,
    MountMode,
    Ownership,
    QemuNat,
    ResourceConfig,
    SharedDir,
    UefiBoot,
    UserNatConfig,
    VmConfig,
    VsockPortConfig,
)

FAKE_VFKIT = Path(__file__).resolve().parent.parent / "fakes" / "vfkit.py"


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_contract_hvf_is_chosen_only_where_kern_hv_support_says_so() -> None:
    assert hvf_usability(lambda name: "1\n")[0] is True
    assert hvf_usability(lambda name: "0\n") == (
        False,
        "Hypervisor.framework is not supported (kern.hv_support=0)",
    )
    assert hvf_usability(lambda name: None)[0] is False


def test_contract_qemu_on_apple_silicon_with_hvf_and_9p_shares(tmp_path: Path) -> None:
    share = SharedDir(tmp_path, "src", MountMode.READ_ONLY)
    config = VmConfig(
        boot=LinuxDirectBoot("/k", "/i"),
        resources=ResourceConfig(2, 1024),
        shares=(share,),
        arch="aarch64",
    )
    facts = HostFacts(
        qemu_binary="qemu-system-aarch64",
        accel=Accel.HVF,
        arch="aarch64",
        share_transport="9p",
        console_fd=5,
        qmp_fd=6,
    )
    argv = build_argv(config, facts)
    assert argv[0] == "qemu-system-aarch64"
    assert _opt(argv, "-accel") == ["hvf"] and _opt(argv, "-cpu") == ["host"]
    assert _opt(argv, "-machine") == ["virt"]  # no memfd: vhost-user does not exist there
    assert _opt(argv, "-fsdev") == [f"local,id=fs0,path={tmp_path},security_model=none,readonly=on"]
    assert "virtio-9p-device,fsdev=fs0,mount_tag=src" in _opt(argv, "-device")
    line = kernel_cmdline(config, facts)
    assert "console=ttyAMA0" in line and "tsc_early_khz" not in line and "8250" not in line


def test_contract_arm64_under_tcg_uses_cpu_max() -> None:
    config = VmConfig(boot=LinuxDirectBoot("/k"), arch="aarch64")
    argv = build_argv(
        config,
        HostFacts(
            qemu_binary="qemu-system-aarch64", accel=Accel.TCG, arch="aarch64", tsc_khz=2_000_000
        ),
    )
    assert _opt(argv, "-cpu") == ["max"] and _opt(argv, "-machine") == ["virt"]


def test_contract_qemu_capabilities_on_macos_tell_the_truth() -> None:
    caps = qemu_backend.QemuBackend().capabilities(host="darwin")
    assert "vsock" not in caps.devices and "virtio-fs" not in caps.devices
    assert "virtio-9p" in caps.devices
    assert "vhost-user" in caps.unavailable["vsock"]
    linux = qemu_backend.QemuBackend().capabilities(host="linux")
    assert {"vsock", "virtio-fs"} <= set(linux.devices)


def test_contract_vsock_is_refused_without_vhost_user(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(qemu_backend, "vhost_user_available", lambda: False)
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    config = VmConfig(boot=LinuxDirectBoot(kernel), vsock_ports=(VsockPortConfig(1024),))
    with pytest.raises(capsa.UnsupportedFeature, match="vhost-user"):
        qemu_backend.QemuBackend().validate(config)


def test_contract_vfkit_command_line_for_a_linux_guest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    disk = tmp_path / "data.img"
    disk.write_bytes(b"\0" * 512)
    config = VmConfig(
        boot=LinuxDirectBoot("/k/vmlinux", "/k/initrd"),
        resources=ResourceConfig(2, 1024),
        disks=(DiskImage(disk, ImageFormat.RAW),),
        vsock_ports=(
            VsockPortConfig(1024, Path("/r/l.sock")),
            VsockPortConfig(2049, Path("/r/c.sock"), connect=True),
        ),
        shares=(SharedDir(tmp_path, "src", MountMode.READ_WRITE, Ownership.squash_to_root()),),
        serial_ports=("org.capsa.agent.0",),
        network=QemuNat(),
    )
    facts = VfkitFacts(binary="vfkit", rest_socket=Path("/r/api.sock"), mac="52:54:00:aa:bb:cc")
    with caplog.at_level(logging.WARNING, logger="capsa.vfkit"):
        argv = build_vfkit_argv(config, facts, "console=hvc0 quiet")
    assert argv[:7] == [
        "vfkit",
        "--cpus",
        "2",
        "--memory",
        "1024",
        "--restful-uri",
        "unix:///r/api.sock",
    ]
    assert _opt(argv, "--bootloader") == [
        'linux,kernel=/k/vmlinux,initrd=/k/initrd,cmdline="console=hvc0 quiet"'
    ]
    assert _opt(argv, "--device") == [
        f"virtio-blk,path={disk}",
        "virtio-serial,pty",
        "virtio-serial,pty",
        "virtio-vsock,port=1024,socketURL=/r/l.sock,listen",
        "virtio-vsock,port=2049,socketURL=/r/c.sock,connect",
        f"virtio-fs,sharedDir={tmp_path},mountTag=src",
        "virtio-net,nat,mac=52:54:00:aa:bb:cc",
        "virtio-rng",
    ]
    assert "DynamicCaller" in caplog.text  # squash is not possible there, and we say so


def test_contract_vfkit_refusals_and_efi(tmp_path: Path) -> None:
    qcow = tmp_path / "d.qcow2"
    qcow.write_bytes(b"QFI\xfb")
    facts = VfkitFacts(efi_vars=Path("/r/efi"))
    with pytest.raises(capsa.UnsupportedFeature, match="raw"):
        build_vfkit_argv(VmConfig(boot=LinuxDirectBoot("/k"), disks=(DiskImage(qcow),)), facts)
    with pytest.raises(capsa.UnsupportedFeature, match="datagram port"):
        build_vfkit_argv(VmConfig(boot=LinuxDirectBoot("/k"), network=UserNatConfig()), facts)
    ours = VfkitFacts(net_socket=Path("/r/net.sock"), mac="52:54:00:00:00:01")
    argv = build_vfkit_argv(VmConfig(boot=LinuxDirectBoot("/k"), network=UserNatConfig()), ours)
    assert "virtio-net,unixSocketPath=/r/net.sock,mac=52:54:00:00:00:01" in _opt(argv, "--device")
    raw = tmp_path / "boot.img"
    raw.write_bytes(b"\0")
    argv = build_vfkit_argv(VmConfig(boot=UefiBoot(DiskImage(raw))), facts)
    assert _opt(argv, "--bootloader") == ["efi,variable-store=/r/efi,create"]
    assert f"virtio-blk,path={raw}" in _opt(argv, "--device")
    assert select_backend("vfkit").capabilities().image_formats == ("raw",)
    with pytest.raises(capsa.InvalidConfig, match="unknown backend"):
        select_backend("hyperkit")


@pytest.fixture
async def fake_api(tmp_path: Path) -> AsyncIterator[tuple[Path, list[dict[str, object]]]]:
    """vfkit's REST endpoints on a Unix socket, recording what was posted."""
    posted: list[dict[str, object]] = []
    path = tmp_path / "api.sock"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        method, target = head.split()[:2]
        length = next(
            (
                int(h.split(":")[1])
                for h in head.split("\r\n")
                if h.lower().startswith("content-length")
            ),
            0,
        )
        body = await reader.readexactly(length) if length else b""
        status, reply = "200 OK", b""
        if (method, target) == ("GET", "/vm/state"):
            reply = json.dumps({"state": "VirtualMachineStateRunning", "canStop": True}).encode()
        elif (method, target) == ("GET", "/vm/inspect"):
            reply = json.dumps({"cpus": 2, "memory": 1024, "devices": []}).encode()
        elif (method, target) == ("POST", "/vm/state"):
            posted.append(json.loads(body))
        else:
            status = "500 Internal Server Error"
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Length: {len(reply)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + reply
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(serve, path=str(path))
    async with server:
        yield path, posted


async def test_contract_vfkit_rest_client(fake_api: tuple[Path, list[dict[str, object]]]) -> None:
    path, posted = fake_api
    client = VfkitClient(path)
    try:
        state, can = await client.state()
        assert state is VfkitState.RUNNING and can == {"canStop": True}
        await client.stop()
        await client.change_state("Pause")
        assert posted == [{"state": "Stop"}, {"state": "Pause"}]
        assert (await client.inspect())["cpus"] == 2
        with pytest.raises(ValueError, match="no state change"):
            await client.change_state("Explode")
        with pytest.raises(VfkitApiError, match="HTTP 500"):
            await client._json("GET", "/nope")
    finally:
        await client.close()
    with pytest.raises(VfkitApiError, match="unreachable"):
        await VfkitClient(path.with_name("missing.sock")).state()


async def test_contract_vfkit_backend_lifecycle_against_a_stand_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAPSA_VFKIT", str(FAKE_VFKIT))
    monkeypatch.setenv("FAKE_VFKIT_ARGV", str(tmp_path / "argv.json"))
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\0")
    vm = await capsa.vm(LinuxDirectBoot(kernel)).backend("vfkit").console_enabled().build()
    async with vm:
        console = await vm.console()
        # Printed before capsa opened the PTY: kept, and seen as printed.
        boot = await console.wait_for("FAKE-VFKIT-BOOTED", timeout=10)
        assert boot == "FAKE-VFKIT-BOOTED"
        await console.write_line("ping")
        await console.wait_for("echo:ping", timeout=10)  # bytes went both ways over the PTY
        status = await vm.stop(timeout=10)
    assert status.exit_code == 0 and not status.is_running  # stopped through the REST API
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[argv.index("--bootloader") + 1].startswith(f"linux,kernel={kernel}")


def test_contract_vfkit_sandbox_cmdline_names_the_agent_console() -> None:
    from capsa.backends.vfkit.backend import default_vfkit_cmdline
    from capsa.guest.init import parse_cmdline

    config = VmConfig(boot=LinuxDirectBoot("/k"), serial_ports=("org.capsa.agent.0",))
    line = default_vfkit_cmdline(config)
    assert "console=hvc0" in line.split() and "capsa.agent=hvc1" in line.split()
    assert parse_cmdline(line)["agent"] == "/dev/hvc1"
    assert "capsa.agent" not in default_vfkit_cmdline(VmConfig(boot=LinuxDirectBoot("/k")))
    assert parse_cmdline("capsa.agent=../x")["agent"] is None
