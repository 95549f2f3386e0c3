"""What a VM is made of: boot method, disks, kernel command line, resources, vsock ports,
and :class:`VmConfig`, which gathers them with the shares and the network. Immutable data:
builders produce it, backends consume it, snapshots store it (:mod:`capsa.spec.codec`).
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from capsa._util.host import host_arch
from capsa.errors import InvalidConfig
from capsa.net.spec import NetworkConfig
from capsa.spec.shares import SharedDir

GUEST_ARCHES = ("x86_64", "aarch64")


class ImageFormat(enum.Enum):
    RAW = "raw"
    QCOW2 = "qcow2"

    @classmethod
    def from_path(cls, path: Path) -> ImageFormat:
        """Infer the format from the file extension (``.qcow2`` or raw)."""
        return cls.QCOW2 if path.suffix.lower() == ".qcow2" else cls.RAW


@dataclass(frozen=True)
class DiskImage:
    """A block device backed by a host file; attached as virtio-blk (/dev/vdX).

    ``DiskImage("data.img").read_only()`` attaches it read-only; ``is_read_only`` says
    which it is."""

    path: Path
    format: ImageFormat
    is_read_only: bool = False

    def __init__(
        self,
        path: str | Path,
        format: ImageFormat | None = None,
        read_only: bool | None = None,
    ) -> None:
        if read_only is not None:
            warnings.warn(
                "DiskImage(..., read_only=...) is deprecated: use DiskImage(...).read_only()",
                DeprecationWarning,
                stacklevel=2,
            )
        p = Path(path).expanduser()
        object.__setattr__(self, "path", p)
        object.__setattr__(self, "format", format or ImageFormat.from_path(p))
        object.__setattr__(self, "is_read_only", bool(read_only))

    @classmethod
    def with_format(cls, path: str | Path, format: ImageFormat) -> DiskImage:
        if not isinstance(format, ImageFormat):
            raise InvalidConfig(f"unknown disk image format: {format!r}")
        return cls(path, format)

    def read_only(self) -> DiskImage:
        """The same disk, attached read-only."""
        disk = DiskImage(self.path, self.format)
        object.__setattr__(disk, "is_read_only", True)
        return disk


@dataclass(frozen=True)
class LinuxDirectBoot:
    """Boot a Linux kernel and initrd directly (no firmware): the fastest path."""

    kernel: Path
    initrd: Path | None = None
    root_disk: DiskImage | None = None

    def __init__(
        self,
        kernel: str | Path,
        initrd: str | Path | None = None,
        root_disk: DiskImage | None = None,
    ) -> None:
        object.__setattr__(self, "kernel", Path(kernel).expanduser())
        object.__setattr__(self, "initrd", Path(initrd).expanduser() if initrd else None)
        object.__setattr__(self, "root_disk", root_disk)

    def with_root_disk(self, disk: DiskImage | str | Path) -> LinuxDirectBoot:
        d = disk if isinstance(disk, DiskImage) else DiskImage(disk)
        return LinuxDirectBoot(self.kernel, self.initrd, d)


@dataclass(frozen=True)
class UefiBoot:
    """Boot a disk through UEFI firmware (OVMF on x86_64)."""

    disk: DiskImage
    efi_variable_store: Path | None = None
    create_variable_store: bool = True

    def with_efi_variable_store(self, path: str | Path) -> UefiBoot:
        """Keep EFI variables in ``path``; it is created from the firmware template if missing."""
        return replace(self, efi_variable_store=Path(path).expanduser(), create_variable_store=True)

    def with_existing_efi_variable_store(self, path: str | Path) -> UefiBoot:
        return replace(
            self, efi_variable_store=Path(path).expanduser(), create_variable_store=False
        )


BootConfig = LinuxDirectBoot | UefiBoot


@dataclass(frozen=True)
class CmdlineArg:
    key: str
    value: str | None = None

    def render(self) -> str:
        return self.key if self.value is None else f"{self.key}={self.value}"


@dataclass(frozen=True)
class KernelCmdline:
    """An ordered kernel command line; a later entry replaces an earlier one with the same key."""

    args: tuple[CmdlineArg, ...] = ()
    override: str | None = None

    def with_arg(self, key: str, value: str | None = None) -> KernelCmdline:
        _check_cmdline_token(key, "key")
        if value is not None:
            _check_cmdline_token(value, "value", allow_equals=True)
        kept = tuple(a for a in self.args if a.key != key)
        return replace(self, args=(*kept, CmdlineArg(key, value)))

    def with_args(self, args: Iterable[CmdlineArg]) -> KernelCmdline:
        out = self
        for a in args:
            out = out.with_arg(a.key, a.value)
        return out

    def with_override(self, line: str) -> KernelCmdline:
        return replace(self, override=line)

    def merged_over(self, defaults: KernelCmdline) -> str:
        """Render ``defaults`` followed by our args (ours win), or our override verbatim."""
        if self.override is not None:
            return self.override
        return " ".join(a.render() for a in defaults.with_args(self.args).args)

    @staticmethod
    def parse(line: str) -> KernelCmdline:
        out = KernelCmdline()
        for token in line.split():
            key, sep, value = token.partition("=")
            out = out.with_arg(key, value if sep else None)
        return out


def _check_cmdline_token(token: str, what: str, allow_equals: bool = False) -> None:
    if not token or any(c.isspace() for c in token) or (not allow_equals and "=" in token):
        raise InvalidConfig(f"invalid kernel command line {what}: {token!r}")


@dataclass(frozen=True)
class VsockPortConfig:
    """One vsock port bridged to a host Unix socket.

    ``connect=False`` (listen mode): the guest connects to CID 2:port and host programs
    connect to ``socket_path`` to talk to it. ``connect=True``: each host client of
    ``socket_path`` makes capsa open a connection to the guest's port.
    """

    port: int
    socket_path: Path | None = None
    connect: bool = False

    @classmethod
    def listen(cls, port: int, socket_path: str | Path) -> VsockPortConfig:
        return cls(port, Path(socket_path), connect=False)

    @classmethod
    def listen_auto(cls, port: int) -> VsockPortConfig:
        return cls(port, None, connect=False)

    @classmethod
    def connect_to(cls, port: int, socket_path: str | Path | None = None) -> VsockPortConfig:
        return cls(port, Path(socket_path) if socket_path else None, connect=True)

    @property
    def auto_cleanup(self) -> bool:
        """Auto-generated paths belong to the VM and are removed with it."""
        return self.socket_path is None


@dataclass(frozen=True)
class ResourceConfig:
    cpus: int = 1
    memory_mb: int = 512


class GuestOs(enum.Enum):
    LINUX = "linux"


@dataclass(frozen=True)
class VmConfig:
    """Everything a backend needs to start one VM. Produced by the builders, validated there."""

    boot: BootConfig
    resources: ResourceConfig = field(default_factory=ResourceConfig)
    disks: tuple[DiskImage, ...] = ()
    cmdline: KernelCmdline = field(default_factory=KernelCmdline)
    console: bool = False
    vsock_ports: tuple[VsockPortConfig, ...] = ()
    shares: tuple[SharedDir, ...] = ()
    timeout: float | None = None
    # Named virtio-serial ports (name -> purpose); the sandbox uses one for its agent.
    serial_ports: tuple[str, ...] = ()
    network: NetworkConfig | None = None
    arch: str = field(default_factory=lambda: host_arch())  # the guest's: x86_64 or aarch64
    backend: str | None = None  # "qemu", "vfkit"; None: CAPSA_BACKEND or the platform's

    @property
    def all_disks(self) -> tuple[DiskImage, ...]:
        """Disks in guest order: the root disk (or UEFI boot disk) first, so it is /dev/vda."""
        if isinstance(self.boot, UefiBoot):
            return (self.boot.disk, *self.disks)
        if self.boot.root_disk is not None:
            return (self.boot.root_disk, *self.disks)
        return self.disks
