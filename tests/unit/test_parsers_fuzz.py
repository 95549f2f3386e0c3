"""Hostile input for the gateway's DHCP, DNS and sniffing parsers: only the expected errors."""

from __future__ import annotations

import asyncio
import contextlib
from ipaddress import IPv4Address, IPv4Network

import dns.message
from hypothesis import given, settings
from hypothesis import strategies as st

from capsa.net.dhcp import BOOTP, DISCOVER, MAGIC, REQUEST, DhcpMessage, DhcpServer
from capsa.net.dns import DnsProxy
from capsa.net.frames import FrameError
from capsa.net.sniff import sniff

MAC = b"\x52\x54\x00\x12\x34\x56"


def _server() -> DhcpServer:
    net = IPv4Network("10.0.2.0/24")
    return DhcpServer(
        net,
        IPv4Address("10.0.2.2"),
        IPv4Address("10.0.2.15"),
        IPv4Address("10.0.2.20"),
        dns=IPv4Address("10.0.2.3"),
        mtu=1500,
    )


def _dhcp(kind: int, options: bytes = b"") -> bytes:
    # op htype hlen hops xid secs flags ciaddr yiaddr siaddr giaddr chaddr sname file
    body = BOOTP.pack(1, 1, 6, 0, 0x1234, 0, 0, b"\0" * 4, b"\0" * 4, b"\0" * 4, b"\0" * 4,
                      MAC.ljust(16, b"\0"), b"", b"")  # fmt: skip
    return body + MAGIC + bytes([53, 1, kind]) + options + b"\xff"


def _mutate(seed: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    data = bytearray(seed)
    for where, value in edits:
        data[where % len(data)] = value
    return bytes(data[: max(0, len(data) - cut)])


edits = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8)


@settings(max_examples=400, deadline=None)
@given(edits, st.integers(0, 300), st.binary(max_size=64))
def test_malformed_dhcp_is_rejected_or_answered_sanely(
    changes: list[tuple[int, int]], cut: int, options: bytes
) -> None:
    server = _server()
    for kind in (DISCOVER, REQUEST):
        data = _mutate(_dhcp(kind, options), changes, cut)
        try:
            msg = DhcpMessage.parse(data)
        except FrameError:
            continue
        answer = server.handle(msg)
        if answer is not None:
            reply = DhcpMessage.parse(server.reply(msg, *answer))
            assert reply.op == 2 and reply.xid == msg.xid
            assert answer[1] == IPv4Address(0) or answer[1] in server.network


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_dhcp_parser(data: bytes) -> None:
    with contextlib.suppress(FrameError):
        DhcpMessage.parse(data)


@settings(max_examples=400, deadline=None)
@given(edits, st.integers(0, 40), st.sampled_from(["A", "AAAA", "TXT", "MX"]))
def test_malformed_dns_queries_get_refused_or_ignored(
    changes: list[tuple[int, int]], cut: int, rdtype: str
) -> None:
    seed = dns.message.make_query("exfil.example.com", rdtype).to_wire()
    wire = _mutate(seed, changes, cut)
    asked: list[str] = []

    def deny(name: str) -> bool:
        asked.append(name)
        return False

    # An upstream on a closed local port: a name that got past the policy would show up as
    # SERVFAIL rather than REFUSED, and would have been recorded by `deny` first.
    proxy = DnsProxy(("127.0.0.1", 9))
    answer = asyncio.run(proxy.resolve(wire, deny))
    if answer is not None:
        reply = dns.message.from_wire(answer)
        assert reply.rcode() == dns.rcode.REFUSED


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=600),
        st.builds(lambda b: b"\x16\x03\x01" + b, st.binary()),
        st.builds(lambda b: b"GET / HTTP/1.1\r\nHost:" + b, st.binary()),
    )
)
def test_sniffing_random_bytes_finds_no_name_or_a_clean_one(data: bytes) -> None:
    found = sniff(data)
    name = getattr(found, "name", None)
    if name is not None:
        assert name == name.strip().lower() and " " not in name
