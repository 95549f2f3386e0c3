"""Virtual networks: a switch, optionally with a gateway, shared by the VMs attached to it.

One model underneath every network mode:

- ``NetworkMode.user_nat()...`` is a private network with a gateway, made for one VM and
  gone with it;
- ``VirtualNetwork()`` / ``VirtualNetwork.with_gateway(Gateway(...))`` is a network the
  caller holds; every VM given ``.network(net)`` or ``.interface(NetworkInterface(net))``
  gets a port on its switch;
- ``NetworkCluster`` names networks process-wide (``NetworkMode.cluster(name)``).

Builders turn each of these into data (:class:`~capsa.net.spec.NetworkPort`), which is
what a ``VmConfig`` holds; :func:`attach_network` resolves that data to a running network
(by name for shared ones, so a restored VM rejoins its network) before a backend starts.
The switch and gateway run in one helper process per network, started with the first VM
and stopped with the last one.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import weakref
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import ClassVar

from capsa._util.privileges import (
    Identity,
    confinement,
    give,
    new_identity,
    reachable_by_others,
)
from capsa._util.rundir import RunDir
from capsa.backends.base import NetworkPlug
from capsa.errors import InvalidConfig
from capsa.net.policy import IpProtocol, NetworkPolicy
from capsa.net.spec import (
    DEFAULT_MTU,
    DEFAULT_SUBNET,
    ClusterPortConfig,
    GatewaySpec,
    NetworkConfig,
    NetworkPort,
    NetworkSpec,
    PortForward,
    QemuNat,
    UserNatConfig,
    check_forwards,
    check_mtu,
    check_subnet,
    dns_upstream,
    host_alias,
)
from capsa.net.stack import StackProcess, start_stack

CLUSTER_PREFIX = "cluster:"


class Gateway:
    """The router of a virtual network: DHCP, DNS proxy, NAT to the host, egress policy.

    ``Gateway("10.0.2.0/24")`` puts the gateway at .2 (leases from .15);
    ``.address(n)`` moves it (clusters use .1).
    """

    def __init__(self, subnet: str = DEFAULT_SUBNET) -> None:
        self.subnet = check_subnet(subnet)
        self.host = 2
        self.nat = True
        self._policy: NetworkPolicy | None = None
        self.aliases: list[tuple[str, str]] = []
        self.dns: str | None = None

    @classmethod
    def from_spec(cls, subnet: str, spec: GatewaySpec) -> Gateway:
        gateway = cls(subnet).address(spec.host).policy(spec.policy)
        gateway.nat = spec.nat
        gateway.aliases = list(spec.host_aliases)
        gateway.dns = spec.dns_upstream
        return gateway

    def policy(self, policy: NetworkPolicy | None) -> Gateway:
        """The egress policy (None: allow all, with the protected ranges still protected)."""
        self._policy = policy
        return self

    def address(self, host: int) -> Gateway:
        GatewaySpec(host=host)  # checks the range
        self.host = host
        return self

    def no_nat(self) -> Gateway:
        """DHCP and ARP only: the VMs reach each other, nothing beyond the network."""
        self.nat = False
        return self

    def host_alias(self, guest_ip: str, host_ip: str) -> Gateway:
        self.aliases.append(host_alias(guest_ip, host_ip))
        return self

    def dns_upstream(self, host: str, port: int = 53) -> Gateway:
        self.dns = dns_upstream(host, port)
        return self

    @property
    def ip(self) -> IPv4Address:
        return self.subnet.network_address + self.host

    @property
    def current_policy(self) -> NetworkPolicy | None:
        return self._policy

    def spec(self) -> GatewaySpec:
        return GatewaySpec(
            host=self.host,
            nat=self.nat,
            policy=self._policy,
            host_aliases=tuple(self.aliases),
            dns_upstream=self.dns,
        )


class VirtualNetwork:
    """A virtual L2 switch; with a gateway it also routes, NATs and serves DHCP/DNS.

    Every network has a name (given, or made up); VMs configured for it find it by that
    name, also when they are restored from a snapshot later in this process."""

    _live: ClassVar[weakref.WeakValueDictionary[str, VirtualNetwork]] = (
        weakref.WeakValueDictionary()
    )
    _numbers: ClassVar[itertools.count[int]] = itertools.count(1)

    def __init__(
        self,
        subnet: str = DEFAULT_SUBNET,
        gateway: Gateway | None = None,
        *,
        name: str | None = None,
        mtu: int = DEFAULT_MTU,
    ) -> None:
        self.gateway = gateway
        self.subnet: IPv4Network = gateway.subnet if gateway else check_subnet(subnet)
        self.mtu = mtu
        self.name = name or f"net-{os.getpid()}-{next(self._numbers)}"
        self._shared = True
        self._stack: StackProcess | None = None
        self._run_dir: RunDir | None = None
        self._macs: set[str] = set()
        self._static: dict[str, IPv4Address] = {}
        self._lock = asyncio.Lock()
        check_mtu(mtu)
        VirtualNetwork._live[self.name] = self

    @classmethod
    def with_gateway(cls, gateway: Gateway) -> VirtualNetwork:
        return cls(gateway=gateway)

    @classmethod
    def from_spec(cls, spec: NetworkSpec) -> VirtualNetwork:
        """A network made from ``spec``: shared under its name, or private to one VM."""
        gateway = Gateway.from_spec(spec.subnet, spec.gateway) if spec.gateway else None
        network = cls(spec.subnet, gateway, name=spec.name, mtu=spec.mtu)
        if spec.name is None:
            network._shared = False
            VirtualNetwork._live.pop(network.name, None)
        return network

    @classmethod
    def for_port(cls, spec: NetworkSpec) -> VirtualNetwork:
        """The running network ``spec`` names (made from the spec if none runs here)."""
        if spec.name is None:
            return cls.from_spec(spec)
        if spec.name.startswith(CLUSTER_PREFIX):
            return NetworkCluster.adopt(spec.name.removeprefix(CLUSTER_PREFIX), spec)
        found = cls._live.get(spec.name)
        return found if found is not None else cls.from_spec(spec)

    @property
    def spec(self) -> NetworkSpec:
        return NetworkSpec(
            subnet=str(self.subnet),
            mtu=self.mtu,
            gateway=self.gateway.spec() if self.gateway else None,
            name=self.name if self._shared else None,
        )

    def port(
        self, static_ip: str | None = None, forwards: tuple[PortForward, ...] = ()
    ) -> NetworkPort:
        """A VM's port on this network, as data for its ``VmConfig``."""
        return NetworkPort(self.spec, static_ip=static_ip, port_forwards=forwards)

    @property
    def running(self) -> bool:
        return self._stack is not None

    @property
    def attached(self) -> int:
        return len(self._macs)

    def check_static_ip(self, ip: str) -> IPv4Address:
        address = self.spec.check_static_ip(ip)
        if address in self._static.values():
            raise InvalidConfig(f"static IP {ip} is already used on this network")
        return address

    async def attach(
        self,
        mac: str,
        ip: str | None = None,
        forwards: tuple[PortForward, ...] = (),
        datagram: bool = False,
    ) -> Attachment:
        """A switch port for one VM (started with the network if it is the first);
        ``datagram``: a unixgram socket, one frame per datagram (vfkit, -netdev dgram)."""
        async with self._lock:
            address = self.check_static_ip(ip) if ip else None
            stack = await self._ensure_started()
            assert self._run_dir is not None
            path = self._run_dir.socket_path(f"{mac.replace(':', '')}.sock")
            try:
                await stack.add_port(path, mac, str(address) if address else None, datagram)
            except BaseException:
                await self._stop_if_unused()
                raise
            self._macs.add(mac)
            if address is not None:
                self._static[mac] = address
        attachment = Attachment(self, mac, path, datagram)
        try:
            for fwd in forwards:
                await attachment.add_port_forward(fwd)
        except BaseException:
            await attachment.detach()
            raise
        return attachment

    async def _ensure_started(self) -> StackProcess:
        if self._stack is not None:
            return self._stack
        self._run_dir = RunDir("capsa-net-")
        try:
            identity = network_identity()
            if identity is not None:
                if not reachable_by_others(self._run_dir.path):
                    raise InvalidConfig(
                        f"{self._run_dir.path.parent} must let other users through (chmod "
                        "o+x): capsa runs as root and its network helper does not"
                    )
                give([self._run_dir.path], identity, 0o700)  # it binds the VMs' ports there
            self._stack = await start_stack(self.spec, identity)
        except BaseException:
            self._run_dir.remove()
            self._run_dir = None
            raise
        return self._stack

    async def _detach(self, mac: str) -> None:
        async with self._lock:
            self._macs.discard(mac)
            self._static.pop(mac, None)
            if self._stack is not None and self._stack.running:
                await self._stack.remove_port(mac)
            await self._stop_if_unused()

    async def _stop_if_unused(self) -> None:
        if self._macs or self._stack is None:
            return
        stack, self._stack = self._stack, None
        await stack.stop()
        if self._run_dir is not None:
            self._run_dir.remove()
            self._run_dir = None

    async def set_policy(self, policy: NetworkPolicy | None) -> None:
        """Replace the gateway's policy; connections already admitted keep going."""
        if self.gateway is None:
            raise InvalidConfig("this network has no gateway, so no policy")
        self.gateway.policy(policy)
        if self._stack is not None:
            await self._stack.set_policy(policy)

    def stack(self) -> StackProcess:
        if self._stack is None:
            raise InvalidConfig("the network is not running (no VM attached)")
        return self._stack


