"""A small DHCP server (RFC 2131/2132) for one virtual network: leases by MAC address.

One lease per MAC address. The gateway serves a message only when its client hardware
address is the MAC of the switch port it came in on, so a VM can take, renew or release
no lease but its own, and cannot drain the pool with made-up addresses.
"""

from __future__ import annotations

import struct
from collections.abc import Collection
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from capsa.net.frames import FrameError

MAGIC = b"\x63\x82\x53\x63"
BOOTP = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
OPT_SUBNET, OPT_ROUTER, OPT_DNS, OPT_HOSTNAME, OPT_LEASE = 1, 3, 6, 12, 51
OPT_MSG_TYPE, OPT_SERVER_ID, OPT_REQUESTED_IP, OPT_MTU = 53, 54, 50, 26
LEASE_SECONDS = 86400


@dataclass(frozen=True)
class DhcpMessage:
    op: int
    xid: int
    flags: int
    ciaddr: IPv4Address
    chaddr: bytes
    options: dict[int, bytes]

    @property
    def msg_type(self) -> int | None:
        value = self.options.get(OPT_MSG_TYPE)
        return value[0] if value and len(value) == 1 else None

    @classmethod
    def parse(cls, data: bytes) -> DhcpMessage:
        if len(data) < BOOTP.size + 4 or data[BOOTP.size : BOOTP.size + 4] != MAGIC:
            raise FrameError("not a DHCP message")
        op, htype, hlen, _hops, xid, _secs, flags, ciaddr, _yi, _si, _gi, chaddr, _sn, _f = (
            BOOTP.unpack_from(data)
        )
        if htype != 1 or hlen != 6:
            raise FrameError("DHCP for a non-Ethernet client")
        return cls(
            op, xid, flags, IPv4Address(ciaddr), chaddr[:6], _options(data[BOOTP.size + 4 :])
        )


def _options(data: bytes) -> dict[int, bytes]:
    options: dict[int, bytes] = {}
    i = 0
    while i < len(data):
        code = data[i]
        if code == 255:
            break
        if code == 0:
            i += 1
            continue
        if i + 1 >= len(data) or i + 2 + data[i + 1] > len(data):
            raise FrameError("truncated DHCP option")
        options[code] = data[i + 2 : i + 2 + data[i + 1]]
        i += 2 + data[i + 1]
    return options


@dataclass
class DhcpServer:
    network: IPv4Network
    gateway: IPv4Address
    first: IPv4Address
    last: IPv4Address
    dns: IPv4Address | None = None
    mtu: int | None = None
    leases: dict[bytes, IPv4Address] = field(default_factory=dict)
    reserved: dict[bytes, IPv4Address] = field(default_factory=dict)

    def assigned(self, mac: bytes) -> IPv4Address | None:
        """The address ``mac`` holds: its lease, or the static address reserved for it."""
        return self.leases.get(mac) or self.reserved.get(mac)

    def owner(self, ip: IPv4Address) -> bytes | None:
        """The MAC holding ``ip`` by lease or reservation."""
        for table in (self.leases, self.reserved):
            for mac, held in table.items():
                if held == ip:
                    return mac
        return None

    def _lease_for(self, mac: bytes, busy: Collection[IPv4Address]) -> IPv4Address | None:
        if mac in self.leases:
            return self.leases[mac]
        if mac in self.reserved:
            return self.reserved[mac]
        taken = set(self.leases.values()) | set(self.reserved.values()) | {self.gateway}
        taken.update(busy)
        ip = self.first
        while ip <= self.last:
            if ip not in taken:
                return ip
            ip += 1
        return None  # pool exhausted: no offer

    def handle(
        self, msg: DhcpMessage, busy: Collection[IPv4Address] = ()
    ) -> tuple[int, IPv4Address] | None:
        """The reply type and address for a client message, or None to stay silent.
        ``busy``: addresses other clients use without a lease (never offered)."""
        if msg.op != 1:
            return None
        kind = msg.msg_type
        if kind == DISCOVER:
            ip = self._lease_for(msg.chaddr, busy)
            return (OFFER, ip) if ip is not None else None
        if kind == REQUEST:
            wanted_raw = msg.options.get(OPT_REQUESTED_IP)
            wanted = IPv4Address(wanted_raw) if wanted_raw and len(wanted_raw) == 4 else msg.ciaddr
            ip = self._lease_for(msg.chaddr, busy)
            if ip is None or wanted != ip:
                return (NAK, IPv4Address(0))
            self.leases[msg.chaddr] = ip
            return (ACK, ip)
        if kind == RELEASE:
            self.leases.pop(msg.chaddr, None)
        return None

    def reply(self, msg: DhcpMessage, kind: int, ip: IPv4Address) -> bytes:
        opts = [(OPT_MSG_TYPE, bytes([kind])), (OPT_SERVER_ID, self.gateway.packed)]
        if kind != NAK:
            opts += [
                (OPT_LEASE, struct.pack("!I", LEASE_SECONDS)),
                (OPT_SUBNET, self.network.netmask.packed),
                (OPT_ROUTER, self.gateway.packed),
            ]
            if self.dns is not None:
                opts.append((OPT_DNS, self.dns.packed))
            if self.mtu is not None:
                opts.append((OPT_MTU, struct.pack("!H", self.mtu)))
        body = BOOTP.pack(2, 1, 6, 0, msg.xid, 0, msg.flags, b"\0" * 4, ip.packed,
                          self.gateway.packed, b"\0" * 4, msg.chaddr.ljust(16, b"\0"),
                          b"", b"")  # fmt: skip
        encoded = b"".join(bytes([code, len(value)]) + value for code, value in opts)
        return body + MAGIC + encoded + b"\xff"
