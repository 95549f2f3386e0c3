"""Test-side network services, all on this machine's loopback.

Guest-visible "external" hosts get documentation addresses (203.0.113.0/24) that the
gateway's host-alias map sends to 127.0.0.x; the test's DNS server answers for them and is
the gateway's only upstream, so no packet leaves the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import ssl
from collections import Counter
from dataclasses import dataclass, field

import dns.message
import dns.rcode
import dns.rrset
import pytest
import trustme

import capsa

GUEST_PY = "/usr/lib/capsa/python/bin/python3 -I"

# A small wget for the guest: busybox-static's own wget crashes in name resolution (static
# glibc), so names are resolved by the guest's dynamic Python, through the gateway's DNS.
# HTTPS goes through busybox's ssl_client on the connected socket, with the name as SNI.
GUEST_FETCH = r"""
import socket, subprocess, sys
url, host_header = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "")
scheme, _, rest = url.partition("://")
host = rest.split("/")[0]
port = 443 if scheme == "https" else 80
address = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
sock = socket.socket()
sock.settimeout(15)
sock.connect(address)
request = ("GET / HTTP/1.0\r\nHost: %s\r\n\r\n" % (host_header or host)).encode()
if scheme == "https":
    sock.setblocking(True)  # a timeout makes the descriptor non-blocking for ssl_client too
    proc = subprocess.run(["ssl_client", "-s", str(sock.fileno()), "-n", host], input=request,
                          capture_output=True, pass_fds=[sock.fileno()], timeout=30)
    response = proc.stdout
    if proc.returncode:
        sys.exit("ssl_client failed: %r" % proc.stderr[-300:])
else:
    sock.sendall(request)
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            break
        chunks.append(data)
    response = b"".join(chunks)
head, _, body = response.partition(b"\r\n\r\n")
if not head.startswith(b"HTTP/1.0 200"):
    sys.exit("no HTTP 200: %r" % head[:100])
open("/tmp/f", "wb").write(body)
"""


async def guest_address(agent: capsa.AgentClient, timeout: float = 45.0) -> str:
    """eth0's IPv4 address once it has one (udhcpc retries a lost discover only after
    seconds, which a loaded CI machine makes likelier)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        out = (await agent.exec("ip -4 -o addr show eth0")).stdout.decode().split()
        if "inet" in out:
            return out[out.index("inet") + 1].split("/")[0]
        await asyncio.sleep(0.1)
    raise AssertionError(f"eth0 never got an address in {timeout:g}s")


class DnsServer(asyncio.DatagramProtocol):
    """Answers A queries from a fixed table; records every name asked."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table = table
        self.asked: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        name = query.question[0].name.to_text(omit_final_dot=True)
        self.asked.append(name)
        reply = dns.message.make_response(query)
        if name in self.table:
            reply.answer.append(dns.rrset.from_text(name + ".", 300, "IN", "A", self.table[name]))
        else:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        self.transport.sendto(reply.to_wire(), addr)  # type: ignore[attr-defined]


@dataclass
class WebSite:
    """HTTP on :80 and HTTPS on :443 of one loopback address; counts connections."""

    address: str
    body: bytes
    connections: Counter[str] = field(default_factory=Counter)
    servers: list[asyncio.AbstractServer] = field(default_factory=list)

    async def _serve(self, scheme: str, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections[scheme] += 1
        try:
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 20)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            w.close()
            return
        if head.startswith(b"GET "):
            w.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(self.body) + self.body)
        with contextlib.suppress(OSError):
            await w.drain()
        w.close()

    async def start(self, tls: ssl.SSLContext) -> None:
        try:
            self.servers.append(
                await asyncio.start_server(lambda r, w: self._serve("http", r, w), self.address, 80)
            )
            self.servers.append(
                await asyncio.start_server(
                    lambda r, w: self._serve("https", r, w), self.address, 443, ssl=tls
                )
            )
        except PermissionError:
            pytest.skip("binding ports 80/443 on loopback needs root")

    def close(self) -> None:
        for s in self.servers:
            s.close()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


def tls_context() -> tuple[ssl.SSLContext, trustme.CA]:
    ca = trustme.CA()
    cert = ca.issue_cert("allowed.test", "other.test", "api.allowed.test")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    # busybox's TLS client offers a few older suites (AES-CBC, RSA key exchange) only.
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    return ctx, ca


def client_hello(server_name: str) -> bytes:
    """The first flight of a real TLS client asking for ``server_name``."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def random_body(size: int = 200_000) -> bytes:
    return os.urandom(size)