@dataclass
class Attachment:
    """One VM's port on a network, and what the VM asked of it (port forwards)."""

    network: VirtualNetwork
    mac: str
    path: Path
    datagram: bool = False
    forwards: list[tuple[IpProtocol, str, int]] = field(default_factory=list)
    detached: bool = False

    @property
    def plug(self) -> NetworkPlug:
        """What the backend connects the VM's NIC to."""
        return NetworkPlug(socket=self.path, mtu=self.network.mtu, datagram=self.datagram)

    async def add_port_forward(self, forward: PortForward) -> int:
        if self.network.gateway is None:
            raise InvalidConfig("port forwarding needs a network with a gateway")
        mac = bytes.fromhex(self.mac.replace(":", ""))
        for_this_vm = PortForward(
            protocol=forward.protocol,
            host_port=forward.host_port,
            guest_port=forward.guest_port,
            host_addr=forward.host_addr,
            mac=mac,
        )
        host_port = await self.network.stack().add_forward(for_this_vm)
        self.forwards.append((forward.protocol, forward.host_addr, host_port))
        return host_port

    async def remove_port_forward(
        self, protocol: IpProtocol, host_port: int, host_addr: str = "127.0.0.1"
    ) -> None:
        key = (protocol, host_addr, host_port)
        if key not in self.forwards:
            raise InvalidConfig(f"no {protocol.value} forward from {host_addr}:{host_port}")
        self.forwards.remove(key)
        await self.network.stack().remove_forward(protocol, host_port, host_addr)

    async def detach(self) -> None:
        if self.detached:
            return
        self.detached = True
        await self.network._detach(self.mac)


