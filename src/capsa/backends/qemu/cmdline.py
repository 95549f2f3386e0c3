"""Turning a :class:`VmConfig` into a QEMU command line (pure: no processes, no I/O).

Direct kernel boots use the ``microvm`` machine with ACPI on (the Debian kernel only
discovers virtio-mmio devices through ACPI) and modern virtio. UEFI boots use ``q35``
with OVMF in pflash and virtio-pci devices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from capsa.backends.qemu.accel import Accel
from capsa.backends.qemu.handover import Drive
from capsa.backends.qemu.probe import QemuInfo
from capsa.net.spec import QemuNat
from capsa.spec.vm import DiskImage, KernelCmdline, LinuxDirectBoot, UefiBoot, VmConfig


@dataclass(frozen=True)
class Firmware:
    """OVMF code (read-only) and the template for a new variable store."""

    code: Path
    vars_template: Path


@dataclass(frozen=True)
class HostFacts:
    """Facts about this host and this VM's plumbing that the command line depends on."""

    qemu_binary: str
    accel: Accel
    # What this QEMU has (None: render names as given, e.g. for a command line on macOS).
    qemu: QemuInfo | None = None
    tsc_khz: int | None = None
    console_fd: int | None = None
    qmp_fd: int | None = None
    serial_port_fds: dict[str, int] = field(default_factory=dict)
    # Sockets connected to capsa's vhost-user back ends (vsock; one per share, in the order
    # of VmConfig.shares) and to the VM's network port (a datagram one: bound and connected).
    vsock_fd: int | None = None
    virtio_fs_fds: tuple[int, ...] = ()
    net_fd: int | None = None
    net_datagram: bool = False
    net_mtu: int = 1500
    # What QEMU opens by these names rather than the config's paths (see handover.py):
    # the kernel and initrd, each disk (in the order of VmConfig.all_disks) and UEFI flash.
    kernel: str | None = None
    initrd: str | None = None
    drives: tuple[Drive, ...] = ()
    pflash: tuple[str, str] | None = None
    add_fds: tuple[tuple[int, int], ...] = ()
    mac: str = "52:54:00:12:34:56"
    guest_cid: int = 3
    firmware: Firmware | None = None
    efi_vars: Path | None = None
    # Guest RAM in a file (what makes a VM snapshottable): shared while the VM runs from
    # its own file, private (copy-on-write) when restored from a snapshot's file; a file
    # QEMU may only read is mapped with readonly=on,rom=off (QEMU 8.2 and later).
    ram_file: str | None = None
    ram_private: bool = False
    ram_readonly: bool = False
    # Start paused, waiting for a snapshot's device state (QMP migrate-incoming).
    incoming: bool = False
    # The guest's architecture (x86_64: microvm/q35; aarch64: virt) and how shares travel.
    arch: str = "x86_64"
    share_transport: str = "virtiofs"
    # QEMU's seccomp filter: no obsolete syscalls, no set*id, no spawning, no resource
    # control. Everything QEMU needs afterwards (migration streams) reaches it as an fd.
    seccomp: bool = False


GUEST_ASLR_SYSCTL = "sysctl.kernel.randomize_va_space"
SECCOMP = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


def default_cmdline(config: VmConfig, facts: HostFacts) -> KernelCmdline:
    """The kernel arguments capsa always passes; the user's args are merged over these."""
    arm = facts.arch == "aarch64"
    line = (
        KernelCmdline()
        .with_arg("console", "ttyAMA0" if arm else "ttyS0")
        .with_arg("reboot", "t")
        .with_arg("panic", "-1")
        .with_arg("quiet")
        # The crypto self-tests cost ~0.3 s of emulated CPU on every boot.
        .with_arg("cryptomgr.notests")
    )
    if not arm:
        line = line.with_arg("8250.nr_uarts", "1")
    if facts.accel is Accel.TCG and facts.tsc_khz and not arm:
        # Without it, microvm guests under TCG hang in TSC calibration in ~10% of boots.
        line = line.with_arg("tsc_early_khz", str(facts.tsc_khz))
    if facts.accel is Accel.TCG:
        # TCG reuses the code it translated only where it runs at the same address again:
        # with the guest's ASLR every process retranslates its shared libraries, which
        # costs a dynamically linked command about half of its run time. Only the guest's
        # own processes lose ASLR; a user's value for the same key wins.
        line = line.with_arg(GUEST_ASLR_SYSCTL, "0")
    if isinstance(config.boot, LinuxDirectBoot) and config.boot.root_disk is not None:
        line = line.with_arg("root", "/dev/vda")
    return line


