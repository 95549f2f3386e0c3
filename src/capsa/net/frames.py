"""Parsing and building the frames a guest sends (Ethernet, ARP, IPv4, ICMP, UDP, TCP).

Every length, offset and checksum from the guest is checked before use; anything
malformed raises :class:`FrameError` and the frame is dropped. Building is the reverse,
with correct checksums, for replies crafted by the gateway.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

ETH_HEADER = struct.Struct("!6s6sH")
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
IP_HEADER = struct.Struct("!BBHHHBBH4s4s")
PROTO_ICMP, PROTO_TCP, PROTO_UDP = 1, 6, 17
UDP_HEADER = struct.Struct("!HHHH")
TCP_HEADER = struct.Struct("!HHIIBBHHH")
ARP = struct.Struct("!HHBBH6s4s6s4s")
MAX_FRAME = 65535 + ETH_HEADER.size

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10


class FrameError(ValueError):
    """A frame the guest sent does not parse; it is dropped."""


def checksum(*parts: bytes) -> int:
    """The Internet checksum (RFC 1071) of the concatenation of ``parts``, each of even
    length but the last: a pseudo-header, a header and a payload are summed where they
    are, not copied into one buffer first.

    Since 0x10000 == 1 (mod 0xFFFF), the one's-complement sum of the 16-bit words is the
    buffer read as one big integer, modulo 0xFFFF, and the sums of the parts add up.
    """
    total = 0
    nonzero = False
    for i, part in enumerate(parts):
        if len(part) % 2 and i != len(parts) - 1:
            raise ValueError("only the last part of a checksummed buffer may have odd length")
        value = _as_integer(part)
        total += value % 0xFFFF
        nonzero = nonzero or value != 0
    total %= 0xFFFF
    if total == 0 and nonzero:
        total = 0xFFFF  # one's complement has two zeros; a sum of nonzero words is -0
    return ~total & 0xFFFF


def _as_integer(data: bytes) -> int:
    """``data`` (padded to 16-bit words) as an integer congruent to it modulo 0xFFFF and
    zero only if it is: its halves are added until it is small. Splitting at a multiple of
    16 bits keeps the value modulo 0xFFFF, and shifts and adds are linear, where the
    division of a 64 KiB integer costs more than all of them (~70 vs ~25 us)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    value = int.from_bytes(data, "big")
    bits = len(data) * 8
    while bits > 128:
        half = (bits // 32) * 16  # a multiple of 16, about half of the bits
        value = (value >> half) + (value & ((1 << half) - 1))
        bits = bits - half + 1
    return value


@dataclass(frozen=True)
class Ethernet:
    dst: bytes
    src: bytes
    ethertype: int
    payload: bytes

    @classmethod
    def parse(cls, frame: bytes) -> Ethernet:
        if not ETH_HEADER.size <= len(frame) <= MAX_FRAME:
            raise FrameError(f"ethernet frame of {len(frame)} bytes")
        dst, src, ethertype = ETH_HEADER.unpack_from(frame)
        return cls(dst, src, ethertype, frame[ETH_HEADER.size :])

    def build(self) -> bytes:
        return ETH_HEADER.pack(self.dst, self.src, self.ethertype) + self.payload


@dataclass(frozen=True)
class Arp:
    op: int
    sender_mac: bytes
    sender_ip: IPv4Address
    target_mac: bytes
    target_ip: IPv4Address

    @classmethod
    def parse(cls, data: bytes) -> Arp:
        if len(data) < ARP.size:
            raise FrameError("short ARP packet")
        htype, ptype, hlen, plen, op, smac, sip, tmac, tip = ARP.unpack_from(data)
        if (htype, ptype, hlen, plen) != (1, ETHERTYPE_IPV4, 6, 4) or op not in (1, 2):
            raise FrameError("not an Ethernet/IPv4 ARP request or reply")
        return cls(op, smac, IPv4Address(sip), tmac, IPv4Address(tip))

    def build(self) -> bytes:
        return ARP.pack(1, ETHERTYPE_IPV4, 6, 4, self.op, self.sender_mac,
                        self.sender_ip.packed, self.target_mac, self.target_ip.packed)  # fmt: skip


@dataclass(frozen=True)
class IPv4:
    src: IPv4Address
    dst: IPv4Address
    protocol: int
    payload: bytes
    ttl: int = 64
    ident: int = 0

    @classmethod
    def parse(cls, data: bytes) -> IPv4:
        if len(data) < IP_HEADER.size:
            raise FrameError("short IPv4 header")
        vihl, _tos, total, ident, frag, ttl, proto, _csum, src, dst = IP_HEADER.unpack_from(data)
        version, ihl = vihl >> 4, (vihl & 0xF) * 4
        if version != 4 or ihl < IP_HEADER.size or total < ihl or total > len(data):
            raise FrameError("bad IPv4 version or lengths")
        if checksum(data[:ihl]) != 0:
            raise FrameError("bad IPv4 header checksum")
        if frag & 0x3FFF:  # more-fragments flag or an offset: we do not reassemble
            raise FrameError("IPv4 fragments are not supported")
        return cls(IPv4Address(src), IPv4Address(dst), proto, data[ihl:total], ttl, ident)

    def build(self) -> bytes:
        total = IP_HEADER.size + len(self.payload)
        if total > 65535:
            raise FrameError("IPv4 packet too large")
        header = IP_HEADER.pack(0x45, 0, total, self.ident, 0x4000, self.ttl, self.protocol, 0,
                                self.src.packed, self.dst.packed)  # fmt: skip
        csum = checksum(header)
        return header[:10] + struct.pack("!H", csum) + header[12:] + self.payload


def _pseudo_header(src: IPv4Address, dst: IPv4Address, proto: int, length: int) -> bytes:
    return src.packed + dst.packed + struct.pack("!BBH", 0, proto, length)


@dataclass(frozen=True)
class Udp:
    src_port: int
    dst_port: int
    payload: bytes

    @classmethod
    def parse(cls, ip: IPv4) -> Udp:
        data = ip.payload
        if len(data) < UDP_HEADER.size:
            raise FrameError("short UDP header")
        sport, dport, length, csum = UDP_HEADER.unpack_from(data)
        if length < UDP_HEADER.size or length > len(data):
            raise FrameError("bad UDP length")
        if csum and checksum(_pseudo_header(ip.src, ip.dst, PROTO_UDP, length), data[:length]):
            raise FrameError("bad UDP checksum")
        return cls(sport, dport, data[UDP_HEADER.size : length])

    def build(self, src: IPv4Address, dst: IPv4Address) -> bytes:
        length = UDP_HEADER.size + len(self.payload)
        header = UDP_HEADER.pack(self.src_port, self.dst_port, length, 0)
        csum = checksum(_pseudo_header(src, dst, PROTO_UDP, length), header, self.payload)
        return UDP_HEADER.pack(self.src_port, self.dst_port, length, csum or 0xFFFF) + self.payload


@dataclass(frozen=True)
class Tcp:
    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: int
    window: int
    payload: bytes
    mss: int | None = None
    wscale: int | None = None

    @classmethod
    def parse(cls, ip: IPv4, verify: bool = True) -> Tcp:
        """``verify=False`` skips the checksum (every length is still checked)."""
        data = ip.payload
        if len(data) < TCP_HEADER.size:
            raise FrameError("short TCP header")
        sport, dport, seq, ack, offset, flags, window, _csum, _urg = TCP_HEADER.unpack_from(data)
        hlen = (offset >> 4) * 4
        if hlen < TCP_HEADER.size or hlen > len(data):
            raise FrameError("bad TCP header length")
        if verify and checksum(_pseudo_header(ip.src, ip.dst, PROTO_TCP, len(data)), data):
            raise FrameError("bad TCP checksum")
        mss, wscale = _parse_options(data[20:hlen])
        return cls(sport, dport, seq, ack, flags, window, data[hlen:], mss, wscale)

    def build(self, src: IPv4Address, dst: IPv4Address) -> bytes:
        options = struct.pack("!BBH", 2, 4, self.mss) if self.mss is not None else b""
        if self.wscale is not None:
            options += struct.pack("!BBBB", 1, 3, 3, self.wscale)
        offset = ((TCP_HEADER.size + len(options)) // 4) << 4
        seq, ack = self.seq & 0xFFFFFFFF, self.ack & 0xFFFFFFFF
        fields = (self.src_port, self.dst_port, seq, ack, offset, self.flags, self.window)
        length = TCP_HEADER.size + len(options) + len(self.payload)
        pseudo = _pseudo_header(src, dst, PROTO_TCP, length)
        csum = checksum(pseudo, TCP_HEADER.pack(*fields, 0, 0), options, self.payload)
        return TCP_HEADER.pack(*fields, csum, 0) + options + self.payload


def _parse_options(options: bytes) -> tuple[int | None, int | None]:
    """MSS and window scale from a TCP option list; other options are skipped."""
    mss = wscale = None
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(options) or options[i + 1] < 2 or i + options[i + 1] > len(options):
            raise FrameError("malformed TCP options")
        if kind == 2 and options[i + 1] == 4:
            mss = int(struct.unpack_from("!H", options, i + 2)[0])
        elif kind == 3 and options[i + 1] == 3:
            wscale = min(options[i + 2], 14)  # RFC 7323: larger shifts are treated as 14
        i += options[i + 1]
    return mss, wscale


@dataclass(frozen=True)
class IcmpEcho:
    kind: int  # 8 request, 0 reply
    ident: int
    seq: int
    payload: bytes

    @classmethod
    def parse(cls, ip: IPv4) -> IcmpEcho:
        data = ip.payload
        if len(data) < 8:
            raise FrameError("short ICMP message")
        if checksum(data):
            raise FrameError("bad ICMP checksum")
        kind, code, _csum, ident, seq = struct.unpack_from("!BBHHH", data)
        if kind not in (0, 8) or code != 0:
            raise FrameError(f"ICMP type {kind} is not an echo")
        return cls(kind, ident, seq, data[8:])

    def build(self) -> bytes:
        body = struct.pack("!BBHHH", self.kind, 0, 0, self.ident, self.seq) + self.payload
        return body[:2] + struct.pack("!H", checksum(body)) + body[4:]
