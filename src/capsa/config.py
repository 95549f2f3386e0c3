"""Immutable configuration types: what a VM is made of.

Builders produce these; backends consume them. Nothing here starts a process.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import platform
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from capsa.errors import InvalidConfig

if TYPE_CHECKING:
    from capsa.api.network import NetworkInterface
from capsa.net.policy import NetworkPolicy, Protocol


class ImageFormat(enum.Enum):
    RAW = "raw"
    QCOW2 = "qcow2"

    @classmethod
    def from_path(cls, path: Path) -> ImageFormat:
        """Infer the format from the file extension (``.qcow2`` or raw)."""
        return cls.QCOW2 if path.suffix.lower() == ".qcow2" else cls.RAW


@dataclass(frozen=True)
class DiskImage:
    """A block device backed by a host file; attached as virtio-blk (/dev/vdX)."""

    path: Path
    format: ImageFormat
    is_read_only: bool = False

    def __init__(
        self,
        path: str | Path,
        format: ImageFormat | None = None,
        read_only: bool = False,
    ) -> None:
        p = Path(path).expanduser()
        object.__setattr__(self, "path", p)
        object.__setattr__(self, "format", format or ImageFormat.from_path(p))
        object.__setattr__(self, "is_read_only", read_only)

    @classmethod
    def with_format(cls, path: str | Path, format: ImageFormat) -> DiskImage:
        if not isinstance(format, ImageFormat):
            raise InvalidConfig(f"unknown disk image format: {format!r}")
        return cls(path, format)

    def read_only(self) -> DiskImage:
        return DiskImage(self.path, self.format, read_only=True)


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


class MountMode(enum.Enum):
    READ_ONLY = "ro"
    READ_WRITE = "rw"


class OwnershipMode(enum.Enum):
    PASSTHROUGH = "passthrough"  # host uid/gid as they are; chown is a real host chown
    SQUASH = "squash"  # every file appears owned by one uid/gid; chown succeeds, no effect
    DYNAMIC_CALLER = "dynamic_caller"  # each file appears owned by whoever looks at it


@dataclass(frozen=True)
class Ownership:
    """How a share reports file owners to the guest (files are always created on the host
    with the ids of the process serving the share)."""

    mode: OwnershipMode = OwnershipMode.SQUASH
    uid: int = 0
    gid: int = 0

    def __post_init__(self) -> None:
        for what, value in (("uid", self.uid), ("gid", self.gid)):
            if not 0 <= value < 0xFFFFFFFF:
                raise InvalidConfig(f"ownership {what} {value} is not a valid id")

    @classmethod
    def passthrough(cls) -> Ownership:
        return cls(OwnershipMode.PASSTHROUGH)

    @classmethod
    def squash(cls, uid: int = 0, gid: int = 0) -> Ownership:
        return cls(OwnershipMode.SQUASH, uid, gid)

    @classmethod
    def squash_to_root(cls) -> Ownership:
        return cls(OwnershipMode.SQUASH, 0, 0)

    @classmethod
    def dynamic_caller(cls) -> Ownership:
        return cls(OwnershipMode.DYNAMIC_CALLER)

    def to_arg(self) -> str:
        return f"{self.mode.value}:{self.uid}:{self.gid}"

    @classmethod
    def from_arg(cls, text: str) -> Ownership:
        mode, uid, gid = text.split(":")
        return cls(OwnershipMode(mode), int(uid), int(gid))


MAX_TAG_BYTES = 36  # the virtio-fs config space holds the tag in 36 bytes


@dataclass(frozen=True)
class SharedDir:
    """A host directory exported to the guest as a virtio-fs device with ``tag``.

    ``guest_path`` set: the sandbox's init mounts it there during boot. Without it the
    guest mounts it itself: ``mount -t virtiofs TAG /mnt``.
    """

    host_path: Path
    tag: str
    mode: MountMode = MountMode.READ_ONLY
    ownership: Ownership = field(default_factory=Ownership.squash_to_root)
    guest_path: str | None = None

    @property
    def read_only(self) -> bool:
        return self.mode is MountMode.READ_ONLY

    @classmethod
    def of(
        cls,
        host_path: str | Path,
        tag: str,
        mode: MountMode = MountMode.READ_ONLY,
        ownership: Ownership | None = None,
        guest_path: str | None = None,
    ) -> SharedDir:
        """The builders' shorthand: ``~`` expanded, owners squashed to root by default."""
        owners = ownership or Ownership.squash_to_root()
        return cls(Path(host_path).expanduser(), tag, mode, owners, guest_path)


GUEST_ARCHES = ("x86_64", "aarch64")


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def share_transport() -> str:
    """How shares reach the guest on this host: ``virtiofs`` (capsa's vhost-user server)
    where vhost-user exists (Linux), else QEMU's built-in ``9p`` (macOS); ``CAPSA_SHARES``
    chooses explicitly."""
    forced = os.environ.get("CAPSA_SHARES")
    if forced:
        if forced not in ("virtiofs", "9p"):
            raise InvalidConfig(f"CAPSA_SHARES={forced!r} is not one of: virtiofs, 9p")
        return forced
    return "virtiofs" if sys.platform.startswith("linux") else "9p"


