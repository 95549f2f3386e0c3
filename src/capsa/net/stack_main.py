"""The network stack as a helper process: a virtual switch, its gateway, and QEMU ports.

    python -m capsa.net.stack_main --subnet 10.0.2.0/24 [--no-nat] [--no-gateway] ...

Each VM gets its own switch port: a Unix socket the stack listens on before QEMU starts
(QEMU's ``-netdev stream`` does not reconnect), bound to the MAC address QEMU was given,
so a guest cannot send with another VM's address. Framing (QEMU 7.2): every Ethernet
frame is preceded by its length as a 4-byte big-endian integer, in both directions.

The owner drives the process through JSON lines on stdin (``{"id", "op", ...}``) and reads
one JSON line per request on stdout; EOF on stdin (the owner went away) ends the process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from capsa._util.reaper import REAPER
from capsa.config import PortForward
from capsa.errors import CapsaError, InvalidConfig, StartFailed
from capsa.net.dns import host_resolver
from capsa.net.gateway import BROADCAST_MAC, Gateway
from capsa.net.icmp import IcmpRelay
from capsa.net.policy import NetworkPolicy, Protocol

READY = b"READY\n"
LENGTH = struct.Struct("!I")
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

    gateway: Gateway
    routed: bool = True  # False: a bare switch, the gateway never sees a frame
    ports: dict[bytes, Port] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def from_port(self, port: Port, frame: bytes) -> None:
        if len(frame) < 14 or frame[6:12] != port.mac:
            return  # runt, or a spoofed source address
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

        class Protocol(asyncio.DatagramProtocol):
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
        transport, _ = await loop.create_datagram_endpoint(Protocol, sock=sock)
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
                self.gateway.dhcp.reserved[mac] = IPv4Address(request["ip"])
            return {}
        if op == "remove_port":
            mac = bytes.fromhex(request["mac"])
            self.switch.remove_port(mac)
            self.gateway.dhcp.reserved.pop(mac, None)
            self.gateway.dhcp.leases.pop(mac, None)
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
                Protocol(request["protocol"]), request["host_addr"], int(request["host_port"])
            )
            return {}
        if op == "stats":
            g = self.gateway
            return {"tcp": len(g.tcp), "udp": len(g.udp_flows), "denied": g.denied,
                    "dropped": g.dropped, "malformed": g.malformed,
                    "leases": {m.hex(): str(ip) for m, ip in g.dhcp.leases.items()}}  # fmt: skip
        raise ValueError(f"unknown request {op!r}")


async def serve_control(controller: Controller, done: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while not done.is_set():
        line = await reader.readline()
        if not line:
            break  # the owner is gone
        try:
            request = json.loads(line)
            reply = {"ok": True, **await controller.handle(request)}
        except (ValueError, KeyError, TypeError, OSError, CapsaError) as e:
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            request = request if isinstance(request, dict) else {}
        reply["id"] = request.get("id") if isinstance(request, dict) else None
        os.write(sys.stdout.fileno(), json.dumps(reply).encode() + b"\n")
    done.set()


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    policy = NetworkPolicy.from_json(json.loads(args.policy)) if args.policy else None
    aliases = {IPv4Address(g): h for g, _, h in (a.partition("=") for a in args.alias)}
    upstream = host_resolver()
    if args.dns:
        host, _, port = args.dns.rpartition(":")
        upstream = (host, int(port))
    gateway = Gateway.for_subnet(
        args.subnet, mtu=args.mtu, aliases=aliases, dns_upstream=upstream, policy=policy,
        gateway_host=args.gateway_host, nat=not args.no_nat,
    )  # fmt: skip
    switch = Switch(gateway, routed=not args.no_gateway)
    gateway.emit = switch.deliver
    if gateway.nat:
        gateway.icmp = IcmpRelay(gateway.icmp_reply)
    loop.add_signal_handler(signal.SIGTERM, switch.done.set)
    control = loop.create_task(serve_control(Controller(switch), switch.done))
    os.write(sys.stdout.fileno(), READY)
    try:
        await switch.done.wait()
    finally:
        control.cancel()
        switch.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="capsa userspace network stack")
    parser.add_argument("--subnet", default="10.0.2.0/24")
    parser.add_argument("--gateway-host", type=int, default=2, help="gateway = network + N")
    parser.add_argument("--mtu", type=int, default=65520)
    parser.add_argument("--alias", action="append", default=[], help="GUEST_IP=HOST_IP")
    parser.add_argument("--dns", default=None, help="upstream resolver HOST:PORT")
    parser.add_argument("--policy", default=None, help="NetworkPolicy as JSON")
    parser.add_argument("--no-gateway", action="store_true", help="a bare switch")
    parser.add_argument("--no-nat", action="store_true", help="no traffic to the outside")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    asyncio.run(serve(args))
    return 0


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record, so the owner can re-emit it with its structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in vars(record).items() if k.startswith("capsa_")}
        return json.dumps({"name": record.name, "level": record.levelno,
                           "msg": record.getMessage(), "extra": extra}, default=str)  # fmt: skip


def relog(line: bytes) -> None:
    """Re-emit a record from the stack process in the owner's logging, fields intact."""
    try:
        data = json.loads(line)
        name, level, msg, extra = data["name"], int(data["level"]), data["msg"], data["extra"]
    except (ValueError, KeyError, TypeError):
        log.debug("network stack: %s", line.decode(errors="replace").rstrip())
        return
    logging.getLogger(str(name)).log(level, "%s", msg, extra=dict(extra))