def network_identity() -> Identity | None:
    """Whom a network's helper runs as, when capsa confines what it starts: an identity of
    its own that keeps raw ICMP (ping sockets are often not allowed) and low ports for
    forwards."""
    if not confinement().active:
        return None
    return new_identity(keep={"net_raw", "net_bind_service"})


async def attach_network(port: NetworkPort, mac: str, *, datagram: bool) -> Attachment:
    """A port for the VM with ``mac`` on the network ``port`` names (started if need be)."""
    network = VirtualNetwork.for_port(port.network)
    return await network.attach(mac, port.static_ip, port.port_forwards, datagram)


class NetworkInterface:
    """A VM's port on a ``VirtualNetwork``: ``NetworkInterface(net).forward_tcp(8080, 80)``."""

    def __init__(self, network: VirtualNetwork) -> None:
        if not isinstance(network, VirtualNetwork):
            raise InvalidConfig(f"NetworkInterface needs a VirtualNetwork, got {network!r}")
        self.network = network
        self.static_ip: str | None = None
        self._forwards: list[PortForward] = []

    def ip(self, address: str) -> NetworkInterface:
        """A fixed address (reserved in the gateway's DHCP; set by the sandbox's init)."""
        self.static_ip = str(self.network.check_static_ip(address))
        return self

    def forward_tcp(self, host_port: int, guest_port: int) -> NetworkInterface:
        self._forwards.append(PortForward(IpProtocol.TCP, host_port, guest_port))
        check_forwards(self._forwards)
        return self

    def forward_udp(self, host_port: int, guest_port: int) -> NetworkInterface:
        self._forwards.append(PortForward(IpProtocol.UDP, host_port, guest_port))
        check_forwards(self._forwards)
        return self

    @property
    def port_forwards(self) -> tuple[PortForward, ...]:
        return tuple(self._forwards)

    @property
    def mtu(self) -> int:
        return self.network.mtu

    def port(self) -> NetworkPort:
        return self.network.port(self.static_ip, self.port_forwards)


