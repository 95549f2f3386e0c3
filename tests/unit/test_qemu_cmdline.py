from pathlib import Path

import pytest

import capsa
from capsa.backends.qemu.accel import Accel, kvm_usability, parse_forced
from capsa.backends.qemu.cmdline import Firmware, HostFacts, build_argv, kernel_cmdline
from capsa.cli import parse_disk, parse_memory
from capsa.config import ResourceConfig, VmConfig
from capsa.spec.vm import KernelCmdline


def _facts(**kw: object) -> HostFacts:
    base: dict[str, object] = {"qemu_binary": "qemu", "accel": Accel.TCG, "tsc_khz": 2596144}
    base.update(kw)
    return HostFacts(**base)  # type: ignore[arg-type]


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_direct_boot_uses_microvm_with_modern_virtio() -> None:
    cfg = VmConfig(boot=capsa.LinuxDirectBoot("/k", "/i"), resources=ResourceConfig(2, 1024))
    argv = build_argv(cfg, _facts(console_fd=5, qmp_fd=6))
    assert _opt(argv, "-machine") == ["microvm,acpi=on,pit=on,rtc=on"]
    assert "virtio-mmio.force-legacy=false" in _opt(argv, "-global")
    assert _opt(argv, "-smp") == ["2"] and _opt(argv, "-m") == ["1024M"]
    assert _opt(argv, "-kernel") == ["/k"] and _opt(argv, "-initrd") == ["/i"]
    assert "socket,id=con0,fd=5" in _opt(argv, "-chardev")
    assert "socket,id=qmp0,fd=6" in _opt(argv, "-chardev")


def test_tsc_early_khz_only_under_tcg() -> None:
    cfg = VmConfig(boot=capsa.LinuxDirectBoot("/k"))
    assert "tsc_early_khz=2596144" in kernel_cmdline(cfg, _facts())
    assert "tsc_early_khz" not in kernel_cmdline(cfg, _facts(accel=Accel.KVM))


def test_guest_aslr_off_under_tcg_only_and_the_user_can_keep_it() -> None:
    cfg = VmConfig(boot=capsa.LinuxDirectBoot("/k"))
    assert "sysctl.kernel.randomize_va_space=0" in kernel_cmdline(cfg, _facts()).split()
    assert "randomize_va_space" not in kernel_cmdline(cfg, _facts(accel=Accel.KVM))
    kept = VmConfig(
        boot=capsa.LinuxDirectBoot("/k"),
        cmdline=KernelCmdline().with_arg("sysctl.kernel.randomize_va_space", "2"),
    )
    line = kernel_cmdline(kept, _facts()).split()
    assert "sysctl.kernel.randomize_va_space=2" in line
    assert "sysctl.kernel.randomize_va_space=0" not in line


def test_root_disk_adds_root_and_is_first_drive() -> None:
    boot = capsa.LinuxDirectBoot("/k").with_root_disk(capsa.DiskImage("/root.img"))
    cfg = VmConfig(boot=boot, disks=(capsa.DiskImage("/d.qcow2").read_only(),))
    argv = build_argv(cfg, _facts())
    drives = _opt(argv, "-drive")
    assert drives[0].startswith("if=none,id=disk0,file=/root.img,format=raw,readonly=off")
    assert drives[1].startswith("if=none,id=disk1,file=/d.qcow2,format=qcow2,readonly=on")
    assert "root=/dev/vda" in kernel_cmdline(cfg, _facts())


def test_commas_in_paths_are_escaped() -> None:
    cfg = VmConfig(boot=capsa.LinuxDirectBoot("/k"), disks=(capsa.DiskImage("/a,b.img"),))
    assert "file=/a,,b.img," in _opt(build_argv(cfg, _facts()), "-drive")[0]


def test_uefi_uses_q35_pflash_and_pci() -> None:
    cfg = VmConfig(boot=capsa.UefiBoot(capsa.DiskImage("/esp.img")))
    fw = Firmware(Path("/code.fd"), Path("/vars.fd"))
    argv = build_argv(cfg, _facts(firmware=fw, efi_vars=Path("/run/vars.fd")))
    assert _opt(argv, "-machine") == ["q35"]
    drives = _opt(argv, "-drive")
    assert "if=pflash,format=raw,unit=0,readonly=on,file=/code.fd" in drives
    assert "if=pflash,format=raw,unit=1,file=/run/vars.fd" in drives
    assert "virtio-blk-pci,drive=disk0" in _opt(argv, "-device")
    assert "-kernel" not in argv


