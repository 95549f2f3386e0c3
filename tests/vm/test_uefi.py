"""UEFI boot on q35 + OVMF from an ESP image the test builds with systemd-boot."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import capsa
from capsa._util.tools import find_tool
from capsa.images.kernel import KernelImage

pytestmark = pytest.mark.vm

SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")


def build_esp(kernel: KernelImage, initrd: Path, out: Path) -> Path:
    """A FAT ESP: systemd-boot as the removable-media loader, one entry for our kernel."""
    if not SYSTEMD_BOOT.exists():
        pytest.fail("systemd-boot-efi is not installed (the CI script installs it)")
    size_mb = 64 + (initrd.stat().st_size + kernel.path.stat().st_size) // (1 << 20)
    subprocess.run(
        [find_tool("mkfs.vfat") or "mkfs.vfat", "-C", "-n", "ESP", str(out), str(size_mb * 1024)],
        check=True,
        capture_output=True,
    )
    loader = out.parent / "loader.conf"
    loader.write_text("default capsa.conf\ntimeout 0\n")
    entry = out.parent / "capsa.conf"
    entry.write_text(
        "title capsa test\nlinux /vmlinuz\ninitrd /initrd.img\n"
        "options console=ttyS0 panic=-1 reboot=t quiet\n"
    )

    def mcopy(src: Path, dest: str) -> None:
        subprocess.run(["mcopy", "-i", str(out), str(src), f"::{dest}"], check=True)

    for d in ("/EFI", "/EFI/BOOT", "/loader", "/loader/entries"):
        subprocess.run(["mmd", "-i", str(out), f"::{d}"], check=True)
    mcopy(SYSTEMD_BOOT, "/EFI/BOOT/BOOTX64.EFI")
    mcopy(loader, "/loader/loader.conf")
    mcopy(entry, "/loader/entries/capsa.conf")
    mcopy(kernel.path, "/vmlinuz")
    mcopy(initrd, "/initrd.img")
    return out


async def test_uefi_boot_reaches_a_shell_and_keeps_efi_variables(
    kernel: KernelImage, shell_initrd: Path, tmp_path: Path
) -> None:
    esp = build_esp(kernel, shell_initrd, tmp_path / "esp.img")
    store = tmp_path / "efivars.fd"
    boot = capsa.UefiBoot(capsa.DiskImage(esp)).with_efi_variable_store(store)
    async with await capsa.vm(boot).console_enabled().timeout(120).build() as vm:
        console = await vm.console()
        await console.wait_for("CAPSA-SHELL-READY", timeout=240)
        await console.wait_for("# ", timeout=30)
        # Only a firmware boot exposes EFI runtime services to the guest.
        assert (
            await console.exec("test -d /sys/firmware/efi && echo $((20 + 1))", timeout=30)
            == "21\n"
        )
    assert store.exists() and store.stat().st_size > 0


async def test_missing_existing_efi_store_is_rejected(kernel: KernelImage, tmp_path: Path) -> None:
    esp = tmp_path / "esp.img"
    esp.write_bytes(b"\0" * 4096)
    boot = capsa.UefiBoot(capsa.DiskImage(esp)).with_existing_efi_variable_store(
        tmp_path / "nope.fd"
    )
    with pytest.raises(capsa.InvalidConfig, match="EFI variable store not found"):
        await capsa.vm(boot).build()
