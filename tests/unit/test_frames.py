import contextlib
import random
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capsa.net.frames import (
    ETHERTYPE_IPV4,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_SYN,
    Arp,
    Ethernet,
    FrameError,
    IcmpEcho,
    IPv4,
    Tcp,
    Udp,
    checksum,
)

GUEST, GW = IPv4Address("10.0.2.15"), IPv4Address("10.0.2.2")
GUEST_MAC, GW_MAC = bytes.fromhex("525400123456"), bytes.fromhex("525400000001")


def test_checksum_known_value() -> None:
    # RFC 1071's example words sum to 0xddf2; the checksum is its complement.
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D


def _words_summed(data: bytes) -> int:
    """RFC 1071 the slow way: 16-bit words added with end-around carry."""
    data += b"\0" * (len(data) % 2)
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@pytest.mark.parametrize("size", [0, 1, 2, 3, 19, 20, 1500, 4097, 65480, 65535])
def test_checksum_matches_word_by_word_sums_whole_and_in_parts(size: int) -> None:
    rng = random.Random(size)
    for data in (rng.randbytes(size), b"\xff" * size, b"\0" * size):
        expected = _words_summed(data)
        assert checksum(data) == expected
        cut = rng.randrange(size + 1) & ~1  # every part but the last has even length
        assert checksum(data[:cut], data[cut:]) == expected
        assert checksum(b"", data[:cut], b"", data[cut:]) == expected


def test_checksum_refuses_an_odd_part_before_the_last() -> None:
    with pytest.raises(ValueError, match="odd length"):
        checksum(b"abc", b"d")


def test_udp_round_trip_through_ethernet_and_ip() -> None:
    udp = Udp(5353, 53, b"query").build(GUEST, GW)
    ip = IPv4(GUEST, GW, PROTO_UDP, udp).build()
    frame = Ethernet(GW_MAC, GUEST_MAC, ETHERTYPE_IPV4, ip).build()
    eth = Ethernet.parse(frame)
    parsed_ip = IPv4.parse(eth.payload)
    assert (parsed_ip.src, parsed_ip.dst) == (GUEST, GW)
    assert Udp.parse(parsed_ip) == Udp(5353, 53, b"query")


def test_tcp_round_trip_with_mss() -> None:
    seg = Tcp(40000, 443, 1, 0, TCP_SYN, 65535, b"", mss=65480).build(GUEST, GW)
    parsed = Tcp.parse(IPv4.parse(IPv4(GUEST, GW, PROTO_TCP, seg).build()))
    assert parsed.flags == TCP_SYN and parsed.mss == 65480 and parsed.seq == 1
    data = Tcp(443, 40000, 7, 2, TCP_ACK, 1000, b"x" * 60000).build(GW, GUEST)
    assert Tcp.parse(IPv4.parse(IPv4(GW, GUEST, PROTO_TCP, data).build())).payload == b"x" * 60000


def test_corrupted_checksums_are_rejected() -> None:
    ip = bytearray(IPv4(GUEST, GW, PROTO_UDP, Udp(1, 2, b"abc").build(GUEST, GW)).build())
    ip[-1] ^= 0xFF  # payload byte: UDP checksum breaks
    with pytest.raises(FrameError, match="UDP checksum"):
        Udp.parse(IPv4.parse(bytes(ip)))
    ip[8] ^= 0x01  # TTL: header checksum breaks
    with pytest.raises(FrameError, match="IPv4 header checksum"):
        IPv4.parse(bytes(ip))


def test_fragments_and_bad_lengths_are_rejected() -> None:
    good = IPv4(GUEST, GW, PROTO_ICMP, IcmpEcho(8, 1, 1, b"ping").build()).build()
    assert IcmpEcho.parse(IPv4.parse(good)).payload == b"ping"
    with pytest.raises(FrameError):
        IPv4.parse(good[:-5])  # total length beyond the data


def test_arp_round_trip() -> None:
    req = Arp(1, GUEST_MAC, GUEST, b"\0" * 6, GW)
    assert Arp.parse(req.build()) == req


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_random_frames_only_raise_frame_errors(data: bytes) -> None:
    for parse in (Ethernet.parse, Arp.parse, IPv4.parse):
        with contextlib.suppress(FrameError):
            parse(data)
    ip = IPv4(GUEST, GW, PROTO_TCP, data)
    for layer in (Tcp.parse, Udp.parse, IcmpEcho.parse):
        with contextlib.suppress(FrameError):
            layer(ip)


def test_unverified_tcp_parse_still_checks_lengths() -> None:
    seg = Tcp(1234, 80, 1, 0, 0x18, 1024, b"payload").build(GUEST, GW)
    corrupt = seg[:16] + b"\xde\xad" + seg[18:]  # checksum field overwritten
    ip = IPv4(GUEST, GW, PROTO_TCP, corrupt)
    with pytest.raises(FrameError, match="checksum"):
        Tcp.parse(ip)
    assert Tcp.parse(ip, verify=False).payload == b"payload"
    with pytest.raises(FrameError, match="header length"):
        Tcp.parse(IPv4(GUEST, GW, PROTO_TCP, seg[:12] + b"\xf0" + seg[13:20]), verify=False)
