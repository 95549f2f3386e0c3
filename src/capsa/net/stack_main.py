"""The network stack as a helper process: a virtual switch, its gateway, and QEMU ports.

    python -m capsa.net.stack_main --spec '{"subnet": "10.0.2.0/24", ...}'

Each VM gets its own switch port: a Unix socket the stack listens on before QEMU starts
(QEMU's ``-netdev stream`` does not reconnect), bound to the MAC address QEMU was given,
so a guest cannot send with another VM's address. Framing (QEMU 7.2): every Ethernet
frame is preceded by its length as a 4-byte big-endian integer, in both directions.

It follows capsa's helper convention (:mod:`capsa._util.helper`): the owner
(:mod:`capsa.net.stack`) drives it through JSON lines on stdin and reads one JSON line per
request on stdout; EOF on stdin (the owner went away) ends the process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import socket
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from capsa._util.helper import run_helper, say_ready, serve_requests
from capsa.net.dns import host_resolver
from capsa.net.frames import ETHERTYPE_ARP
from capsa.net.gateway import BROADCAST_MAC, Router
from capsa.net.icmp import IcmpRelay
from capsa.net.policy import IpProtocol, NetworkPolicy
from capsa.net.spec import GatewaySpec, NetworkSpec, PortForward

LENGTH = struct.Struct("!I")
ARP_TYPE = ETHERTYPE_ARP.to_bytes(2, "big")
MAX_FRAME = 65535 + 14
WRITE_LIMIT = 16 << 20  # frames queued for one slow VM before it is cut off

log = logging.getLogger("capsa.net")


@dataclass
class Port:
    mac: bytes
    path: Path
    server: asyncio.AbstractServer | None = None
    writer: asyncio.StreamWriter | None = None
    # Datagram ports (vfkit, QEMU's -netdev dgram): one frame per datagram, no length
    # prefix; replies go to the address the VM sends from.
    dgram: asyncio.DatagramTransport | None = None
    peer: str | None = None

    def send(self, frame: bytes) -> None:
        if self.dgram is not None:
            if self.peer is not None and not self.dgram.is_closing():
                with contextlib.suppress(OSError):
                    self.dgram.sendto(frame, self.peer)
            return
        if self.writer is None or self.writer.is_closing():
            return
        if self.writer.transport.get_write_buffer_size() > WRITE_LIMIT:
            return  # the VM is not reading: drop rather than grow without bound
        self.writer.write(LENGTH.pack(len(frame)) + frame)


@dataclass
class Switch:
    """Learns nothing: every port's MAC is known up front, so delivery is a lookup."""

    gateway: Router
    routed: bool = True  # False: a bare switch, the gateway never sees a frame
    ports: dict[bytes, Port] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def from_port(self, port: Port, frame: bytes) -> None:
        if len(frame) < 14 or frame[6:12] != port.mac:
            return  # runt, or a spoofed source address
        if self.routed and frame[12:14] == ARP_TYPE and not self.gateway.arp_allowed(frame):
            return  # claims another VM's address: poisons no neighbour's ARP cache
        dst = frame[:6]
        if dst == BROADCAST_MAC or dst[0] & 1:
            self._flood(frame, exclude=port)
            self._to_gateway(frame)
        elif dst in self.ports:
            self.ports[dst].send(frame)
        elif dst == self.gateway.mac:
            self._to_gateway(frame)

    def _to_gateway(self, frame: bytes) -> None:
        if not self.routed:
            return
        for reply in self.gateway.handle(frame):
            self.deliver(reply)

    def deliver(self, frame: bytes) -> None:
        dst = frame[:6]
        if dst in self.ports:
            self.ports[dst].send(frame)
        elif dst == BROADCAST_MAC or dst[0] & 1:
            self._flood(frame, exclude=None)

    def _flood(self, frame: bytes, exclude: Port | None) -> None:
        for port in self.ports.values():
            if port is not exclude:
                port.send(frame)

    async def add_port(self, path: Path, mac: bytes, datagram: bool = False) -> None:
        if mac in self.ports:
            raise ValueError(f"MAC {mac.hex(':')} already has a port")
        port = Port(mac, path)
        if datagram:
            await self._add_datagram_port(port)
            return

        async def on_qemu(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if port.writer is not None:
                writer.close()  # one VM per port
                return
            port.writer = writer
            await self._serve(port, reader)
            port.writer = None
            writer.close()

        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        port.server = await asyncio.start_unix_server(on_qemu, path=str(path))
        self.ports[mac] = port

    async def _add_datagram_port(self, port: Port) -> None:
        switch = self

        class PortDatagrams(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                sender = addr if isinstance(addr, str) else None
                if not sender:
                    return  # an unbound sender could never get an answer
                if port.peer is None:
                    port.peer = sender  # the first sender owns the port: one VM per port
                if sender == port.peer and len(data) <= MAX_FRAME:
                    switch.from_port(port, data)

        with contextlib.suppress(FileNotFoundError):
            port.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(port.path))
        # Room for bursts of 64 KiB frames in both directions.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(PortDatagrams, sock=sock)
        port.dgram = transport
        self.ports[port.mac] = port

    async def _serve(self, port: Port, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                (length,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
                if length > MAX_FRAME:
                    return  # a framing error cannot be recovered from: drop the link
                self.from_port(port, await reader.readexactly(length))
                if port.writer is not None:
                    await port.writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    def remove_port(self, mac: bytes) -> None:
        port = self.ports.pop(mac, None)
        if port is None:
            return
        if port.server is not None:
            port.server.close()
        if port.writer is not None:
            port.writer.close()
        if port.dgram is not None:
            port.dgram.close()
        with contextlib.suppress(OSError):
            port.path.unlink()

    def close(self) -> None:
        for mac in list(self.ports):
            self.remove_port(mac)
        self.gateway.close()


class Controller:
    """Executes the owner's requests against the running switch and gateway."""

    def __init__(self, switch: Switch) -> None:
        self.switch = switch
        self.gateway = switch.gateway

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "add_port":
            mac = bytes.fromhex(request["mac"])
            await self.switch.add_port(Path(request["path"]), mac, bool(request.get("datagram")))
            if request.get("ip"):
                self.gateway.reserve(mac, IPv4Address(request["ip"]))
            return {}
        if op == "remove_port":
            mac = bytes.fromhex(request["mac"])
            self.switch.remove_port(mac)
            self.gateway.forget(mac)
            return {"ports": len(self.switch.ports)}
        if op == "set_policy":
            raw = request.get("policy")
            self.gateway.policy = NetworkPolicy.from_json(raw) if raw is not None else None
            return {}
        if op == "add_forward":
            port = await self.gateway.add_forward(PortForward.from_json(request["forward"]))
            return {"host_port": port}
        if op == "remove_forward":
            await self.gateway.remove_forward(
                IpProtocol(request["protocol"]), request["host_addr"], int(request["host_port"])
            )
            return {}
        if op == "stats":
            g = self.gateway
            return {
                "tcp": len(g.tcp),
                "udp": len(g.udp_flows),
                "denied": g.denied,
                "dropped": g.dropped,
                "malformed": g.malformed,
                "spoofed": g.spoofed,
                "buffered": g.buffers.used,
                "dns_shed": g.dns.shed if g.dns is not None else 0,
                "leases": {m.hex(): str(ip) for m, ip in g.dhcp.leases.items()},
            }
        raise ValueError(f"unknown request {op!r}")


async def serve(spec: NetworkSpec, identity: str | None = None) -> None:
    gateway_spec = spec.gateway or GatewaySpec(nat=False)
    upstream = host_resolver()
    if gateway_spec.dns_upstream:
        host, _, port = gateway_spec.dns_upstream.rpartition(":")
        upstream = (host, int(port))
    aliases = {IPv4Address(guest): host for guest, host in gateway_spec.host_aliases}
    gateway = Router.for_subnet(
        spec.subnet,
        mtu=spec.mtu,
        aliases=aliases,
        dns_upstream=upstream,
        policy=gateway_spec.policy,
        gateway_host=gateway_spec.host,
        nat=gateway_spec.nat,
    )
    switch = Switch(gateway, routed=spec.gateway is not None)
    gateway.emit = switch.deliver
    if gateway.nat:
        gateway.icmp = IcmpRelay(gateway.icmp_reply)
    control = asyncio.get_running_loop().create_task(
        serve_requests(Controller(switch).handle, switch.done)
    )
    # Ports are bound later, in a run directory its owner gave this identity.
    say_ready(identity)
    try:
        await switch.done.wait()
    finally:
        control.cancel()
        switch.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="capsa userspace network stack")
    parser.add_argument("--spec", required=True, help="the NetworkSpec as JSON")
    parser.add_argument("--identity", default=None, help="uid:gid:groups:caps to run as")
    args = parser.parse_args(argv)
    spec = NetworkSpec.from_json(json.loads(args.spec))
    return run_helper(serve(spec, args.identity), level=logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
