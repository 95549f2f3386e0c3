"""Port forwarding (host loopback -> guest), and VMs sharing a cluster's switch."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

import capsa
from capsa import NetworkCluster, NetworkPolicy, Protocol
from capsa.net.icmp import IcmpMode, available_mode
from tests.vm.netkit import GUEST_PY, guest_address

pytestmark = pytest.mark.vm

GUEST_ECHO = r"""
import socket, sys, threading
def tcp(port):
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port)); srv.listen(8)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()
def echo(conn):
    while data := conn.recv(1 << 16):
        conn.sendall(data)
    conn.close()
def udp(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", port))
    while True:
        data, peer = s.recvfrom(65535)
        s.sendto(data[::-1], peer)
for kind, port in (a.split(":") for a in sys.argv[1:]):
    threading.Thread(target={"tcp": tcp, "udp": udp}[kind], args=(int(port),)).start()
"""


async def wait_listening(agent: capsa.AgentClient, *ports: int) -> None:
    """Until the guest's servers are bound (a forward to a closed port is reset)."""
    for _ in range(100):
        listening = (await agent.exec("netstat -ltun")).stdout.decode()
        if all(f":{p} " in listening for p in ports):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"guest servers on {ports} never started")


GUEST_RECV = r"""
import socket, sys
srv = socket.socket(); srv.bind(("0.0.0.0", int(sys.argv[1]))); srv.listen(1)
conn, _ = srv.accept()
with open(sys.argv[2], "wb") as out:
    while data := conn.recv(1 << 16):
        out.write(data)
"""
GUEST_SEND = r"""
import socket, sys
s = socket.socket(); s.connect((sys.argv[1], int(sys.argv[2])))
s.sendall(open(sys.argv[3], "rb").read()); s.shutdown(socket.SHUT_WR); s.recv(1)
"""


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def tcp_round_trip(port: int, payload: bytes) -> bytes:
    for _ in range(50):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            break
        except OSError:
            await asyncio.sleep(0.2)
    else:
        raise AssertionError(f"nothing answers on 127.0.0.1:{port}")
    writer.write(payload)
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 60)
    writer.close()
    return data