class StackProcess:
    """The owner's end of a running stack: requests, and stopping it."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self._lock = asyncio.Lock()
        self._next_id = 0
        self.stderr_tail: list[str] = []
        self._logs = asyncio.get_running_loop().create_task(self._pump_logs())

    async def _pump_logs(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.stderr_tail = [*self.stderr_tail[-19:], line.decode(errors="replace")]
            relog(line)

    async def request(self, op: str, **fields: object) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        async with self._lock:
            if self.proc.returncode is not None:
                raise StartFailed("the network stack is not running")
            self._next_id += 1
            line = json.dumps({"id": self._next_id, "op": op, **fields}).encode() + b"\n"
            self.proc.stdin.write(line)
            await self.proc.stdin.drain()
            raw = await asyncio.wait_for(self.proc.stdout.readline(), 15)
        if not raw:
            raise StartFailed("the network stack exited")
        reply: dict[str, Any] = json.loads(raw)
        if not reply.get("ok"):
            raise InvalidConfig(f"network {op}: {reply.get('error')}")
        return reply

    async def add_port(
        self, path: Path, mac: str, ip: str | None = None, datagram: bool = False
    ) -> None:
        await self.request("add_port", path=str(path), mac=mac.replace(":", ""), ip=ip,
                           datagram=datagram)  # fmt: skip

    async def remove_port(self, mac: str) -> int:
        reply = await self.request("remove_port", mac=mac.replace(":", ""))
        return int(reply["ports"])

    async def set_policy(self, policy: NetworkPolicy | None) -> None:
        await self.request("set_policy", policy=policy.to_json() if policy else None)

    async def add_forward(self, forward: PortForward) -> int:
        return int((await self.request("add_forward", forward=forward.to_json()))["host_port"])

    async def remove_forward(self, protocol: Protocol, host_port: int, host_addr: str) -> None:
        await self.request("remove_forward", protocol=protocol.value, host_addr=host_addr,
                           host_port=host_port)  # fmt: skip

    async def stats(self) -> dict[str, Any]:
        return await self.request("stats")

    async def stop(self) -> None:
        if self.proc.returncode is None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(self._logs, 2)
        REAPER.unwatch_pid(self.proc.pid)


async def start_stack(
    subnet: str,
    mtu: int,
    aliases: Sequence[tuple[str, str]] = (),
    dns_upstream: str | None = None,
    policy: NetworkPolicy | None = None,
    *,
    nat: bool = True,
    gateway_host: int = 2,
    gateway: bool = True,
) -> StackProcess:
    args = [arg for g, h in aliases for arg in ("--alias", f"{g}={h}")]
    if dns_upstream:
        args += ["--dns", dns_upstream]
    if policy is not None:
        args += ["--policy", json.dumps(policy.to_json())]
    if not gateway:
        args.append("--no-gateway")
    if not nat:
        args.append("--no-nat")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "capsa.net.stack_main", "--subnet", subnet, "--mtu", str(mtu),
        "--gateway-host", str(gateway_host), *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    REAPER.watch_pid(proc.pid)
    stack = StackProcess(proc)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
    except TimeoutError:
        line = b""
    if line != READY:
        await stack.stop()
        err = "".join(stack.stderr_tail).strip()
        raise StartFailed(f"network stack failed to start: {err or 'no READY'}")
    return stack


if __name__ == "__main__":
    sys.exit(main())
