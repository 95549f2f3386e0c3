"""``capsa.vm(boot)`` and ``capsa.pool(boot)``: VM builders. They validate everything
before anything starts.

One core (:class:`VmSettings`) holds what a VM is built from; :class:`VmBuilder` builds one
VM or a pool of them, :class:`PoolBuilder` is the seeds' ``capsa.pool(boot)...build(n)``,
and the sandbox builder wraps a :class:`VmBuilder` of its own.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Self

from capsa.api.handle import VmHandle
from capsa.api.launch import start_vm
from capsa.api.network import NetworkArg, NetworkInterface, network_choice
from capsa.api.pool import Pool, SnapshotTemplate, start_pool
from capsa.api.snapshot import read_meta
from capsa.api.starting import Starting
from capsa.errors import InvalidConfig
from capsa.net.spec import NetworkConfig
from capsa.spec.shares import MountMode, Ownership, SharedDir, check_shares
from capsa.spec.vm import (
    BootConfig,
    DiskImage,
    ImageFormat,
    KernelCmdline,
    LinuxDirectBoot,
    ResourceConfig,
    UefiBoot,
    VmConfig,
    VsockPortConfig,
)

MIN_MEMORY_MB = 64
MAX_CPUS = 255
QCOW2_MAGIC = b"QFI\xfb"


class VmSettings:
    """What a VM is built from; every setter returns the builder, for chaining."""

    def __init__(self, boot: BootConfig | None) -> None:
        if boot is not None and not isinstance(boot, LinuxDirectBoot | UefiBoot):
            raise InvalidConfig(f"boot must be LinuxDirectBoot or UefiBoot, not {boot!r}")
        self._boot = boot
        self._cpus = 1
        self._memory_mb = 512
        self._timeout: float | None = None
        self._console = False
        self._disks: list[DiskImage] = []
        self._cmdline = KernelCmdline()
        self._cmdline_edited = False
        self._vsock: list[VsockPortConfig] = []
        self._serial_ports: list[str] = []
        self._ready_pattern: str | None = None
        self._network: NetworkConfig | None = None
        self._shares: list[SharedDir] = []
        self._arch: str | None = None
        self._backend: str | None = None

    def copy(self) -> Self:
        """An independent builder with the same settings (later calls change only one)."""
        return copy.deepcopy(self)

    # -- resources ------------------------------------------------------------------------------

    def cpus(self, n: int) -> Self:
        self._cpus = n
        return self

    def memory_mb(self, mb: int) -> Self:
        self._memory_mb = mb
        return self

    def timeout(self, seconds: float) -> Self:
        """Bound on booting and on console/agent waits that do not give their own timeout."""
        self._timeout = seconds
        return self

    def ready_when(self, pattern: str) -> Self:
        """``build()`` returns only once ``pattern`` appeared on the serial console.

        With ``timeout()``, a guest that never prints it (or stops first) is killed and
        ``build()`` raises, instead of leaving a hung VM behind.
        """
        if not pattern:
            raise InvalidConfig("ready_when() needs a non-empty pattern")
        self._ready_pattern = pattern
        return self

    def network(self, mode: NetworkArg) -> Self:
        """``NetworkMode.NONE``/``NAT``/``user_nat()``/``cluster(name)`` or a VirtualNetwork."""
        self._network = network_choice(mode)
        return self

    def interface(self, interface: NetworkInterface) -> Self:
        """A port on a ``VirtualNetwork`` with its own forwards: ``NetworkInterface(net)...``."""
        self._network = network_choice(interface)
        return self

    def arch(self, arch: str) -> Self:
        """The guest's architecture: ``x86_64`` or ``aarch64`` (default: the host's)."""
        self._arch = arch
        return self

    def backend(self, name: str) -> Self:
        """The hypervisor backend: ``qemu`` or ``vfkit`` (default: ``CAPSA_BACKEND``, else
        the platform's)."""
        self._backend = name
        return self

    def console_enabled(self) -> Self:
        self._console = True
        return self

    def disk(self, disk: DiskImage | str | Path) -> Self:
        self._disks.append(disk if isinstance(disk, DiskImage) else DiskImage(disk))
        return self

    # -- shared folders ---------------------------------------------------------------------------

    def share(
        self,
        host_path: str | Path,
        tag: str,
        mode: MountMode = MountMode.READ_ONLY,
        *,
        ownership: Ownership | None = None,
    ) -> Self:
        """Export ``host_path`` as a virtio-fs device; the guest mounts it by ``tag``
        (``mount -t virtiofs TAG /mnt``). Owners appear as root unless ``ownership`` says
        otherwise."""
        return self.shared_dir(SharedDir.of(host_path, tag, mode, ownership))

    def shared_dir(self, share: SharedDir) -> Self:
        self._shares.append(share)
        return self

    # -- kernel command line ----------------------------------------------------------------------

    def cmdline_arg(self, key: str, value: str) -> Self:
        self._cmdline = self._cmdline.with_arg(key, value)
        self._cmdline_edited = True
        return self

    def cmdline_flag(self, name: str) -> Self:
        self._cmdline = self._cmdline.with_arg(name)
        self._cmdline_edited = True
        return self

    def cmdline_override(self, line: str) -> Self:
        self._cmdline = self._cmdline.with_override(line)
        return self

    # -- vsock ----------------------------------------------------------------------------------

    def vsock_listen(self, port: int) -> Self:
        self._vsock.append(VsockPortConfig.listen_auto(port))
        return self

    def vsock_listen_at(self, port: int, path: str | Path) -> Self:
        self._vsock.append(VsockPortConfig.listen(port, path))
        return self

    def vsock_connect(self, port: int) -> Self:
        self._vsock.append(VsockPortConfig.connect_to(port))
        return self

    def vsock_connect_at(self, port: int, path: str | Path) -> Self:
        self._vsock.append(VsockPortConfig.connect_to(port, path))
        return self

    def vsock(self, port: VsockPortConfig) -> Self:
        self._vsock.append(port)
        return self

    def serial_port(self, name: str) -> Self:
        """A named virtio-serial port (the sandbox's agent channel is one); its host end is
        ``vm.backend_vm.serial_port_socket(name)``."""
        self._serial_ports.append(name)
        return self

    # -- the result -----------------------------------------------------------------------------

    def with_boot(self, boot: BootConfig) -> Self:
        self._boot = boot
        return self

    def config(self) -> VmConfig:
        """Validate and freeze the configuration (no process is started)."""
        if self._boot is None:
            raise InvalidConfig(
                "no boot method: capsa.vm(boot) needs a LinuxDirectBoot or UefiBoot"
            )
        config = VmConfig(
            boot=self._boot,
            resources=ResourceConfig(cpus=self._cpus, memory_mb=self._memory_mb),
            disks=tuple(self._disks),
            cmdline=self._cmdline,
            console=self._console,
            vsock_ports=tuple(self._vsock),
            shares=tuple(self._shares),
            timeout=self._timeout,
            backend=self._backend,
            serial_ports=tuple(self._serial_ports),
            network=self._network,
        )
        if self._arch is not None:
            config = dataclasses.replace(config, arch=self._arch)
        validate_config(config, cmdline_edited=self._cmdline_edited)
        return config


class VmBuilder(VmSettings):
    """Collects a VM's configuration; ``build()`` validates it and boots the VM."""

    def build(self) -> Starting[VmHandle]:
        """Boot the VM: ``vm = await ....build()``, or ``async with ....build() as vm:``."""
        return Starting(start_ready_vm(self.config(), self._ready_pattern))

    def pool(self, size: int, *, wait: bool = True) -> Starting[Pool[VmHandle]]:
        """A pool of ``size`` identical VMs, kept booted (with ``ready_when()``: each past
        its marker; members after the first are restored from a snapshot of it). ``await``
        returns once ``size`` members are idle; ``wait=False`` returns at once."""
        check_pool_size(size)
        return Starting(vm_pool(self.config(), self._ready_pattern, size, wait))


class PoolBuilder(VmSettings):
    """``capsa.pool(boot)``: the seeds' form of ``capsa.vm(boot)....pool(n)``."""

    def build(self, size: int = 1, *, wait: bool = True) -> Starting[Pool[VmHandle]]:
        check_pool_size(size)
        return Starting(vm_pool(self.config(), self._ready_pattern, size, wait))

    def build_pool(self, size: int, *, wait: bool = True) -> Starting[Pool[VmHandle]]:
        return self.build(size, wait=wait)


def check_pool_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise InvalidConfig(f"pool size must be at least 1, got {size!r}")


async def start_ready_vm(config: VmConfig, ready: str | None) -> VmHandle:
    handle = await start_vm(config)
    if ready is not None:
        await handle.wait_ready(ready)
    return handle


async def vm_pool(
    config: VmConfig, ready: str | None, size: int, wait: bool = True
) -> Pool[VmHandle]:
    async def cold() -> VmHandle:
        handle = await start_vm(config)
        try:
            if ready is not None:
                await handle.wait_ready(ready)
        except BaseException:
            await handle.kill()
            raise
        return handle

    async def snapshot(handle: VmHandle, path: Path) -> Path:
        return (await handle.snapshot(path)).path

    async def restore(path: Path) -> VmHandle:
        # The same MAC as the template: a plain guest has no agent to learn a new one.
        return await start_vm(config, restore_from=path, mac=read_meta(path).mac)

    async def destroy(handle: VmHandle) -> None:
        await handle.kill()

    if ready is None:  # no point where members are known to be ready: boot each one
        return await start_pool(size, cold, destroy, wait=wait)
    template = SnapshotTemplate(
        cold=cold,
        snapshot=snapshot,
        restore=restore,
        backend_vm=lambda h: h.backend_vm,
        memory_mb=config.resources.memory_mb,
    )
    return await start_pool(size, template.new_member, destroy, template.close, wait=wait)


def validate_config(config: VmConfig, cmdline_edited: bool = False) -> None:
    r = config.resources
    if not isinstance(r.cpus, int) or r.cpus < 1:
        raise InvalidConfig(f"cpus must be at least 1, got {r.cpus!r}")
    if r.cpus > MAX_CPUS:
        raise InvalidConfig(f"cpus must be at most {MAX_CPUS}, got {r.cpus}")
    if not isinstance(r.memory_mb, int) or r.memory_mb < MIN_MEMORY_MB:
        raise InvalidConfig(f"memory too small: {r.memory_mb!r} MB (minimum {MIN_MEMORY_MB} MB)")
    if config.timeout is not None and config.timeout <= 0:
        raise InvalidConfig(f"timeout must be positive, got {config.timeout}")
    _validate_boot(config, cmdline_edited)
    for disk in config.all_disks:
        _validate_disk(disk)
    _validate_vsock(config.vsock_ports)
    check_shares(config.shares)


def _validate_boot(config: VmConfig, cmdline_edited: bool) -> None:
    boot = config.boot
    if isinstance(boot, LinuxDirectBoot):
        _require_file(boot.kernel, "kernel")
        if boot.initrd is not None:
            _require_file(boot.initrd, "initrd")
        if config.cmdline.override is not None and cmdline_edited:
            raise InvalidConfig(
                "cmdline_override() replaces the whole kernel command line; "
                "it cannot be combined with cmdline_arg()/cmdline_flag()"
            )
    elif cmdline_edited or config.cmdline.override is not None:
        raise InvalidConfig("the kernel command line can only be set for LinuxDirectBoot")


def _require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise InvalidConfig(f"{what} not found: {path}")
    if not path.is_file():
        raise InvalidConfig(f"{what} is not a regular file: {path}")
    if not os.access(path, os.R_OK):
        raise InvalidConfig(f"{what} is not readable: {path}")


def _validate_disk(disk: DiskImage) -> None:
    if not isinstance(disk.format, ImageFormat):
        raise InvalidConfig(f"unknown disk image format {disk.format!r} for {disk.path}")
    if not disk.path.exists():
        kind = "read-only disk" if disk.is_read_only else "disk"
        raise InvalidConfig(f"{kind} not found: {disk.path}")
    if not disk.path.is_file() and not disk.path.is_block_device():
        raise InvalidConfig(f"disk is not a file or block device: {disk.path}")
    mode = os.R_OK if disk.is_read_only else os.R_OK | os.W_OK
    if not os.access(disk.path, mode):
        raise InvalidConfig(
            f"disk not {'readable' if disk.is_read_only else 'writable'}: {disk.path}"
        )
    with open(disk.path, "rb") as f:
        magic = f.read(4)
    if disk.format is ImageFormat.QCOW2 and magic != QCOW2_MAGIC:
        raise InvalidConfig(f"disk declared qcow2 but has no qcow2 header: {disk.path}")
    if disk.format is ImageFormat.RAW and magic == QCOW2_MAGIC:
        raise InvalidConfig(
            f"disk {disk.path} is a qcow2 image: use DiskImage.with_format(path, ImageFormat.QCOW2)"
        )


def _validate_vsock(ports: tuple[VsockPortConfig, ...]) -> None:
    seen: set[int] = set()
    for p in ports:
        if not isinstance(p.port, int) or p.port <= 0 or p.port > 0xFFFFFFFF:
            raise InvalidConfig(f"vsock port must be between 1 and 4294967295, got {p.port!r}")
        if p.port in seen:
            raise InvalidConfig(f"duplicate vsock port: {p.port}")
        seen.add(p.port)
        if p.socket_path is not None and not p.socket_path.parent.is_dir():
            raise InvalidConfig(f"directory for vsock socket does not exist: {p.socket_path}")


def pool(boot: BootConfig) -> PoolBuilder:
    """Start describing a pool of identical pre-booted VMs: ``await capsa.pool(boot).build(4)``
    (the same as ``capsa.vm(boot)....pool(4)``)."""
    return PoolBuilder(boot)


def vm(boot: BootConfig) -> VmBuilder:
    """Start describing a VM that boots ``boot``."""
    return VmBuilder(boot)