async def udp_round_trip(port: int, payload: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect(("127.0.0.1", port))
    try:
        for _ in range(20):  # the guest's server may not be bound yet
            sock.send(payload)
            try:
                return await asyncio.wait_for(loop.sock_recv(sock, 65535), 1.0)
            except TimeoutError:
                continue
        raise AssertionError("no UDP answer through the forward")
    finally:
        sock.close()


async def test_port_forwards_both_ways_under_deny_all() -> None:
    t1, t2, u1 = free_port(), free_port(), free_port(socket.SOCK_DGRAM)
    mode = (
        capsa.NetworkMode.user_nat()
        .forward_tcp(t1, 7001)
        .forward_tcp(t2, 7002)
        .forward_udp(u1, 7003)
        .policy(NetworkPolicy.deny_all())  # forwards are inbound: the policy is for egress
        .build()
    )
    async with await capsa.sandbox().network(mode).build() as sb:
        agent = await sb.agent()
        await guest_address(agent)
        await agent.write_file("/tmp/echo.py", GUEST_ECHO.encode())
        await agent.exec(
            f"{GUEST_PY} /tmp/echo.py tcp:7001 tcp:7002 udp:7003 tcp:7004 >/dev/null 2>&1 &"
        )
        await wait_listening(agent, 7001, 7002, 7003, 7004)
        big, small = os.urandom(3 << 20), os.urandom(1000)
        got_big, got_small = await asyncio.gather(
            tcp_round_trip(t1, big), tcp_round_trip(t2, small)
        )
        assert got_big == big and got_small == small
        assert await udp_round_trip(u1, b"datagram") == b"margatad"

        # Added and removed on the running VM.
        live = await sb.add_port_forward(Protocol.TCP, 0, 7004)
        assert live > 0
        assert await tcp_round_trip(live, b"late") == b"late"
        await sb.remove_port_forward(Protocol.TCP, live)
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", live)
        with pytest.raises(capsa.InvalidConfig, match="no tcp forward"):
            await sb.remove_port_forward(Protocol.TCP, live)
        # Egress is still denied while inbound forwards work.
        r = await agent.exec("nc -w 3 203.0.113.1 80 </dev/null", timeout=30)
        assert r.exit_code != 0


def test_forward_config_errors() -> None:
    with pytest.raises(capsa.InvalidConfig, match="forwarded twice"):
        capsa.NetworkMode.user_nat().forward_tcp(8080, 80).forward_tcp(8080, 81).build()
    with pytest.raises(capsa.InvalidConfig, match="invalid forward"):
        capsa.NetworkMode.user_nat().forward_udp(53, 0)
    with pytest.raises(capsa.InvalidConfig, match="IPv4"):
        capsa.NetworkMode.user_nat().forward_tcp(8080, 80, host_addr="localhost")


async def _wait_ping(agent: capsa.AgentClient, ip: str) -> capsa.ExecResult:
    return await agent.exec(f"ping -c 3 -W 3 {ip}", timeout=30)


async def test_cluster_of_three_with_static_ip_and_nat() -> None:
    payload = os.urandom(100_000)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(payload)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gateway = capsa.Gateway("10.0.7.0/24").address(1).host_alias("203.0.113.5", "127.0.0.1")
    net = NetworkCluster.create("capsa-test-cluster", gateway=gateway)
    try:
        boots = [
            capsa.sandbox().network(capsa.NetworkMode.cluster("capsa-test-cluster")).build(),
            capsa.sandbox().network(capsa.NetworkMode.cluster("capsa-test-cluster")).build(),
            capsa.sandbox()
            .network(capsa.NetworkMode.cluster("capsa-test-cluster").with_ip("10.0.7.50"))
            .build(),
        ]
        boxes = await asyncio.gather(*boots)
        try:
            agents = [await b.agent() for b in boxes]
            ips = [await guest_address(a) for a in agents]
            assert ips[2] == "10.0.7.50"
            assert len(set(ips)) == 3 and all(ip.startswith("10.0.7.") for ip in ips)
            # Every VM reaches every other one (ping) ...
            for a, target in ((agents[0], ips[1]), (agents[1], ips[2]), (agents[2], ips[0])):
                r = await _wait_ping(a, target)
                assert r.exit_code == 0 and b"3 packets received" in r.stdout
            # ... and TCP flows between them.
            # (busybox nc quits at EOF on its own stdin, so Python does both ends)
            await agents[0].write_file("/tmp/recv.py", GUEST_RECV.encode())
            listener = asyncio.create_task(
                agents[0].exec(f"{GUEST_PY} /tmp/recv.py 9000 /tmp/got", timeout=60).run()
            )
            await wait_listening(agents[0], 9000)
            await agents[1].write_file("/tmp/send", payload)
            await agents[1].write_file("/tmp/send.py", GUEST_SEND.encode())
            sent = await agents[1].exec(
                f"{GUEST_PY} /tmp/send.py {ips[0]} 9000 /tmp/send", timeout=60
            )
            assert sent.exit_code == 0, sent.stderr
            assert (await listener).exit_code == 0
            assert await agents[0].read_file("/tmp/got") == payload
            # The cluster's gateway also NATs to the host.
            r = await agents[2].exec(f"nc -w 10 203.0.113.5 {port} </dev/null | wc -c", timeout=30)
            assert int(r.stdout) == len(payload)
            if available_mode() is not IcmpMode.NONE:
                r = await _wait_ping(agents[0], "203.0.113.5")
                assert r.exit_code == 0 and b"3 packets received" in r.stdout
        finally:
            for b in boxes:
                await b.kill()
        assert not net.running  # the switch went away with its last VM
    finally:
        server.close()
        NetworkCluster.remove("capsa-test-cluster")


async def test_virtual_network_with_interface_forward() -> None:
    gateway = capsa.Gateway("10.0.9.0/24")
    net = capsa.VirtualNetwork.with_gateway(gateway)
    port = free_port()
    iface = capsa.NetworkInterface(net).forward_tcp(port, 7001)
    async with await capsa.sandbox().interface(iface).build() as sb:
        agent = await sb.agent()
        assert (await guest_address(agent)).startswith("10.0.9.")
        await agent.write_file("/tmp/echo.py", GUEST_ECHO.encode())
        await agent.exec(f"{GUEST_PY} /tmp/echo.py tcp:7001 >/dev/null 2>&1 &")
        await wait_listening(agent, 7001)
        assert await tcp_round_trip(port, b"interface") == b"interface"
    assert not net.running
