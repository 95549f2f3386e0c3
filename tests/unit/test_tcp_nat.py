"""TCP NAT in the gateway, driven by a scripted guest against real loopback servers."""

from __future__ import annotations

import asyncio
import struct
from ipaddress import IPv4Address

from hypothesis import given, settings
from hypothesis import strategies as st

from capsa.net.frames import (
    ETHERTYPE_IPV4,
    PROTO_TCP,
    TCP_ACK,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    Ethernet,
    IPv4,
    Tcp,
)
from capsa.net.gateway import GATEWAY_MAC, Router
from capsa.net.policy import NetworkPolicy
from capsa.net.sniff import Kind, sniff
from capsa.net.tcp import unwrap

MAC = bytes.fromhex("525400abcdef")
GUEST = IPv4Address("10.0.2.15")
REMOTE = IPv4Address("203.0.113.1")


class Guest:
    """Plays the guest's TCP for one connection, recording what the gateway sends."""

    def __init__(self, gateway: Router, port: int, sport: int = 40000) -> None:
        self.gw, self.port, self.sport = gateway, port, sport
        self.seq = 1000
        self.ack = 0
        self.received = bytearray()
        self.segments: list[Tcp] = []
        gateway.emit = self._on_frame

    def _on_frame(self, frame: bytes) -> None:
        ip = IPv4.parse(Ethernet.parse(frame).payload)
        if ip.protocol != PROTO_TCP:
            return
        tcp = Tcp.parse(ip)
        self.segments.append(tcp)
        if tcp.flags & TCP_SYN:
            self.ack = tcp.seq + 1
        if tcp.payload and tcp.seq == self.ack:
            self.received += tcp.payload
            self.ack += len(tcp.payload)
        if tcp.flags & TCP_FIN:
            self.ack += 1

    def send(self, flags: int, payload: bytes = b"", **extra: int) -> None:
        seg = Tcp(self.sport, self.port, self.seq, self.ack, flags, 65535, payload, **extra)
        packet = IPv4(GUEST, REMOTE, PROTO_TCP, seg.build(GUEST, REMOTE)).build()
        self.gw.handle(Ethernet(GATEWAY_MAC, MAC, ETHERTYPE_IPV4, packet).build())
        self.seq += len(payload) + (1 if flags & (TCP_SYN | TCP_FIN) else 0)

    async def until(self, predicate: object, timeout: float = 5.0) -> None:
        for _ in range(int(timeout / 0.01)):
            if predicate():  # type: ignore[operator]
                return
            await asyncio.sleep(0.01)
        raise AssertionError("timed out")

    def last_flags(self) -> int:
        return self.segments[-1].flags if self.segments else 0


def gateway(policy: NetworkPolicy | None = None) -> Router:
    return Router.for_subnet("10.0.2.0/24", mtu=65520, aliases={REMOTE: "127.0.0.1"}, policy=policy)


async def test_relays_both_ways_with_half_close() -> None:
    seen = bytearray()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.extend(await reader.read())  # until the guest's FIN
        writer.write(bytes(reversed(seen)) * 50)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    gw = gateway()
    guest = Guest(gw, server.sockets[0].getsockname()[1])
    guest.send(TCP_SYN, mss=1460, wscale=7)
    await guest.until(lambda: guest.last_flags() == TCP_SYN | TCP_ACK)
    guest.send(TCP_ACK)
    guest.send(TCP_ACK | TCP_PSH, b"hello ")
    guest.send(TCP_ACK | TCP_PSH, b"world")
    guest.send(TCP_FIN | TCP_ACK)
    expected = b"dlrow olleh" * 50
    await guest.until(lambda: guest.received == expected and guest.last_flags() & TCP_FIN)
    assert all(len(s.payload) <= 1460 for s in guest.segments)  # the guest's MSS holds
    guest.send(TCP_ACK)
    await guest.until(lambda: not gw.tcp)
    assert bytes(seen) == b"hello world"
    server.close()


async def test_closed_port_and_policy_denial_answer_rst() -> None:
    with socket_port() as port:
        gw = gateway()
        guest = Guest(gw, port)
        guest.send(TCP_SYN)
        await guest.until(lambda: guest.last_flags() & TCP_RST)
    gw = gateway(NetworkPolicy.deny_all())
    guest = Guest(gw, 80)
    guest.send(TCP_SYN)
    assert guest.last_flags() & TCP_RST and gw.denied == 1 and not gw.tcp


async def test_domain_rule_checks_sni_before_connecting() -> None:
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # A domain rule admits only the ports it names (by default 80 and 443).
    gw = gateway(NetworkPolicy.deny_all().allow_domain("good.test", ports=(port,)))
    assert gw.dns is not None
    gw.dns.pinned[REMOTE] = ({"good.test"}, 1e18)
    guest = Guest(gw, port)
    guest.send(TCP_SYN)
    assert guest.last_flags() == TCP_SYN | TCP_ACK  # completed locally, host not yet asked
    guest.send(TCP_ACK)
    guest.send(TCP_ACK | TCP_PSH, b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n")
    await guest.until(lambda: guest.last_flags() & TCP_RST)
    await asyncio.sleep(0.1)
    assert connections == 0 and gw.denied == 1
    server.close()


class socket_port:
    """A loopback port with nothing listening on it."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_sequence_unwrap_across_the_32_bit_boundary() -> None:
    assert unwrap(5, 0xFFFFFFF0) == 0x100000005
    assert unwrap(0xFFFFFFF0, 0x100000005) == 0xFFFFFFF0
    assert unwrap(100, 90) == 100


def test_sniff_http_host_and_tls_sni() -> None:
    assert sniff(b"GET / HTTP/1.1\r\nHost: A.Test:80\r\n\r\n").name == "a.test"
    assert sniff(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").name is None
    assert sniff(b"GET / HTT").kind is Kind.INCOMPLETE
    assert sniff(b"SSH-2.0-x\r\n").kind is Kind.OPAQUE
    assert sniff(b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00").kind is Kind.TLS  # no SNI


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_sniff_never_raises(data: bytes) -> None:
    sniff(data)
    sniff(b"\x16\x03\x01" + struct.pack("!H", len(data)) + data)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 0xFFFFFFFF),
            st.integers(0, 0xFFFFFFFF),
            st.integers(0, 0x3F),
            st.integers(0, 0xFFFF),
            st.binary(max_size=64),
        ),
        max_size=20,
    )
)
def test_hostile_segments_on_a_live_connection(
    segments: list[tuple[int, int, int, int, bytes]],
) -> None:
    async def run() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        gw = gateway()
        guest = Guest(gw, server.sockets[0].getsockname()[1])
        guest.send(TCP_SYN)
        await guest.until(lambda: bool(guest.segments))
        for seq, ack, flags, window, payload in segments:
            seg = Tcp(guest.sport, guest.port, seq, ack, flags, window, payload)
            packet = IPv4(GUEST, REMOTE, PROTO_TCP, seg.build(GUEST, REMOTE)).build()
            gw.handle(Ethernet(GATEWAY_MAC, MAC, ETHERTYPE_IPV4, packet).build())
        gw.close()
        server.close()

    asyncio.run(run())
