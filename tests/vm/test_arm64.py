"""arm64 guests under TCG on this x86_64 host: qemu-system-aarch64 -M virt, Debian's arm64
cloud kernel and busybox (multi-arch apt downloads). Few tests: every boot is emulated."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import capsa
from capsa.images.kernel import KernelImage, default_kernel
from capsa.images.shell import MARKER, shell_initramfs

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
    vm = await builder.disk(capsa.DiskImage(disk, read_only=True)).build()
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