def check_share(share: SharedDir) -> None:
    """Every mistake a share can carry, found at build time."""
    if not isinstance(share.mode, MountMode):
        raise InvalidConfig(f"share {share.tag!r}: mode must be a MountMode, not {share.mode!r}")
    encoded = share.tag.encode()
    if not 0 < len(encoded) <= MAX_TAG_BYTES:
        raise InvalidConfig(f"share tag {share.tag!r} must be 1 to {MAX_TAG_BYTES} bytes")
    if any(c.isspace() or c in ":,=%\0" for c in share.tag) or not share.tag.isprintable():
        raise InvalidConfig(f"share tag {share.tag!r} may not contain spaces, ':', ',', '=', '%'")
    if not share.host_path.exists():
        raise InvalidConfig(f"share {share.tag!r}: host path {share.host_path} does not exist")
    if not share.host_path.is_dir():
        raise InvalidConfig(f"share {share.tag!r}: host path {share.host_path} is not a directory")
    if share.guest_path is not None:
        path = share.guest_path
        if not path.startswith("/") or ".." in path.split("/") or "\0" in path or path == "/":
            raise InvalidConfig(
                f"share {share.tag!r}: guest path {path!r} must be absolute, not '/', without '..'"
            )


def check_shares(shares: Sequence[SharedDir]) -> None:
    tags: set[str] = set()
    paths: set[str] = set()
    for share in shares:
        check_share(share)
        if share.tag in tags:
            raise InvalidConfig(f"share tag {share.tag!r} is used twice")
        tags.add(share.tag)
        if share.guest_path is not None:
            normal = share.guest_path.rstrip("/")
            if normal in paths:
                raise InvalidConfig(f"two shares are mounted at {share.guest_path!r}")
            paths.add(normal)


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
class PortForward:
    """Host ``host_addr:host_port`` -> guest ``guest_port``. Port 0 picks a free host port."""

    protocol: Protocol
    host_port: int
    guest_port: int
    host_addr: str = "127.0.0.1"
    mac: bytes | None = None  # which guest on a shared network (None: the only one)

    def __post_init__(self) -> None:
        if self.protocol not in (Protocol.TCP, Protocol.UDP):
            raise InvalidConfig(f"only TCP and UDP ports can be forwarded, not {self.protocol}")
        if not 0 <= self.host_port <= 65535 or not 0 < self.guest_port <= 65535:
            raise InvalidConfig(f"invalid forward {self.host_port} -> {self.guest_port}")
        try:
            ipaddress.IPv4Address(self.host_addr)
        except ValueError:
            raise InvalidConfig(
                f"forward listen address must be IPv4: {self.host_addr!r}"
            ) from None

    def to_json(self) -> dict[str, object]:
        return {"protocol": self.protocol.value, "host_port": self.host_port,
                "guest_port": self.guest_port, "host_addr": self.host_addr,
                "mac": self.mac.hex() if self.mac else None}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, object]) -> PortForward:
        mac = data.get("mac")
        return cls(Protocol(data["protocol"]), _int(data["host_port"]), _int(data["guest_port"]),
                   str(data.get("host_addr", "127.0.0.1")),
                   bytes.fromhex(mac) if isinstance(mac, str) else None)  # fmt: skip


def _int(value: object) -> int:
    if not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def check_forwards(forwards: Iterable[PortForward]) -> tuple[PortForward, ...]:
    seen: set[tuple[Protocol, str, int]] = set()
    out = tuple(forwards)
    for f in out:
        key = (f.protocol, f.host_addr, f.host_port)
        if f.host_port and key in seen:
            raise InvalidConfig(f"host {f.protocol.value} port {f.host_port} forwarded twice")
        seen.add(key)
    return out


@dataclass(frozen=True)
class UserNatConfig:
    """A private virtual network: a switch with capsa's gateway (NAT, DHCP, DNS, policy)."""

    subnet: str = "10.0.2.0/24"
    mtu: int = 65520
    # (guest-visible IPv4, host IPv4): traffic to the first goes to the second.
    host_aliases: tuple[tuple[str, str], ...] = ()
    # Upstream resolver "host:port" for the gateway's DNS proxy (default: the host's).
    dns_upstream: str | None = None
    policy: NetworkPolicy | None = None
    port_forwards: tuple[PortForward, ...] = ()

    def __post_init__(self) -> None:
        check_subnet(self.subnet)
        check_forwards(self.port_forwards)
        if not 576 <= self.mtu <= 65520:
            raise InvalidConfig(f"MTU {self.mtu} is outside 576..65520")

    @property
    def gateway(self) -> str:
        return str(ipaddress.IPv4Network(self.subnet).network_address + 2)

    @property
    def dhcp_start(self) -> str:
        return str(ipaddress.IPv4Network(self.subnet).network_address + 15)

    @property
    def dhcp_end(self) -> str:
        return str(ipaddress.IPv4Network(self.subnet).broadcast_address - 1)


