"""ICMP echo to the outside, relayed through host sockets.

Unprivileged ping sockets (``SOCK_DGRAM``/``IPPROTO_ICMP``, allowed by
``net.ipv4.ping_group_range``) are preferred: one per guest flow, the kernel picks the
identifier. Without them, a raw socket works when the process may open one (root or
CAP_NET_RAW): one socket, our own identifiers. With neither, only the gateway answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import struct
import time
from collections.abc import Callable
from ipaddress import IPv4Address

from capsa.net.frames import FrameError, IcmpEcho, IPv4

log = logging.getLogger("capsa.net")
IDLE_SECONDS = 30.0
MAX_FLOWS = 64
# One guest's share of those (a ping per identifier): a few pings at once is plenty, and
# the other guests keep most of the sockets.
MAX_FLOWS_PER_GUEST = 8

FlowKey = tuple[IPv4Address, int, IPv4Address]  # guest, guest's identifier, destination


class IcmpMode(enum.Enum):
    PING = "ping"
    RAW = "raw"
    NONE = "none"


def available_mode() -> IcmpMode:
    for mode, kind in ((IcmpMode.PING, socket.SOCK_DGRAM), (IcmpMode.RAW, socket.SOCK_RAW)):
        try:
            socket.socket(socket.AF_INET, kind, socket.IPPROTO_ICMP).close()
            return mode
        except OSError:
            continue
    return IcmpMode.NONE


class _Flow:
    def __init__(self, key: FlowKey, sock: socket.socket | None, ident: int) -> None:
        self.key, self.sock, self.ident = key, sock, ident
        self.last_used = time.monotonic()


class IcmpRelay:
    def __init__(
        self,
        reply: Callable[[IPv4Address, IPv4Address, IcmpEcho], None],
        mode: IcmpMode | None = None,
    ) -> None:
        self.reply = reply
        self.mode = available_mode() if mode is None else mode
        self.flows: dict[FlowKey, _Flow] = {}
        self.by_ident: dict[int, _Flow] = {}  # raw mode: our identifier -> flow
        self.raw: socket.socket | None = None
        self._next_ident = 1
        self.loop = asyncio.get_running_loop()
        if self.mode is IcmpMode.RAW:
            self.raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            self.raw.setblocking(False)
            self.loop.add_reader(self.raw.fileno(), self._raw_readable)

    def knows(self, guest: IPv4Address, ident: int, dst: IPv4Address) -> bool:
        return (guest, ident, dst) in self.flows

    def send(self, guest: IPv4Address, dst: IPv4Address, target: str, echo: IcmpEcho) -> None:
        if self.mode is IcmpMode.NONE:
            return
        flow = self.flows.get((guest, echo.ident, dst)) or self._open((guest, echo.ident, dst))
        if flow is None:
            return
        flow.last_used = time.monotonic()
        ident = flow.ident if self.mode is IcmpMode.RAW else echo.ident  # kernel rewrites it
        packet = IcmpEcho(8, ident, echo.seq, echo.payload).build()
        sock = flow.sock if flow.sock is not None else self.raw
        assert sock is not None
        with contextlib.suppress(OSError):
            sock.sendto(packet, (target, 0))

    def _open(self, key: FlowKey) -> _Flow | None:
        self._expire()
        mine = sum(1 for guest, _, _ in self.flows if guest == key[0])
        if len(self.flows) >= MAX_FLOWS or mine >= MAX_FLOWS_PER_GUEST:
            return None
        if self.mode is IcmpMode.PING:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
            sock.setblocking(False)
            flow = _Flow(key, sock, 0)
            self.loop.add_reader(sock.fileno(), self._ping_readable, flow)
        else:
            flow = _Flow(key, None, self._allocate_ident())
            self.by_ident[flow.ident] = flow
        self.flows[key] = flow
        return flow

    def _allocate_ident(self) -> int:
        while self._next_ident in self.by_ident:
            self._next_ident = self._next_ident % 0xFFFF + 1
        ident = self._next_ident
        self._next_ident = ident % 0xFFFF + 1
        return ident

    def _ping_readable(self, flow: _Flow) -> None:
        assert flow.sock is not None
        try:
            data = flow.sock.recv(65535)
        except OSError:
            return
        self._deliver(flow, data)

    def _raw_readable(self) -> None:
        assert self.raw is not None
        try:
            packet = self.raw.recv(65535)
            ip = IPv4.parse(packet)
        except (OSError, FrameError):
            return
        if len(ip.payload) < 8 or ip.payload[0] != 0:
            return
        (ident,) = struct.unpack_from("!H", ip.payload, 4)
        flow = self.by_ident.get(ident)
        if flow is not None:
            self._deliver(flow, ip.payload)

    def _deliver(self, flow: _Flow, data: bytes) -> None:
        try:
            echo = IcmpEcho.parse(IPv4(flow.key[2], flow.key[0], 1, data))
        except FrameError:
            return
        if echo.kind != 0:
            return
        flow.last_used = time.monotonic()
        guest, guest_ident, dst = flow.key
        self.reply(guest, dst, IcmpEcho(0, guest_ident, echo.seq, echo.payload))

    def _expire(self) -> None:
        cutoff = time.monotonic() - IDLE_SECONDS
        for key, flow in list(self.flows.items()):
            if flow.last_used < cutoff:
                self._drop(key, flow)

    def _drop(self, key: FlowKey, flow: _Flow) -> None:
        del self.flows[key]
        self.by_ident.pop(flow.ident, None)
        if flow.sock is not None:
            self.loop.remove_reader(flow.sock.fileno())
            flow.sock.close()

    def close(self) -> None:
        for key, flow in list(self.flows.items()):
            self._drop(key, flow)
        if self.raw is not None:
            self.loop.remove_reader(self.raw.fileno())
            self.raw.close()
            self.raw = None
        log.debug("icmp relay closed")
