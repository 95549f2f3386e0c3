"""The vfkit command line for a VmConfig (pure: no process, no host state).

vfkit drives Apple's Virtualization.framework: raw disks only, virtio-fs shares whose
owners always appear as the caller (DynamicCaller), vsock ports exposed as Unix sockets,
virtio-serial consoles on PTYs, and virtio-net either NAT'ed by macOS or as datagrams on
a Unix socket (where capsa's own network stack can serve it, policies included).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from capsa.errors import UnsupportedFeature
from capsa.net.spec import QemuNat
from capsa.spec.shares import OwnershipMode
from capsa.spec.vm import ImageFormat, LinuxDirectBoot, UefiBoot, VmConfig

log = logging.getLogger("capsa.vfkit")


@dataclass(frozen=True)
class VfkitFacts:
    """This VM's plumbing on the host."""

    binary: str = "vfkit"
    rest_socket: Path = Path("/tmp/capsa-vfkit.sock")
    vsock_paths: dict[int, Path] = field(default_factory=dict)
    net_socket: Path | None = None  # a unixgram socket served by capsa's network stack
    mac: str = "52:54:00:12:34:56"
    efi_vars: Path | None = None


def _opt(value: str) -> str:
    """vfkit separates device options with ','; a value must not contain one."""
    if "," in value:
        raise UnsupportedFeature(f"vfkit cannot take a ',' in an option value: {value!r}")
    return value


def check_vfkit_config(config: VmConfig) -> None:
    """What vfkit cannot do, refused by name before anything starts."""
    for disk in config.all_disks:
        if disk.format is not ImageFormat.RAW:
            raise UnsupportedFeature(
                f"vfkit only attaches raw disks; {disk.path} is {disk.format.value} "
                "(convert it: qemu-img convert -O raw, or use an APFS clone of a raw image)"
            )
    if config.arch != "aarch64" and config.arch != "x86_64":
        raise UnsupportedFeature(f"vfkit cannot run {config.arch} guests")


def build_vfkit_argv(config: VmConfig, facts: VfkitFacts, cmdline: str = "") -> list[str]:
    check_vfkit_config(config)
    argv = [facts.binary, "--cpus", str(config.resources.cpus)]
    argv += ["--memory", str(config.resources.memory_mb)]
    argv += ["--restful-uri", f"unix://{facts.rest_socket}"]
    boot = config.boot
    if isinstance(boot, LinuxDirectBoot):
        parts = [f"kernel={_opt(str(boot.kernel))}"]
        if boot.initrd is not None:
            parts.append(f"initrd={_opt(str(boot.initrd))}")
        if cmdline:
            parts.append(f'cmdline="{cmdline}"')
        argv += ["--bootloader", "linux," + ",".join(parts)]
    elif isinstance(boot, UefiBoot):
        store = facts.efi_vars or boot.efi_variable_store
        if store is None:
            raise UnsupportedFeature("vfkit's EFI boot needs a variable store path")
        argv += ["--bootloader", f"efi,variable-store={_opt(str(store))},create"]
    for disk in config.all_disks:
        argv += ["--device", f"virtio-blk,path={_opt(str(disk.path))}"]
    # The console and, for sandboxes, the agent channel: PTYs whose paths /vm/inspect gives.
    argv += ["--device", "virtio-serial,pty"]
    for _name in config.serial_ports:
        argv += ["--device", "virtio-serial,pty"]
    for port in config.vsock_ports:
        path = facts.vsock_paths.get(port.port) or port.socket_path
        if path is None:
            raise UnsupportedFeature(f"vsock port {port.port} needs a socket path")
        mode = "connect" if port.connect else "listen"
        argv += ["--device", f"virtio-vsock,port={port.port},socketURL={_opt(str(path))},{mode}"]
    for share in config.shares:
        if share.ownership.mode is not OwnershipMode.DYNAMIC_CALLER:
            log.warning(
                "vfkit shares show every file as the caller's: share %r is DynamicCaller, not %s",
                share.tag,
                share.ownership.mode.value,
            )
        shared = _opt(str(share.host_path))
        argv += ["--device", f"virtio-fs,sharedDir={shared},mountTag={_opt(share.tag)}"]
    if isinstance(config.network, QemuNat):
        argv += ["--device", f"virtio-net,nat,mac={facts.mac}"]
    elif config.network is not None:
        if facts.net_socket is None:
            raise UnsupportedFeature("this network needs a datagram port of capsa's stack")
        sock = _opt(str(facts.net_socket))
        argv += ["--device", f"virtio-net,unixSocketPath={sock},mac={facts.mac}"]
    argv += ["--device", "virtio-rng"]
    return argv
