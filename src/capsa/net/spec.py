"""Networks as data: what a VM's network is, checked and serialisable, with no process
behind it. ``api/network.py`` turns these into running networks; the stack helper reads
a :class:`NetworkSpec` back from JSON; snapshots store a VM's :class:`NetworkPort`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

from capsa.errors import InvalidConfig
from capsa.net.policy import IpProtocol, NetworkPolicy

DEFAULT_SUBNET = "10.0.2.0/24"
DEFAULT_MTU = 65520
MIN_MTU = 576
FIRST_LEASE = 15  # DHCP leases start at network + 15; the gateway sits below


@dataclass(frozen=True)
class PortForward:
    """Host ``host_addr:host_port`` -> guest ``guest_port``. Port 0 picks a free host port."""

    protocol: IpProtocol
    host_port: int
    guest_port: int
    host_addr: str = "127.0.0.1"
    mac: bytes | None = None  # which guest on a shared network (None: the only one)

    def __post_init__(self) -> None:
        if self.protocol not in (IpProtocol.TCP, IpProtocol.UDP):
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
        return {
            "protocol": self.protocol.value,
            "host_port": self.host_port,
            "guest_port": self.guest_port,
            "host_addr": self.host_addr,
            "mac": self.mac.hex() if self.mac else None,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> PortForward:
        mac = data.get("mac")
        return cls(
            protocol=IpProtocol(data["protocol"]),
            host_port=_int(data["host_port"]),
            guest_port=_int(data["guest_port"]),
            host_addr=str(data.get("host_addr", "127.0.0.1")),
            mac=bytes.fromhex(mac) if isinstance(mac, str) else None,
        )


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def check_forwards(forwards: Iterable[PortForward]) -> tuple[PortForward, ...]:
    seen: set[tuple[IpProtocol, str, int]] = set()
    out = tuple(forwards)
    for f in out:
        key = (f.protocol, f.host_addr, f.host_port)
        if f.host_port and key in seen:
            raise InvalidConfig(f"host {f.protocol.value} port {f.host_port} forwarded twice")
        seen.add(key)
    return out


def check_subnet(cidr: str) -> IPv4Network:
    try:
        net = IPv4Network(cidr, strict=True)
    except ValueError as e:
        raise InvalidConfig(f"invalid subnet {cidr!r}: {e}") from None
    if net.prefixlen > 27:  # the gateway sits below .15, where leases start
        raise InvalidConfig(f"subnet {cidr} is too small for a gateway and DHCP leases")
    return net


def check_mtu(mtu: int) -> int:
    if not isinstance(mtu, int) or not MIN_MTU <= mtu <= DEFAULT_MTU:
        raise InvalidConfig(f"MTU {mtu!r} is outside {MIN_MTU}..{DEFAULT_MTU}")
    return mtu


def host_alias(guest_ip: str, host_ip: str) -> tuple[str, str]:
    """A checked (guest-visible IPv4, host IPv4) pair for the gateway's alias map."""
    try:
        return str(IPv4Address(guest_ip)), str(IPv4Address(host_ip))
    except ValueError as e:
        raise InvalidConfig(f"invalid host alias {guest_ip} -> {host_ip}: {e}") from None


def dns_upstream(host: str, port: int) -> str:
    """A checked ``host:port`` for the gateway's upstream resolver."""
    try:
        IPv4Address(host)
    except ValueError:
        raise InvalidConfig(f"DNS upstream must be an IPv4 address, got {host!r}") from None
    if not 0 < port <= 65535:
        raise InvalidConfig(f"invalid DNS upstream port {port}")
    return f"{host}:{port}"


@dataclass(frozen=True)
class GatewaySpec:
    """What a network's router does: where it sits, whether it NATs to the host, its DNS
    upstream, host aliases and egress policy (the policy can later change while it runs)."""

    host: int = 2  # the gateway's address is network + host
    nat: bool = True
    policy: NetworkPolicy | None = None
    host_aliases: tuple[tuple[str, str], ...] = ()
    dns_upstream: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.host, int) or not 1 <= self.host < FIRST_LEASE:
            raise InvalidConfig(f"gateway host number {self.host!r} must be within 1..14")

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "nat": self.nat,
            "policy": self.policy.to_json() if self.policy is not None else None,
            "host_aliases": [list(a) for a in self.host_aliases],
            "dns_upstream": self.dns_upstream,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GatewaySpec:
        policy = data.get("policy")
        aliases = tuple(host_alias(str(g), str(h)) for g, h in data.get("host_aliases", ()))
        upstream = data.get("dns_upstream")
        return cls(
            host=_int(data.get("host", 2)),
            nat=bool(data.get("nat", True)),
            policy=NetworkPolicy.from_json(policy) if policy is not None else None,
            host_aliases=aliases,
            dns_upstream=str(upstream) if upstream is not None else None,
        )


