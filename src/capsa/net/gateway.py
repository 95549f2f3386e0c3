"""The gateway of a virtual network: answers ARP, ICMP echo and DHCP for the guest.

Frames arrive one at a time from QEMU's ``-netdev stream``; replies are returned as
frames. Traffic beyond the gateway (NAT, DNS) is not forwarded yet and is counted as
dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import cast

from capsa.net.dhcp import DhcpMessage, DhcpServer
from capsa.net.dns import DnsProxy
from capsa.net.frames import (
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    PROTO_ICMP,
    PROTO_UDP,
    Arp,
    Ethernet,
    FrameError,
    IcmpEcho,
    IPv4,
    Udp,
)
from capsa.net.policy import Flow, NetworkPolicy, Protocol

log = logging.getLogger("capsa.net")
BROADCAST_MAC = b"\xff" * 6
MAX_UDP_FLOWS = 256
UDP_IDLE_SECONDS = 60.0
GATEWAY_MAC = bytes.fromhex("525400000001")


@dataclass
class Gateway:
    network: IPv4Network
    address: IPv4Address
    dhcp: DhcpServer
    mac: bytes = GATEWAY_MAC
    dropped: int = 0
    denied: int = 0
    malformed: int = 0
    neighbours: dict[IPv4Address, bytes] = field(default_factory=dict)
    # Guest-visible address -> host address (tests map documentation ranges to loopback).
    aliases: dict[IPv4Address, str] = field(default_factory=dict)
    # Frames produced later (replies from host sockets) go out through this.
    emit: Callable[[bytes], None] = lambda frame: None
    udp_flows: dict[tuple[IPv4Address, int, IPv4Address, int], UdpFlow] = field(
        default_factory=dict
    )
    dns: DnsProxy | None = None
    policy: NetworkPolicy | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @classmethod
    def for_subnet(
        cls,
        subnet: str,
        mtu: int | None = None,
        aliases: dict[IPv4Address, str] | None = None,
        dns_upstream: tuple[str, int] | None = None,
        policy: NetworkPolicy | None = None,
    ) -> Gateway:
        net = IPv4Network(subnet)
        gateway = net.network_address + 2
        first, last = net.network_address + 15, net.broadcast_address - 1
        dhcp = DhcpServer(net, gateway, first, last, dns=gateway, mtu=mtu)
        proxy = DnsProxy(dns_upstream)
        return cls(net, gateway, dhcp, aliases=dict(aliases or {}), dns=proxy, policy=policy)

    def handle(self, frame: bytes) -> list[bytes]:
        """Replies to one guest frame (possibly none). Malformed input is counted, not fatal."""
        try:
            eth = Ethernet.parse(frame)
            if eth.ethertype == ETHERTYPE_ARP:
                return self._arp(eth)
            if eth.ethertype == ETHERTYPE_IPV4:
                return self._ipv4(eth)
        except FrameError:
            self.malformed += 1
            return []
        self.dropped += 1
        return []

    def _arp(self, eth: Ethernet) -> list[bytes]:
        arp = Arp.parse(eth.payload)
        if arp.sender_ip in self.network:
            self.neighbours[arp.sender_ip] = arp.sender_mac
        if arp.op != 1 or arp.target_ip != self.address:
            return []
        reply = Arp(2, self.mac, self.address, arp.sender_mac, arp.sender_ip)
        return [Ethernet(eth.src, self.mac, ETHERTYPE_ARP, reply.build()).build()]

    def _ipv4(self, eth: Ethernet) -> list[bytes]:
        ip = IPv4.parse(eth.payload)
        if ip.protocol == PROTO_UDP:
            udp = Udp.parse(ip)
            if udp.dst_port == 67:
                return self._dhcp(eth, udp)
            if ip.dst == self.address and udp.dst_port == 53 and self.dns is not None:
                self.neighbours[ip.src] = eth.src
                task = asyncio.get_running_loop().create_task(self._dns(ip, udp))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return []
            if ip.dst != self.address:
                self._udp_out(eth, ip, udp)
                return []
        if ip.dst == self.address and ip.protocol == PROTO_ICMP:
            echo = IcmpEcho.parse(ip)
            if echo.kind == 8:
                reply = IcmpEcho(0, echo.ident, echo.seq, echo.payload).build()
                packet = IPv4(self.address, ip.src, PROTO_ICMP, reply).build()
                return [Ethernet(eth.src, self.mac, ETHERTYPE_IPV4, packet).build()]
        self.dropped += 1
        return []

    def _dhcp(self, eth: Ethernet, udp: Udp) -> list[bytes]:
        msg = DhcpMessage.parse(udp.payload)
        decision = self.dhcp.handle(msg)
        if decision is None:
            return []
        kind, ip = decision
        payload = Udp(67, 68, self.dhcp.reply(msg, kind, ip))
        dst_ip = IPv4Address("255.255.255.255")
        packet = IPv4(self.address, dst_ip, PROTO_UDP, payload.build(self.address, dst_ip)).build()
        return [Ethernet(BROADCAST_MAC, self.mac, ETHERTYPE_IPV4, packet).build()]

    def _admitted(self, protocol: Protocol, dst: IPv4Address, port: int | None) -> bool:
        """The policy's verdict on a new flow (judged once, when the flow starts)."""
        if self.policy is None:
            return True
        domains = self.dns.names_for(dst) if self.dns is not None else frozenset()
        decision = self.policy.decide(Flow(protocol, dst, port, domains))
        if not decision.allowed:
            self.denied += 1
            log.info("flow %s %s:%s denied: %s", protocol.value, dst, port, decision.reason)
        return decision.allowed

    async def _dns(self, ip: IPv4, udp: Udp) -> None:
        assert self.dns is not None
        allow = self.policy.allows_domain_query if self.policy is not None else None
        answer = await self.dns.resolve(udp.payload, allow)
        if answer is not None:
            self.udp_reply((ip.src, udp.src_port, self.address, 53), answer)

    def host_address(self, dst: IPv4Address) -> str | None:
        """Where a guest destination really goes; None when it must stay unreachable."""
        if dst in self.aliases:
            return self.aliases[dst]
        if dst in self.network or dst.is_loopback or dst.is_link_local or dst.is_private:
            return None  # the host's own and private networks need an explicit alias
        if dst.is_multicast or dst == IPv4Address("255.255.255.255"):
            return None
        return str(dst)

    def _udp_out(self, eth: Ethernet, ip: IPv4, udp: Udp) -> None:
        key = (ip.src, udp.src_port, ip.dst, udp.dst_port)
        flow = self.udp_flows.get(key)
        if flow is None:
            if not self._admitted(Protocol.UDP, ip.dst, udp.dst_port):
                return
            target = self.host_address(ip.dst)
            if target is None or len(self.udp_flows) >= MAX_UDP_FLOWS:
                self.dropped += 1
                return
            self.neighbours[ip.src] = eth.src
            flow = UdpFlow(self, key, (target, udp.dst_port))
            self.udp_flows[key] = flow
        flow.send(udp.payload)

    def udp_reply(self, key: tuple[IPv4Address, int, IPv4Address, int], data: bytes) -> None:
        guest_ip, guest_port, remote_ip, remote_port = key
        mac = self.neighbours.get(guest_ip, BROADCAST_MAC)
        payload = Udp(remote_port, guest_port, data).build(remote_ip, guest_ip)
        packet = IPv4(remote_ip, guest_ip, PROTO_UDP, payload).build()
        self.emit(Ethernet(mac, self.mac, ETHERTYPE_IPV4, packet).build())