def test_vhost_user_needs_shared_memory() -> None:
    cfg = VmConfig(boot=capsa.LinuxDirectBoot("/k"), resources=ResourceConfig(1, 256))
    argv = build_argv(cfg, _facts(vsock_fd=7))
    assert "memory-backend-memfd,id=mem,size=256M,share=on" in _opt(argv, "-object")
    assert _opt(argv, "-machine")[0].endswith(",memory-backend=mem")
    assert "vhost-user-vsock-device,chardev=vsock0" in _opt(argv, "-device")


def test_serial_ports_are_named() -> None:
    cfg = VmConfig(boot=capsa.LinuxDirectBoot("/k"))
    argv = build_argv(cfg, _facts(serial_port_fds={"org.capsa.agent.0": 9}))
    assert "virtserialport,chardev=vport1,name=org.capsa.agent.0,nr=1" in _opt(argv, "-device")
    assert "socket,id=vport1,fd=9" in _opt(argv, "-chardev")


def test_kvm_detection(tmp_path: Path) -> None:
    mods, dev = tmp_path / "module", tmp_path / "kvm"
    mods.mkdir()
    assert kvm_usability(mods, dev) == (False, f"{dev} does not exist")
    dev.write_bytes(b"")
    (mods / "kvm_pvm").mkdir()
    ok, why = kvm_usability(mods, dev)
    assert not ok and "PVM" in why
    (mods / "kvm_pvm").rmdir()
    assert not kvm_usability(mods, dev)[0]
    (mods / "kvm_amd").mkdir()
    assert kvm_usability(mods, dev)[0]


def test_forced_accel_is_validated() -> None:
    assert parse_forced("KVM") is Accel.KVM
    assert parse_forced("hvf") is Accel.HVF
    with pytest.raises(capsa.InvalidConfig, match="CAPSA_ACCEL='xen'"):
        parse_forced("xen")


@pytest.mark.parametrize(
    ("text", "mb"), [("512", 512), ("512M", 512), ("2G", 2048), ("1GiB", 1024)]
)
def test_parse_memory(text: str, mb: int) -> None:
    assert parse_memory(text) == mb


def test_parse_memory_rejects_garbage() -> None:
    with pytest.raises(capsa.InvalidConfig):
        parse_memory("lots")


def test_parse_disk() -> None:
    assert parse_disk("/a.img:ro").is_read_only
    assert parse_disk("/a.img").path == Path("/a.img")
    assert not parse_disk("/a:b.img").is_read_only


def test_each_share_is_a_vhost_user_fs_device_on_shared_memory() -> None:
    shares = (capsa.SharedDir(Path("/a"), "src"), capsa.SharedDir(Path("/b"), "out"))
    cfg = VmConfig(boot=capsa.LinuxDirectBoot("/k"), shares=shares)
    argv = build_argv(cfg, _facts(virtio_fs_fds=(8, 9)))
    assert _opt(argv, "-machine")[0].endswith(",memory-backend=mem")
    devices = [d for d in _opt(argv, "-device") if d.startswith("vhost-user-fs")]
    assert devices == [
        "vhost-user-fs-device,chardev=fs0,tag=src,queue-size=1024",
        "vhost-user-fs-device,chardev=fs1,tag=out,queue-size=1024",
    ]
    assert "socket,id=fs1,fd=9" in _opt(argv, "-chardev")


def test_handed_over_files_and_sockets_replace_paths() -> None:
    from capsa.backends.qemu.handover import Drive

    base = capsa.DiskImage("/img/overlay.qcow2")
    cfg = VmConfig(boot=capsa.LinuxDirectBoot("/k", "/i").with_root_disk(base))
    argv = build_argv(
        cfg,
        _facts(
            kernel="/dev/fd/5",
            initrd="/dev/fd/6",
            drives=(Drive("/dev/fdset/1", backing=(("/dev/fdset/2", "raw"),)),),
            add_fds=((7, 1), (8, 1), (9, 2)),
            net_fd=10,
            seccomp=True,
        ),
    )
    assert _opt(argv, "-kernel") == ["/dev/fd/5"] and _opt(argv, "-initrd") == ["/dev/fd/6"]
    assert _opt(argv, "-add-fd") == ["fd=7,set=1", "fd=8,set=1", "fd=9,set=2"]
    drive = _opt(argv, "-drive")[0]
    assert "file=/dev/fdset/1,format=qcow2" in drive
    assert drive.endswith("backing.file.filename=/dev/fdset/2,backing.driver=raw")
    assert _opt(argv, "-netdev") == ["stream,id=net0,server=off,addr.type=fd,addr.str=10"]
    assert _opt(argv, "-sandbox") == [
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    ]
    assert "/img/overlay.qcow2" not in " ".join(argv)