@dataclass(frozen=True)
class NetworkSpec:
    """A virtual network: a switch, and (with ``gateway``) a router with DHCP, DNS and NAT.

    ``name`` set: a shared network, found by that name in the process that runs it (a
    cluster, a ``VirtualNetwork`` object); None: a private network made for one VM."""

    subnet: str = DEFAULT_SUBNET
    mtu: int = DEFAULT_MTU
    gateway: GatewaySpec | None = field(default_factory=GatewaySpec)
    name: str | None = None

    def __post_init__(self) -> None:
        check_subnet(self.subnet)
        check_mtu(self.mtu)

    @property
    def network(self) -> IPv4Network:
        return IPv4Network(self.subnet)

    @property
    def gateway_ip(self) -> IPv4Address | None:
        return None if self.gateway is None else self.network.network_address + self.gateway.host

    def check_static_ip(self, ip: str) -> IPv4Address:
        """``ip`` as a host address of this network that is not the gateway's."""
        try:
            address = IPv4Address(ip)
        except ValueError:
            raise InvalidConfig(f"invalid static IP {ip!r}") from None
        net = self.network
        if address not in net or address in (net.network_address, net.broadcast_address):
            raise InvalidConfig(f"static IP {ip} is not a host address of {net}")
        if address == self.gateway_ip:
            raise InvalidConfig(f"static IP {ip} is the gateway's address")
        return address

    def static_ip_value(self, ip: str) -> str:
        """``ADDR/PREFIX[,GATEWAY]``: how the sandbox's init is told a fixed address."""
        interface = IPv4Interface(f"{self.check_static_ip(ip)}/{self.network.prefixlen}")
        gateway = f",{self.gateway_ip}" if self.gateway_ip is not None else ""
        return f"{interface}{gateway}"

    def to_json(self) -> dict[str, Any]:
        return {
            "subnet": self.subnet,
            "mtu": self.mtu,
            "gateway": self.gateway.to_json() if self.gateway is not None else None,
            "name": self.name,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NetworkSpec:
        gateway = data.get("gateway")
        name = data.get("name")
        return cls(
            subnet=str(data["subnet"]),
            mtu=_int(data["mtu"]),
            gateway=GatewaySpec.from_json(gateway) if gateway is not None else None,
            name=str(name) if name is not None else None,
        )


@dataclass(frozen=True)
class NetworkPort:
    """A VM's port on a capsa network: which network, a fixed address if any, and the host
    ports forwarded to it. What ``VmConfig.network`` holds for capsa's networks."""

    network: NetworkSpec
    static_ip: str | None = None
    port_forwards: tuple[PortForward, ...] = ()

    def __post_init__(self) -> None:
        check_forwards(self.port_forwards)
        if self.static_ip is not None:
            self.network.check_static_ip(self.static_ip)
        if self.port_forwards and self.network.gateway is None:
            raise InvalidConfig("port forwarding needs a network with a gateway")

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "port",
            "network": self.network.to_json(),
            "static_ip": self.static_ip,
            "port_forwards": [f.to_json() for f in self.port_forwards],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NetworkPort:
        static_ip = data.get("static_ip")
        return cls(
            network=NetworkSpec.from_json(data["network"]),
            static_ip=str(static_ip) if static_ip is not None else None,
            port_forwards=tuple(PortForward.from_json(f) for f in data.get("port_forwards", ())),
        )


@dataclass(frozen=True)
class QemuNat:
    """QEMU's built-in user networking (slirp): outbound NAT only, no policy, no forwards."""


@dataclass(frozen=True)
class UserNatConfig:
    """A private virtual network: a switch with capsa's gateway (NAT, DHCP, DNS, policy)."""

    subnet: str = DEFAULT_SUBNET
    mtu: int = DEFAULT_MTU
    # (guest-visible IPv4, host IPv4): traffic to the first goes to the second.
    host_aliases: tuple[tuple[str, str], ...] = ()
    # Upstream resolver "host:port" for the gateway's DNS proxy (default: the host's).
    dns_upstream: str | None = None
    policy: NetworkPolicy | None = None
    port_forwards: tuple[PortForward, ...] = ()

    def __post_init__(self) -> None:
        check_subnet(self.subnet)
        check_forwards(self.port_forwards)
        check_mtu(self.mtu)

    @property
    def gateway(self) -> str:
        return str(IPv4Network(self.subnet).network_address + 2)

    @property
    def dhcp_start(self) -> str:
        return str(IPv4Network(self.subnet).network_address + FIRST_LEASE)

    @property
    def dhcp_end(self) -> str:
        return str(IPv4Network(self.subnet).broadcast_address - 1)

    def port(self) -> NetworkPort:
        """This private network as a VM's port on it."""
        gateway = GatewaySpec(
            policy=self.policy, host_aliases=self.host_aliases, dns_upstream=self.dns_upstream
        )
        spec = NetworkSpec(subnet=self.subnet, mtu=self.mtu, gateway=gateway)
        return NetworkPort(spec, port_forwards=self.port_forwards)


@dataclass(frozen=True)
class ClusterPortConfig:
    """A port on a named cluster (a shared switch); created on first use with defaults."""

    cluster_name: str
    static_ip: str | None = None
    port_forwards: tuple[PortForward, ...] = ()


NetworkConfig = NetworkPort | QemuNat
"""What ``VmConfig.network`` holds (or None: no network)."""


def network_to_json(network: NetworkConfig | None) -> dict[str, Any] | None:
    if network is None:
        return None
    if isinstance(network, QemuNat):
        return {"kind": "nat"}
    return network.to_json()


def network_from_json(data: Mapping[str, Any] | None) -> NetworkConfig | None:
    if data is None:
        return None
    kind = data.get("kind")
    if kind == "nat":
        return QemuNat()
    if kind == "port":
        return NetworkPort.from_json(data)
    raise ValueError(f"unknown network kind {kind!r}")


def capped(port: NetworkPort, max_mtu: int | None) -> NetworkPort:
    """``port`` with its private network's MTU lowered to what a NIC can carry (a shared
    network keeps the MTU every other VM on it already uses)."""
    if max_mtu is None or port.network.name is not None or port.network.mtu <= max_mtu:
        return port
    return replace(port, network=replace(port.network, mtu=max_mtu))
