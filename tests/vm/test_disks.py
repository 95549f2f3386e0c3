from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import capsa
from tests.framework.fixtures import boot_shell, disk_file, skip_without

pytestmark = pytest.mark.vm


async def test_raw_disks_in_order_and_guest_writes_reach_the_host(
    shell_boot: capsa.LinuxDirectBoot, tmp_path: Path
) -> None:
    root = disk_file(tmp_path / "root.img", content=b"ROOTDISK")
    data = disk_file(tmp_path / "data.raw", content=b"DATADISK")
    boot = capsa.LinuxDirectBoot(shell_boot.kernel, shell_boot.initrd).with_root_disk(
        capsa.DiskImage(root)
    )
    vm, console = await boot_shell(capsa.vm(boot).disk(capsa.DiskImage(data)))
    async with vm:
        assert await console.exec("head -c 8 /dev/vda; echo; head -c 8 /dev/vdb", timeout=20) == (
            "ROOTDISK\nDATADISK"
        )
        # The guest computes the value; the host checks the file after the VM is gone.
        await console.exec(
            "echo $((1000 + 337)) | dd of=/dev/vdb bs=512 seek=8 conv=fsync", timeout=30
        )
        await console.write_line("poweroff -f")
        await vm.wait(timeout=30)
    with open(data, "rb") as f:
        f.seek(8 * 512)
        assert f.read(5) == b"1337\n"


async def test_read_only_disk_rejects_writes(
    shell_boot: capsa.LinuxDirectBoot, tmp_path: Path
) -> None:
    image = disk_file(tmp_path / "ro.img", content=b"KEEPME")
    before = image.read_bytes()
    vm, console = await boot_shell(capsa.vm(shell_boot).disk(capsa.DiskImage(image).read_only()))
    async with vm:
        assert await console.exec("cat /sys/block/vda/ro", timeout=20) == "1\n"
        out = await console.exec(
            "echo junk | dd of=/dev/vda conv=fsync 2>/dev/null; echo rc=$?", timeout=30
        )
        assert out.strip() != "rc=0"
    assert image.read_bytes() == before


async def test_qcow2_overlay_keeps_the_base_unchanged(
    shell_boot: capsa.LinuxDirectBoot, tmp_path: Path
) -> None:
    skip_without("qemu-img")
    base = disk_file(tmp_path / "base.img", content=b"BASEDATA")
    base_bytes = base.read_bytes()
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay)],
        check=True,
    )
    vm, console = await boot_shell(capsa.vm(shell_boot).disk(capsa.DiskImage(overlay)))
    async with vm:
        assert await console.exec("head -c 8 /dev/vda", timeout=20) == "BASEDATA"
        await console.exec("echo $((40 + 2)) | dd of=/dev/vda bs=512 seek=4 conv=fsync", timeout=30)
        await console.write_line("poweroff -f")
        await vm.wait(timeout=30)
    assert base.read_bytes() == base_bytes
    flat = tmp_path / "flat.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(overlay), str(flat)], check=True)
    data = flat.read_bytes()
    assert data[:8] == b"BASEDATA" and data[4 * 512 : 4 * 512 + 3] == b"42\n"


def test_qemu_img_available_for_ci() -> None:
    # The CI script installs qemu-utils; make a missing tool visible instead of silently skipping.
    assert shutil.which("qemu-img"), "qemu-img missing: install qemu-utils"