def check_subnet(cidr: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(cidr, strict=True)
    except ValueError as e:
        raise InvalidConfig(f"invalid subnet {cidr!r}: {e}") from None
    if net.prefixlen > 27:  # the gateway is .1/.2 and leases start at .15
        raise InvalidConfig(f"subnet {cidr} is too small for a gateway and DHCP leases")
    return net


def host_alias(guest_ip: str, host_ip: str) -> tuple[str, str]:
    """A checked (guest-visible IPv4, host IPv4) pair for the gateway's alias map."""
    try:
        return str(ipaddress.IPv4Address(guest_ip)), str(ipaddress.IPv4Address(host_ip))
    except ValueError as e:
        raise InvalidConfig(f"invalid host alias {guest_ip} -> {host_ip}: {e}") from None


def dns_upstream(host: str, port: int) -> str:
    """A checked ``host:port`` for the gateway's upstream resolver."""
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise InvalidConfig(f"DNS upstream must be an IPv4 address, got {host!r}") from None
    if not 0 < port <= 65535:
        raise InvalidConfig(f"invalid DNS upstream port {port}")
    return f"{host}:{port}"


class UserNatBuilder:
    def __init__(self) -> None:
        self._subnet = "10.0.2.0/24"
        self._aliases: list[tuple[str, str]] = []
        self._dns: str | None = None
        self._policy: NetworkPolicy | None = None
        self._forwards: list[PortForward] = []

    def host_alias(self, guest_ip: str, host_ip: str) -> UserNatBuilder:
        """Make ``guest_ip`` reach ``host_ip`` on the host (like slirp's 10.0.2.2 -> loopback)."""
        self._aliases.append(host_alias(guest_ip, host_ip))
        return self

    def subnet(self, cidr: str) -> UserNatBuilder:
        check_subnet(cidr)
        self._subnet = cidr
        return self

    def dns_upstream(self, host: str, port: int = 53) -> UserNatBuilder:
        self._dns = dns_upstream(host, port)
        return self

    def policy(self, policy: NetworkPolicy) -> UserNatBuilder:
        """Egress policy, decided once per new connection or flow; replaceable live."""
        self._policy = policy
        return self

    def forward_tcp(
        self, host_port: int, guest_port: int, host_addr: str = "127.0.0.1"
    ) -> UserNatBuilder:
        self._forwards.append(PortForward(Protocol.TCP, host_port, guest_port, host_addr))
        return self

    def forward_udp(
        self, host_port: int, guest_port: int, host_addr: str = "127.0.0.1"
    ) -> UserNatBuilder:
        self._forwards.append(PortForward(Protocol.UDP, host_port, guest_port, host_addr))
        return self

    def build(self) -> UserNatConfig:
        return UserNatConfig(self._subnet, host_aliases=tuple(self._aliases),
                             dns_upstream=self._dns, policy=self._policy,
                             port_forwards=check_forwards(self._forwards))  # fmt: skip


@dataclass(frozen=True)
class QemuNat:
    """QEMU's built-in user networking (slirp): outbound NAT only, no policy, no forwards."""


@dataclass(frozen=True)
class ClusterPortConfig:
    """A port on a named cluster (a shared switch); created on first use with defaults."""

    cluster_name: str
    static_ip: str | None = None
    port_forwards: tuple[PortForward, ...] = ()


class ClusterPortBuilder:
    def __init__(self, name: str) -> None:
        if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
            raise InvalidConfig(f"invalid cluster name {name!r} (letters, digits, - _ .)")
        self._name = name
        self._ip: str | None = None

    def with_ip(self, ip: str) -> ClusterPortBuilder:
        try:
            self._ip = str(ipaddress.IPv4Address(ip))
        except ValueError:
            raise InvalidConfig(f"invalid static IP {ip!r}") from None
        return self

    def build(self) -> ClusterPortConfig:
        return ClusterPortConfig(self._name, self._ip)


class NetworkMode:
    """``NetworkMode.NONE`` (default), ``NAT``, ``user_nat()...build()``, ``cluster(name)``."""

    NONE: None = None
    NAT: QemuNat = QemuNat()

    @staticmethod
    def user_nat() -> UserNatBuilder:
        return UserNatBuilder()

    @staticmethod
    def UserNat(config: UserNatConfig | None = None) -> UserNatConfig:
        return config or UserNatConfig()

    @staticmethod
    def cluster(name: str) -> ClusterPortBuilder:
        return ClusterPortBuilder(name)


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
    # NetworkInterface (an attachment to a shared VirtualNetwork) lives in capsa.api.network.
    network: UserNatConfig | QemuNat | ClusterPortConfig | NetworkInterface | None = None
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