class NetworkCluster:
    """Networks by name, for this process: ``NetworkMode.cluster(name)`` attaches to one.

    Defaults follow the original library: 10.0.3.0/24, gateway at .1, NAT on.
    """

    _registry: ClassVar[dict[str, VirtualNetwork]] = {}

    @classmethod
    def create(
        cls,
        name: str,
        subnet: str = "10.0.3.0/24",
        *,
        nat: bool = True,
        policy: NetworkPolicy | None = None,
        gateway: Gateway | None = None,
    ) -> VirtualNetwork:
        existing = cls._registry.get(name)
        if existing is not None and existing.running:
            raise InvalidConfig(f"cluster {name!r} exists and has VMs attached")
        gw = gateway or Gateway(subnet).address(1)
        if not nat:
            gw.no_nat()
        if policy is not None:
            gw.policy(policy)
        network = VirtualNetwork(gateway=gw, name=CLUSTER_PREFIX + name)
        cls._registry[name] = network
        return network

    @classmethod
    def adopt(cls, name: str, spec: NetworkSpec) -> VirtualNetwork:
        """The cluster ``name``, made from ``spec`` if this process has none by that name
        (a VM restored in another process brings its cluster's definition along)."""
        found = cls._registry.get(name)
        if found is None:
            found = VirtualNetwork.from_spec(spec)
            cls._registry[name] = found
        return found

    @classmethod
    def get_or_create(cls, name: str) -> VirtualNetwork:
        return cls._registry.get(name) or cls.create(name)

    @classmethod
    def get(cls, name: str) -> VirtualNetwork | None:
        return cls._registry.get(name)

    @classmethod
    def remove(cls, name: str) -> None:
        network = cls._registry.get(name)
        if network is not None and network.running:
            raise InvalidConfig(f"cluster {name!r} still has VMs attached")
        cls._registry.pop(name, None)

    @classmethod
    def names(cls) -> list[str]:
        return sorted(cls._registry)


# -- the builders' network arguments ----------------------------------------------------------


class UserNatBuilder:
    def __init__(self) -> None:
        self._subnet = DEFAULT_SUBNET
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
        self._forwards.append(PortForward(IpProtocol.TCP, host_port, guest_port, host_addr))
        return self

    def forward_udp(
        self, host_port: int, guest_port: int, host_addr: str = "127.0.0.1"
    ) -> UserNatBuilder:
        self._forwards.append(PortForward(IpProtocol.UDP, host_port, guest_port, host_addr))
        return self

    def build(self) -> UserNatConfig:
        return UserNatConfig(
            subnet=self._subnet,
            host_aliases=tuple(self._aliases),
            dns_upstream=self._dns,
            policy=self._policy,
            port_forwards=check_forwards(self._forwards),
        )


class ClusterPortBuilder:
    def __init__(self, name: str) -> None:
        if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
            raise InvalidConfig(f"invalid cluster name {name!r} (letters, digits, - _ .)")
        self._name = name
        self._ip: str | None = None

    def with_ip(self, ip: str) -> ClusterPortBuilder:
        try:
            self._ip = str(IPv4Address(ip))
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


NetworkArg = (
    NetworkConfig
    | UserNatConfig
    | ClusterPortConfig
    | UserNatBuilder
    | ClusterPortBuilder
    | VirtualNetwork
    | NetworkInterface
    | None
)


def network_choice(mode: NetworkArg) -> NetworkConfig | None:
    """Every accepted way of naming a network, as the data a ``VmConfig`` holds."""
    if isinstance(mode, UserNatBuilder | ClusterPortBuilder):
        mode = mode.build()
    if mode is None or isinstance(mode, QemuNat | NetworkPort):
        return mode
    if isinstance(mode, UserNatConfig):
        return mode.port()
    if isinstance(mode, ClusterPortConfig):
        cluster = NetworkCluster.get_or_create(mode.cluster_name)
        return cluster.port(mode.static_ip, mode.port_forwards)
    if isinstance(mode, VirtualNetwork):
        return mode.port()
    if isinstance(mode, NetworkInterface):
        return mode.port()
    raise InvalidConfig(f"unsupported network mode {mode!r}")
