import contextlib
from ipaddress import IPv4Address

from hypothesis import given, settings
from hypothesis import strategies as st

from capsa.net.dhcp import ACK, BOOTP, DISCOVER, MAGIC, NAK, OFFER, REQUEST, DhcpMessage
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
from capsa.net.gateway import BROADCAST_MAC, GATEWAY_MAC, Router

MAC = bytes.fromhex("525400abcdef")
ZERO, BCAST = IPv4Address(0), IPv4Address("255.255.255.255")


def dhcp_frame(kind: int, mac: bytes = MAC, requested: IPv4Address | None = None) -> bytes:
    opts = bytes([53, 1, kind]) + (bytes([50, 4]) + requested.packed if requested else b"")
    # op htype hlen hops xid secs flags ciaddr yiaddr siaddr giaddr chaddr sname file
    bootp = BOOTP.pack(1, 1, 6, 0, 0x1234, 0, 0x8000, b"\0" * 4, b"\0" * 4, b"\0" * 4, b"\0" * 4,
                       mac.ljust(16, b"\0"), b"", b"")  # fmt: skip
    body = bootp + MAGIC + opts + b"\xff"
    udp = Udp(68, 67, body).build(ZERO, BCAST)
    return Ethernet(
        BROADCAST_MAC, mac, ETHERTYPE_IPV4, IPv4(ZERO, BCAST, PROTO_UDP, udp).build()
    ).build()


def reply_of(frame: bytes) -> tuple[int, IPv4Address]:
    ip = IPv4.parse(Ethernet.parse(frame).payload)
    msg = DhcpMessage.parse(Udp.parse(ip).payload)
    yiaddr = IPv4Address(Udp.parse(ip).payload[16:20])
    assert msg.msg_type is not None
    return msg.msg_type, yiaddr


def test_dhcp_discover_offer_request_ack() -> None:
    gw = Router.for_subnet("10.0.2.0/24")
    (offer,) = gw.handle(dhcp_frame(DISCOVER))
    assert reply_of(offer) == (OFFER, IPv4Address("10.0.2.15"))
    (ack,) = gw.handle(dhcp_frame(REQUEST, requested=IPv4Address("10.0.2.15")))
    assert reply_of(ack) == (ACK, IPv4Address("10.0.2.15"))
    (nak,) = gw.handle(dhcp_frame(REQUEST, requested=IPv4Address("10.0.2.99")))
    assert reply_of(nak)[0] == NAK
    other = bytes.fromhex("525400000099")
    (offer2,) = gw.handle(dhcp_frame(DISCOVER, mac=other))
    assert reply_of(offer2) == (OFFER, IPv4Address("10.0.2.16"))


def test_dhcp_pool_exhaustion_means_silence() -> None:
    gw = Router.for_subnet("10.0.2.0/27")  # leases .15 to .30
    for i in range(16):
        mac = bytes([0x52, 0x54, 0, 0, 0, i])
        (offer,) = gw.handle(dhcp_frame(DISCOVER, mac=mac))
        _, ip = reply_of(offer)
        (ack,) = gw.handle(dhcp_frame(REQUEST, mac=mac, requested=ip))
        assert reply_of(ack) == (ACK, IPv4Address(f"10.0.2.{15 + i}"))
    assert gw.handle(dhcp_frame(DISCOVER, mac=bytes(6))) == []


def test_arp_and_ping_for_the_gateway() -> None:
    gw = Router.for_subnet("10.0.2.0/24")
    guest = IPv4Address("10.0.2.15")
    who_has = Arp(1, MAC, guest, b"\0" * 6, gw.address).build()
    (reply,) = gw.handle(Ethernet(BROADCAST_MAC, MAC, ETHERTYPE_ARP, who_has).build())
    arp = Arp.parse(Ethernet.parse(reply).payload)
    assert (arp.op, arp.sender_mac, arp.sender_ip, arp.target_ip) == (
        2,
        GATEWAY_MAC,
        gw.address,
        guest,
    )
    echo = IPv4(guest, gw.address, PROTO_ICMP, IcmpEcho(8, 7, 3, b"payload").build()).build()
    (pong,) = gw.handle(Ethernet(GATEWAY_MAC, MAC, ETHERTYPE_IPV4, echo).build())
    reply_ip = IPv4.parse(Ethernet.parse(pong).payload)
    assert reply_ip.dst == guest and IcmpEcho.parse(reply_ip) == IcmpEcho(0, 7, 3, b"payload")
    # ARP for someone else and pings elsewhere get no answer from the gateway.
    other = Arp(1, MAC, guest, b"\0" * 6, IPv4Address("10.0.2.77")).build()
    assert gw.handle(Ethernet(BROADCAST_MAC, MAC, ETHERTYPE_ARP, other).build()) == []


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400))
def test_hostile_frames_never_crash_the_gateway(data: bytes) -> None:
    gw = Router.for_subnet("10.0.2.0/24")
    gw.handle(data)
    gw.handle(Ethernet(BROADCAST_MAC, MAC, ETHERTYPE_IPV4, data).build())
    with contextlib.suppress(FrameError):
        DhcpMessage.parse(data)


async def test_udp_flows_relay_through_host_sockets_and_respect_aliases() -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    got: list[bytes] = []

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            got.append(data)
            self.transport.sendto(data.upper(), addr)  # type: ignore[attr-defined]

    transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    alias = IPv4Address("203.0.113.1")
    gw = Router.for_subnet("10.0.2.0/24", aliases={alias: "127.0.0.1"})
    out: list[bytes] = []
    gw.emit = out.append
    guest = IPv4Address("10.0.2.15")

    def udp_to(dst: IPv4Address) -> bytes:
        packet = IPv4(guest, dst, PROTO_UDP, Udp(5555, port, b"hi").build(guest, dst)).build()
        return Ethernet(GATEWAY_MAC, MAC, ETHERTYPE_IPV4, packet).build()

    assert gw.handle(udp_to(alias)) == []
    assert gw.handle(udp_to(IPv4Address("127.0.0.1"))) == []  # loopback without alias: dropped
    for _ in range(500):
        if out:
            break
        await asyncio.sleep(0.02)
    transport.close()
    assert got == [b"hi"] and gw.dropped == 1
    reply = IPv4.parse(Ethernet.parse(out[0]).payload)
    assert (reply.src, reply.dst) == (alias, guest)
    assert Udp.parse(reply) == Udp(port, 5555, b"HI")
