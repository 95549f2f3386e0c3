"""vsock through our vhost-user back end, with Python programs inside the sandbox."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import capsa

pytestmark = pytest.mark.vm
PYTHON = "/usr/lib/capsa/python/bin/python3"

# Guest side, listen mode: N clients connect to the host, say hello first, then answer
# every line they receive with its length and the line reversed.
GUEST_CLIENTS = r"""
import socket, sys, threading
port, n = int(sys.argv[1]), int(sys.argv[2])
def client(i):
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.connect((2, port))
    s.sendall(f"hello {i} {i * i}\n".encode())
    f = s.makefile("rb")
    for line in f:
        line = line.rstrip(b"\n")
        if line == b"bye":
            break
        s.sendall(b"%d:%s\n" % (len(line), line[::-1]))
    s.close()
ts = [threading.Thread(target=client, args=(i,)) for i in range(n)]
for t in ts: t.start()
for t in ts: t.join()
"""

# Guest side, connect mode: a server that answers each connection with the sum of the
# numbers it was sent.
GUEST_SERVER = r"""
import socket, sys, threading
s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
s.bind((socket.VMADDR_CID_ANY, int(sys.argv[1])))
s.listen(8)
print("listening", flush=True)
def serve(c):
    data = b""
    while chunk := c.recv(65536):
        data += chunk
    c.sendall(str(sum(int(x) for x in data.split())).encode())
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,)).start()
"""


@pytest.fixture(scope="module")
async def sb(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[capsa.Sandbox]:
    custom = tmp_path_factory.mktemp("vs") / "custom.sock"
    builder = capsa.sandbox().vsock_listen(1024).vsock_listen_at(1025, custom)
    builder.vsock_connect(2049).vsock_connect(2050)
    async with await builder.build() as sandbox:
        agent = await sandbox.agent()
        await agent.write_file("/tmp/clients.py", GUEST_CLIENTS.encode())
        await agent.write_file("/tmp/server.py", GUEST_SERVER.encode())
        yield sandbox


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readline(), 30)


async def test_listen_mode_ping_pong_with_data_sent_before_attach(sb: capsa.Sandbox) -> None:
    agent = await sb.agent()
    proc = await agent.start([PYTHON, "-I", "/tmp/clients.py", "1024", "1"])
    await asyncio.sleep(2)  # the guest connects and sends its hello before we attach
    sock = sb.vsock_socket(1024)
    assert sock is not None and not sock.connect_mode
    reader, writer = await sock.connect()
    assert await _read_line(reader) == b"hello 0 0\n"
    for word in (b"ping", b"vsock-through-python"):
        writer.write(word + b"\n")
        await writer.drain()
        assert await _read_line(reader) == b"%d:%s\n" % (len(word), word[::-1])
    writer.write(b"bye\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 30) == b""  # the guest closed
    writer.close()
    assert await proc.wait(30) == 0


async def test_three_concurrent_connections_on_a_custom_path(sb: capsa.Sandbox) -> None:
    agent = await sb.agent()
    sock = sb.vsock_socket(1025)
    assert sock is not None and sock.path.name == "custom.sock"
    proc = await agent.start([PYTHON, "-I", "/tmp/clients.py", "1025", "3"])
    conns = [await sock.connect() for _ in range(3)]
    hellos = sorted([await _read_line(r) for r, _ in conns])
    assert hellos == [b"hello 0 0\n", b"hello 1 1\n", b"hello 2 4\n"]
    for i, (_, w) in enumerate(conns):
        w.write(b"x" * (i + 1) * 1000 + b"\n")
        await w.drain()
    for i, (r, w) in enumerate(conns):
        n = (i + 1) * 1000
        assert await _read_line(r) == b"%d:%s\n" % (n, b"x" * n)
        w.write(b"bye\n")
        await w.drain()
        w.close()
    assert await proc.wait(30) == 0


async def test_connect_mode_two_ports_and_a_large_transfer(sb: capsa.Sandbox) -> None:
    agent = await sb.agent()
    server = await agent.start([PYTHON, "-I", "/tmp/server.py", "2049"])
    assert await asyncio.wait_for(server.stdout.__anext__(), 30) == b"listening\n"
    sock = sb.vsock_socket(2049)
    assert sock is not None and sock.connect_mode
    numbers = list(range(200_000))  # about 1.3 MB: exercises credit in both directions
    reader, writer = await sock.connect()
    writer.write(" ".join(map(str, numbers)).encode())
    await writer.drain()
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 60) == str(sum(numbers)).encode()
    writer.close()
    # Three host clients at once, each its own guest connection.
    pairs = [await sock.connect() for _ in range(3)]
    for i, (_, w) in enumerate(pairs):
        w.write(f"{i} {i * 10}".encode())
        await w.drain()
        w.write_eof()
    for i, (r, w) in enumerate(pairs):
        assert await asyncio.wait_for(r.read(), 30) == str(i * 11).encode()
        w.close()
    # Nothing listens on 2050 in the guest: the host client is closed at once.
    r2, w2 = await sb.vsock_socket(2050).connect()  # type: ignore[union-attr]
    assert await asyncio.wait_for(r2.read(), 30) == b""
    w2.close()
    await server.kill()


async def test_socket_files_go_away_with_the_vm() -> None:
    async with await capsa.sandbox().vsock_listen(3000).build() as sb:
        await sb.agent()
        path = sb.vsock_socket(3000).path  # type: ignore[union-attr]
        assert path.exists()
    assert not path.exists()


def test_port_zero_and_duplicates_are_rejected() -> None:
    with pytest.raises(capsa.InvalidConfig, match="vsock port"):
        capsa.sandbox().vsock_listen(0).config()
    with pytest.raises(capsa.InvalidConfig, match="duplicate vsock port: 7"):
        capsa.sandbox().vsock_listen(7).vsock_connect_at(7, Path("/tmp/x.sock")).config()