def guest_defaults(arch: str, accel: Accel) -> str:
    """capsa's own kernel arguments for any guest of ``arch`` under ``accel``: a template
    made with other defaults holds a guest that booted differently."""
    config = VmConfig(boot=LinuxDirectBoot(Path("/kernel")), arch=arch)
    facts = HostFacts(qemu_binary="", accel=accel, arch=arch)
    return KernelCmdline().merged_over(default_cmdline(config, facts))


def kernel_cmdline(config: VmConfig, facts: HostFacts) -> str:
    return config.cmdline.merged_over(default_cmdline(config, facts))


def _needs_shared_memory(facts: HostFacts) -> bool:
    # vhost-user back ends map guest RAM, so it must be shared: a memfd, or a file mapped
    # shared (a VM that can be snapshotted).
    return facts.vsock_fd is not None or bool(facts.virtio_fs_fds)


def _drive_args(index: int, disk: DiskImage, bus_suffix: str, source: Drive | None) -> list[str]:
    readonly = "on" if disk.is_read_only else "off"
    file = _escape(source.file if source else str(disk.path))
    drive = (
        f"if=none,id=disk{index},file={file},"
        f"format={disk.format.value},readonly={readonly},cache=writeback,discard=unmap"
    )
    for depth, (backing, fmt) in enumerate(source.backing if source else (), start=1):
        prefix = "backing." * depth
        drive += f",{prefix}file.filename={_escape(backing)},{prefix}driver={fmt}"
    return ["-drive", drive, "-device", f"virtio-blk-{bus_suffix},drive=disk{index}"]


def _virtio_9p_args(config: VmConfig, bus: str) -> list[str]:
    """Shares through QEMU's own 9p server (hosts without vhost-user, i.e. macOS)."""
    argv = []
    for i, share in enumerate(config.shares):
        readonly = ",readonly=on" if share.read_only else ""
        argv += [
            "-fsdev",
            f"local,id=fs{i},path={_escape(str(share.host_path))},security_model=none{readonly}",
            "-device",
            f"virtio-9p-{bus},fsdev=fs{i},mount_tag={_escape(share.tag)}",
        ]
    return argv


def _netdev(facts: HostFacts) -> str:
    if facts.net_datagram:
        return f"dgram,id=net0,local.type=fd,local.str={facts.net_fd}"
    return f"stream,id=net0,server=off,addr.type=fd,addr.str={facts.net_fd}"


def machine_name(arch: str, uefi: bool) -> str:
    """The machine a guest runs on: ``microvm`` for direct boots (``q35`` for UEFI) on
    x86_64, ``virt`` on aarch64."""
    if arch == "aarch64":
        return "virt"
    return "q35" if uefi else "microvm"


def _machine(facts: HostFacts, uefi: bool) -> str:
    """The machine option: an alias (``q35``, ``virt``) is pinned to the versioned type it
    stands for in this QEMU, so the command line says exactly which machine runs."""
    name = machine_name(facts.arch, uefi)
    if facts.qemu is not None:
        name = facts.qemu.machine(name) or name
    if name == "microvm":
        # The Debian kernel finds virtio-mmio devices only through ACPI.
        return "microvm,acpi=on,pit=on,rtc=on"
    return name


def _pflash_args(facts: HostFacts) -> list[str]:
    """UEFI firmware code (read-only) and its variable store, in flash."""
    if facts.pflash is not None:
        code, variables = facts.pflash
    else:
        assert facts.firmware is not None and facts.efi_vars is not None
        code, variables = str(facts.firmware.code), str(facts.efi_vars)
    return [
        "-drive",
        f"if=pflash,format=raw,unit=0,readonly=on,file={_escape(code)}",
        "-drive",
        f"if=pflash,format=raw,unit=1,file={_escape(variables)}",
    ]


def _escape(value: str) -> str:
    """QEMU option values use ',' as separator; a literal comma is written ',,'."""
    return value.replace(",", ",,")


