"""arm64 guests under TCG on this x86_64 host: qemu-system-aarch64 -M virt, Debian's arm64
cloud kernel and busybox (multi-arch apt downloads). Few tests: every boot is emulated."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import capsa
from capsa._util.tools import find_tool
from capsa.images.kernel import KernelImage, default_kernel
from capsa.images.shell import MARKER, shell_initramfs
from tests.vm.netkit import GUEST_PY, guest_address

DATA = os.urandom(256 * 1024)


@pytest.fixture(scope="module")
def arm_boot(tmp_path_factory: pytest.TempPathFactory) -> capsa.LinuxDirectBoot:
    kernel: KernelImage = default_kernel(arch="aarch64")
    initrd = shell_initramfs(kernel, tmp_path_factory.mktemp("arm") / "shell.cpio", arch="aarch64")
    return capsa.LinuxDirectBoot(kernel.path, initrd)


@pytest.fixture(scope="module")
async def arm_vm(
    arm_boot: capsa.LinuxDirectBoot, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[capsa.VmHandle, capsa.Console]]:
    disk = tmp_path_factory.mktemp("armdisk") / "data.img"
    disk.write_bytes(DATA)
    builder = capsa.vm(arm_boot).arch("aarch64").memory_mb(256).console_enabled().timeout(120)
    vm = await builder.disk(capsa.DiskImage(disk).read_only()).build()
    async with vm:
        console = await vm.console()
        await console.wait_for(MARKER, timeout=120)
        yield vm, console


async def test_arm64_guest_boots_and_reads_a_disk(
    arm_vm: tuple[capsa.VmHandle, capsa.Console],
) -> None:
    _, console = arm_vm
    assert await console.exec("uname -m", timeout=60) == "aarch64\n"
    out = await console.exec(f"head -c {len(DATA)} /dev/vda | sha256sum", timeout=60)
    assert out.split()[0] == hashlib.sha256(DATA).hexdigest()


async def test_arm64_snapshot_and_restore(
    arm_vm: tuple[capsa.VmHandle, capsa.Console], tmp_path: Path
) -> None:
    vm, console = arm_vm
    assert await console.exec("echo arm-state > /tmp/mark && echo ok", timeout=60) == "ok\n"
    snap = await vm.snapshot(tmp_path / "snap")
    assert snap.config.arch == "aarch64"
    restored = await capsa.restore(snap.path)
    assert isinstance(restored, capsa.VmHandle)
    async with restored:
        clone = await restored.console()
        assert await clone.exec("cat /tmp/mark; uname -m", timeout=60) == "arm-state\naarch64\n"
    assert await console.exec("cat /tmp/mark", timeout=60) == "arm-state\n"  # source runs on


FETCH = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
s.sendall(b"GET / HTTP/1.0\r\n\r\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
open("/tmp/got", "wb").write(data.partition(b"\r\n\r\n")[2])
"""
BODY = os.urandom(100_000)


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY)
    await writer.drain()
    writer.close()


@pytest.fixture(scope="module")
async def arm_sandbox() -> AsyncIterator[tuple[capsa.Sandbox, int]]:
    server = await asyncio.start_server(_serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    mode = capsa.NetworkMode.user_nat().host_alias("203.0.113.7", "127.0.0.1").build()
    async with server:
        builder = capsa.sandbox().arch("aarch64").network(mode).timeout(180)
        async with await builder.build() as sb:
            yield sb, port


async def test_arm64_sandbox_exec_and_file_round_trip(
    arm_sandbox: tuple[capsa.Sandbox, int],
) -> None:
    sb, _ = arm_sandbox
    agent = await sb.agent()
    assert (await agent.exec("uname -m")).stdout == b"aarch64\n"
    await agent.write_file("/tmp/in.bin", DATA)
    r = await agent.exec("sha256sum /tmp/in.bin && cp /tmp/in.bin /tmp/out.bin")
    assert r.stdout.split()[0].decode() == hashlib.sha256(DATA).hexdigest()
    assert await agent.read_file("/tmp/out.bin") == DATA


async def test_arm64_sandbox_network_fetch(arm_sandbox: tuple[capsa.Sandbox, int]) -> None:
    sb, port = arm_sandbox
    agent = await sb.agent()
    await guest_address(agent)
    await agent.write_file("/tmp/fetch.py", FETCH.encode())
    r = await agent.exec(f"{GUEST_PY} /tmp/fetch.py 203.0.113.7 {port}", timeout=120)
    assert r.exit_code == 0, r.stderr
    assert await agent.read_file("/tmp/got") == BODY


async def test_arm64_sandbox_fork(arm_sandbox: tuple[capsa.Sandbox, int]) -> None:
    sb, _ = arm_sandbox
    agent = await sb.agent()
    await agent.exec("echo before-fork > /tmp/mark")
    (clone,) = await sb.fork(1)
    async with clone:
        cagent = await clone.agent()
        assert (await cagent.exec("cat /tmp/mark; uname -m")).stdout == b"before-fork\naarch64\n"


async def test_arm64_uefi_firmware_boots_the_kernel(tmp_path: Path) -> None:
    """AAVMF (qemu-efi-aarch64) starts the arm64 kernel's EFI stub from an ESP."""
    kernel = default_kernel(arch="aarch64")
    esp = tmp_path / "esp.img"
    mkfs = find_tool("mkfs.vfat") or "mkfs.vfat"
    subprocess.run(
        [mkfs, "-C", "-n", "ESP", str(esp), str(64 * 1024)], check=True, capture_output=True
    )
    for d in ("/EFI", "/EFI/BOOT"):
        subprocess.run(["mmd", "-i", str(esp), f"::{d}"], check=True)
    subprocess.run(
        ["mcopy", "-i", str(esp), str(kernel.path), "::/EFI/BOOT/BOOTAA64.EFI"], check=True
    )
    store = tmp_path / "vars.fd"
    boot = capsa.UefiBoot(capsa.DiskImage(esp)).with_efi_variable_store(store)
    async with await capsa.vm(boot).arch("aarch64").console_enabled().timeout(120).build() as vm:
        console = await vm.console()
        await console.wait_for("EFI stub: Booting Linux Kernel", timeout=240)
        await console.wait_for("Linux version 6", timeout=120)
    assert store.stat().st_size > 0  # the variable store is the VM's own copy


async def test_arm64_sandbox_pool_restores_members(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A template store of its own: one member makes the template (booted cold), the
    # other waits for it and is restored from it.
    monkeypatch.setenv("CAPSA_TEMPLATE_DIR", str(tmp_path / "templates"))
    pool = await capsa.sandbox().arch("aarch64").timeout(180).pool(2)
    try:
        async with await pool.reserve(timeout=180) as a, await pool.reserve(timeout=180) as b:
            restored = [m.vm.backend_vm.restore_from is not None for m in (a, b)]  # type: ignore[attr-defined]
            assert sorted(restored) == [False, True]
            for member in (a, b):
                r = await (await member.agent()).exec("uname -m")
                assert r.stdout == b"aarch64\n"
    finally:
        await pool.close()
