"""The gateway of a virtual network: answers ARP, ICMP echo and DHCP for the guest.

Frames arrive one at a time from QEMU's ``-netdev stream``; replies are returned as
frames. Traffic beyond the gateway (NAT, DNS) is not forwarded yet and is counted as
dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from capsa.net.dhcp import DhcpMessage, DhcpServer
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

BROADCAST_MAC = b"\xff" * 6
GATEWAY_MAC = bytes.fromhex("525400000001")


@dataclass
class Gateway:
    network: IPv4Network
    address: IPv4Address
    dhcp: DhcpServer
    mac: bytes = GATEWAY_MAC
    dropped: int = 0
    malformed: int = 0
    neighbours: dict[IPv4Address, bytes] = field(default_factory=dict)

    @classmethod
    def for_subnet(cls, subnet: str, mtu: int | None = None) -> Gateway:
        net = IPv4Network(subnet)
        gateway = net.network_address + 2
        dhcp = DhcpServer(
            net, gateway, net.network_address + 15, net.broadcast_address - 1, mtu=mtu
        )
        return cls(net, gateway, dhcp)

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