def build_argv(config: VmConfig, facts: HostFacts) -> list[str]:
    """The full QEMU argv for ``config`` on this host."""
    uefi = isinstance(config.boot, UefiBoot)
    bus = "pci" if uefi else "device"
    mem_mb = config.resources.memory_mb
    argv = [
        facts.qemu_binary,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-accel",
        facts.accel.value,
        "-smp",
        str(config.resources.cpus),
        "-m",
        f"{mem_mb}M",
    ]
    if facts.seccomp:
        argv += ["-sandbox", SECCOMP]
    arm = facts.arch == "aarch64"
    if facts.accel in (Accel.KVM, Accel.HVF):
        argv += ["-cpu", "host"]
    elif arm:
        argv += ["-cpu", "max"]
    else:
        # RDRAND lets the guest kernel seed its CRNG at once; without it the first
        # getrandom() (Python's start-up) waits ~1 s for jitter entropy under TCG.
        argv += ["-cpu", "qemu64,+rdrand"]
    # aarch64's virt has virtio-mmio transports like microvm, and PCI for UEFI boots.
    machine = _machine(facts, uefi)
    if facts.ram_file is not None:
        if facts.ram_private and _needs_shared_memory(facts):
            raise ValueError("vhost-user back ends cannot see a privately mapped guest RAM")
        mapping = "off" if facts.ram_private else "on"
        backend = f"memory-backend-file,id=mem,size={mem_mb}M,"
        backend += f"mem-path={_escape(facts.ram_file)},share={mapping}"
        if facts.ram_readonly:
            backend += ",readonly=on,rom=off"
        argv += ["-object", backend]
        machine += ",memory-backend=mem"
    elif _needs_shared_memory(facts):
        argv += ["-object", f"memory-backend-memfd,id=mem,size={mem_mb}M,share=on"]
        machine += ",memory-backend=mem"
    argv += ["-machine", machine]
    if not uefi:
        argv += ["-global", "virtio-mmio.force-legacy=false"]

    for fd, fdset in facts.add_fds:
        argv += ["-add-fd", f"fd={fd},set={fdset}"]
    if isinstance(config.boot, LinuxDirectBoot):
        argv += ["-kernel", facts.kernel or str(config.boot.kernel)]
        if config.boot.initrd is not None:
            argv += ["-initrd", facts.initrd or str(config.boot.initrd)]
        argv += ["-append", kernel_cmdline(config, facts)]
    else:
        argv += _pflash_args(facts)

    if facts.incoming:
        argv += ["-incoming", "defer"]
    if facts.console_fd is not None:
        argv += ["-chardev", f"socket,id=con0,fd={facts.console_fd}", "-serial", "chardev:con0"]
    else:
        argv += ["-serial", "none"]
    if facts.qmp_fd is not None:
        argv += [
            "-chardev",
            f"socket,id=qmp0,fd={facts.qmp_fd}",
            "-mon",
            "chardev=qmp0,mode=control",
        ]

    for i, disk in enumerate(config.all_disks):
        argv += _drive_args(i, disk, bus, facts.drives[i] if facts.drives else None)

    if facts.serial_port_fds:
        argv += ["-device", f"virtio-serial-{bus},max_ports={len(facts.serial_port_fds) + 1}"]
        for i, (name, fd) in enumerate(sorted(facts.serial_port_fds.items()), start=1):
            argv += [
                "-chardev",
                f"socket,id=vport{i},fd={fd}",
                "-device",
                f"virtserialport,chardev=vport{i},name={name},nr={i}",
            ]

    if facts.vsock_fd is not None:
        argv += [
            "-chardev",
            f"socket,id=vsock0,fd={facts.vsock_fd}",
            "-device",
            f"vhost-user-vsock-{bus},chardev=vsock0",
        ]
    if facts.share_transport == "9p":
        argv += _virtio_9p_args(config, bus)
    virtio_fs = config.shares if facts.share_transport == "virtiofs" else ()
    for i, (share, fd) in enumerate(zip(virtio_fs, facts.virtio_fs_fds, strict=True)):
        # 1024-entry queues: a 1 MiB request needs ~260 descriptors, and the guest sizes its
        # largest request by the queue.
        argv += [
            "-chardev",
            f"socket,id=fs{i},fd={fd}",
            "-device",
            f"vhost-user-fs-{bus},chardev=fs{i},tag={_escape(share.tag)},queue-size=1024",
        ]
    if facts.net_fd is not None:
        argv += [
            "-netdev",
            _netdev(facts),
            "-device",
            f"virtio-net-{bus},netdev=net0,mac={facts.mac},host_mtu={facts.net_mtu}",
        ]
    elif isinstance(config.network, QemuNat):
        # QEMU's own slirp: no policy, no forwards (that is what our stack is for).
        argv += [
            "-netdev",
            "user,id=net0",
            "-device",
            f"virtio-net-{bus},netdev=net0,mac={facts.mac}",
        ]
    # Entropy for the guest's RNG, so early userspace never blocks on getrandom().
    argv += [
        "-object",
        "rng-random,id=rng0,filename=/dev/urandom",
        "-device",
        f"virtio-rng-{bus},rng=rng0",
    ]
    return argv
