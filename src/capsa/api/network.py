"""Virtual networks: a switch, optionally with a gateway, shared by the VMs attached to it.

One model underneath every network mode:

- ``NetworkMode.user_nat()...`` is a private ``VirtualNetwork`` with a gateway, made for
  one VM and gone with it;
- ``VirtualNetwork()`` / ``VirtualNetwork.with_gateway(Gateway(...))`` is a network the
  caller holds; every VM given ``.network(net)`` or ``.interface(NetworkInterface(net))``
  gets a port on its switch;
- ``NetworkCluster`` names networks process-wide (``NetworkMode.cluster(name)``).

The switch and gateway run in one helper process per network, started with the first
VM and stopped with the last one.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import ClassVar

from capsa._util.rundir import RunDir
from capsa.config import (
    ClusterPortConfig,
    PortForward,
    QemuNat,
    UserNatConfig,
    check_forwards,
    check_subnet,
    dns_upstream,
    host_alias,
)
from capsa.errors import InvalidConfig
from capsa.net.policy import NetworkPolicy, Protocol
from capsa.net.stack_main import StackProcess, start_stack

DEFAULT_MTU = 65520


class Gateway:
    """The router of a virtual network: DHCP, DNS proxy, NAT to the host, egress policy.

    ``Gateway("10.0.2.0/24")`` puts the gateway at .2 (leases from .15);
    ``.address(n)`` moves it (clusters use .1).
    """

    def __init__(self, subnet: str = "10.0.2.0/24") -> None:
        self.subnet = check_subnet(subnet)
        self.host = 2
        self.nat = True
        self._policy: NetworkPolicy | None = None
        self.aliases: list[tuple[str, str]] = []
        self.dns: str | None = None

    def policy(self, policy: NetworkPolicy | None) -> Gateway:
        """The egress policy (None: allow all, with the protected ranges still protected)."""
        self._policy = policy
        return self

    def address(self, host: int) -> Gateway:
        if not 1 <= host < 15:
            raise InvalidConfig(f"gateway host number {host} must be within 1..14")
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


class VirtualNetwork:
    """A virtual L2 switch; with a gateway it also routes, NATs and serves DHCP/DNS."""

    def __init__(self, subnet: str = "10.0.2.0/24", gateway: Gateway | None = None) -> None:
        self.gateway = gateway
        self.subnet: IPv4Network = gateway.subnet if gateway else check_subnet(subnet)
        self.mtu = DEFAULT_MTU
        self._stack: StackProcess | None = None
        self._run_dir: RunDir | None = None
        self._macs: set[str] = set()
        self._static: dict[str, IPv4Address] = {}
        self._lock = asyncio.Lock()

    @classmethod
    def with_gateway(cls, gateway: Gateway) -> VirtualNetwork:
        return cls(gateway=gateway)

    @classmethod
    def from_user_nat(cls, config: UserNatConfig) -> VirtualNetwork:
        gateway = Gateway(config.subnet)
        gateway.aliases = list(config.host_aliases)
        gateway.dns = config.dns_upstream
        gateway.policy(config.policy)
        net = cls(gateway=gateway)
        net.mtu = config.mtu
        return net

    @property
    def running(self) -> bool:
        return self._stack is not None

    @property
    def attached(self) -> int:
        return len(self._macs)

    def check_static_ip(self, ip: str) -> IPv4Address:
        address = IPv4Address(ip)
        if address not in self.subnet or address in (
            self.subnet.network_address, self.subnet.broadcast_address
        ):  # fmt: skip
            raise InvalidConfig(f"static IP {ip} is not a host address of {self.subnet}")
        if self.gateway is not None and address == self.gateway.ip:
            raise InvalidConfig(f"static IP {ip} is the gateway's address")
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
        attachment = Attachment(self, mac, path)
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
        gw = self.gateway
        self._run_dir = RunDir("capsa-net-")
        try:
            self._stack = await start_stack(
                str(self.subnet), self.mtu,
                aliases=gw.aliases if gw else (), dns_upstream=gw.dns if gw else None,
                policy=gw.current_policy if gw else None, nat=bool(gw and gw.nat),
                gateway_host=gw.host if gw else 2, gateway=gw is not None,
            )  # fmt: skip
        except BaseException:
            self._run_dir.remove()
            self._run_dir = None
            raise
        return self._stack

    async def _detach(self, mac: str) -> None:
        async with self._lock:
            self._macs.discard(mac)
            self._static.pop(mac, None)
            if self._stack is not None and self._stack.proc.returncode is None:
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
    forwards: list[tuple[Protocol, str, int]] = field(default_factory=list)
    detached: bool = False

    async def add_port_forward(self, forward: PortForward) -> int:
        if self.network.gateway is None:
            raise InvalidConfig("port forwarding needs a network with a gateway")
        mac = bytes.fromhex(self.mac.replace(":", ""))
        host_port = await self.network.stack().add_forward(
            PortForward(
                forward.protocol, forward.host_port, forward.guest_port, forward.host_addr, mac
            )
        )
        self.forwards.append((forward.protocol, forward.host_addr, host_port))
        return host_port

    async def remove_port_forward(
        self, protocol: Protocol, host_port: int, host_addr: str = "127.0.0.1"
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
        self.network.check_static_ip(address)
        self.static_ip = str(IPv4Address(address))
        return self

    def forward_tcp(self, host_port: int, guest_port: int) -> NetworkInterface:
        self._forwards.append(PortForward(Protocol.TCP, host_port, guest_port))
        check_forwards(self._forwards)
        return self

    def forward_udp(self, host_port: int, guest_port: int) -> NetworkInterface:
        self._forwards.append(PortForward(Protocol.UDP, host_port, guest_port))
        check_forwards(self._forwards)
        return self

    @property
    def port_forwards(self) -> tuple[PortForward, ...]:
        return tuple(self._forwards)

    @property
    def mtu(self) -> int:
        return self.network.mtu


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
        network = VirtualNetwork.with_gateway(gw)
        cls._registry[name] = network
        return network

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


def static_ip_value(network: VirtualNetwork, ip: str) -> str:
    """The value of ``capsa.ip=ADDR/PREFIX[,GATEWAY]`` for the sandbox's init."""
    gateway = f",{network.gateway.ip}" if network.gateway is not None else ""
    return f"{ipaddress.IPv4Interface(f'{ip}/{network.subnet.prefixlen}')}{gateway}"


def network_for(
    net: object,
) -> tuple[VirtualNetwork, str | None, tuple[PortForward, ...]] | None:
    """The virtual network a VM's network setting names, its static IP and port forwards
    (None: no capsa network, i.e. none at all or QEMU's own user networking)."""
    if net is None or isinstance(net, QemuNat):
        return None
    if isinstance(net, UserNatConfig):
        return VirtualNetwork.from_user_nat(net), None, net.port_forwards
    if isinstance(net, ClusterPortConfig):
        cluster = NetworkCluster.get_or_create(net.cluster_name)
        return cluster, net.static_ip, net.port_forwards
    if isinstance(net, NetworkInterface):
        return net.network, net.static_ip, net.port_forwards
    raise InvalidConfig(f"unsupported network {net!r}")