class UdpFlow(asyncio.DatagramProtocol):
    """One guest UDP flow relayed through a connected host socket."""

    def __init__(
        self,
        gateway: Gateway,
        key: tuple[IPv4Address, int, IPv4Address, int],
        target: tuple[str, int],
    ) -> None:
        self.gateway, self.key = gateway, key
        self.transport: asyncio.DatagramTransport | None = None
        self.backlog: list[bytes] = []
        self.idle: asyncio.TimerHandle | None = None
        loop = asyncio.get_running_loop()
        self.opening = loop.create_task(
            loop.create_datagram_endpoint(lambda: self, remote_addr=target)
        )
        self.opening.add_done_callback(self._opened)

    def _opened(self, task: asyncio.Task[tuple[asyncio.BaseTransport, object]]) -> None:
        if task.cancelled() or task.exception() is not None:
            log.info("udp flow %s could not open: %s", self.key, task.exception())
            self.close()
            return
        if self.transport is None:
            self.close()
            return
        backlog, self.backlog = self.backlog, []
        for data in backlog:
            self.transport.sendto(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self._touch()
        self.gateway.udp_reply(self.key, data)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp flow %s: %s", self.key, exc)

    def send(self, data: bytes) -> None:
        self._touch()
        if self.transport is None:
            self.backlog.append(data)
        else:
            self.transport.sendto(data)

    def _touch(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        self.idle = asyncio.get_running_loop().call_later(UDP_IDLE_SECONDS, self.close)

    def close(self) -> None:
        self.gateway.udp_flows.pop(self.key, None)
        if self.idle is not None:
            self.idle.cancel()
        if self.transport is not None:
            self.transport.close()
