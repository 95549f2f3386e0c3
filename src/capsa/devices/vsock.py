"""virtio-vsock (virtio 1.x, section 5.10) over vhost-user, bridged to host Unix sockets.

Host programs are always clients of a Unix socket per port:
- listen mode: the guest connects to CID 2:port; each host client is paired with the
  oldest guest connection waiting on that port (it waits if there is none). Data the guest
  sends before a host client attaches is kept, bounded by the credit we advertise.
- connect mode: each host client makes us connect to the guest's port; if nothing
  listens there the client is closed.

Flow control is the protocol's credit scheme, per connection and in both directions: we
never send the guest more than its advertised free buffer space, and we only return
credit for guest data that the host client has actually taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import struct
from collections import deque
from dataclasses import dataclass, field

from capsa.devices.guest_memory import DeviceError
from capsa.devices.vhost_user import PROTOCOL_F_CONFIG, PROTOCOL_F_MQ, PROTOCOL_F_REPLY_ACK, Device
from capsa.devices.virtqueue import VirtQueue

log = logging.getLogger("capsa.vsock")

HDR = struct.Struct("<QQIIIHHIII")
HOST_CID = 2
TYPE_STREAM = 1
BUF_ALLOC = 256 * 1024
MAX_PKT_PAYLOAD = 64 * 1024
RX_BACKLOG_LIMIT = 4 * 1024 * 1024
EPHEMERAL_START = 49152
MAX_CONNECTIONS = 1024


class Op(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


SHUT_RCV = 1
SHUT_SEND = 2


@dataclass
class Packet:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    op: int
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0
    payload: bytes = b""
    type: int = TYPE_STREAM

    def encode(self) -> bytes:
        return HDR.pack(
            self.src_cid, self.dst_cid, self.src_port, self.dst_port, len(self.payload),
            self.type, self.op, self.flags, self.buf_alloc, self.fwd_cnt,
        ) + self.payload  # fmt: skip

    @classmethod
    def decode(cls, data: bytes) -> Packet:
        if len(data) < HDR.size:
            raise DeviceError(f"vsock packet of {len(data)} bytes is shorter than its header")
        src, dst, sport, dport, length, typ, op, flags, buf_alloc, fwd = HDR.unpack_from(data)
        if length > len(data) - HDR.size or length > MAX_PKT_PAYLOAD:
            raise DeviceError(f"vsock packet claims {length} payload bytes")
        payload = data[HDR.size : HDR.size + length]
        return cls(src, dst, sport, dport, op, flags, buf_alloc, fwd, payload, typ)


@dataclass
class PortConfig:
    port: int
    connect: bool


@dataclass(eq=False)
class Conn:
    host_port: int
    guest_port: int
    connect_mode: bool
    established: bool = False
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0  # bytes we sent to the guest
    fwd_cnt: int = 0  # guest bytes the host client took
    reported_fwd: int = 0
    to_host: bytearray = field(default_factory=bytearray)
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    task: asyncio.Task[None] | None = None
    drains: set[asyncio.Future[None]] = field(default_factory=set)
    credit: asyncio.Event = field(default_factory=asyncio.Event)
    guest_done_sending: bool = False
    host_done_sending: bool = False
    closed: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return (self.host_port, self.guest_port)

    def peer_credit(self) -> int:
        return self.peer_buf_alloc - (self.tx_cnt - self.peer_fwd_cnt)


class VsockDevice(Device):
    num_queues = 2  # rx, tx (the event queue stays in QEMU)
    protocol_features = PROTOCOL_F_MQ | PROTOCOL_F_REPLY_ACK | PROTOCOL_F_CONFIG

    def __init__(self, guest_cid: int, ports: list[PortConfig]) -> None:
        self.guest_cid = guest_cid
        self.ports = {p.port: p for p in ports}
        self.conns: dict[tuple[int, int], Conn] = {}
        self.waiting_guest: dict[int, deque[Conn]] = {p.port: deque() for p in ports}
        self.waiting_host: dict[int, deque[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {
            p.port: deque() for p in ports
        }
        self.rx_pending: deque[Packet] = deque()
        self.rx_bytes = 0
        self.rx_space = asyncio.Event()
        self.rxq: VirtQueue | None = None
        self.txq: VirtQueue | None = None
        self._next_port = EPHEMERAL_START

    def config(self) -> bytes:
        return struct.pack("<Q", self.guest_cid)

    # -- queues -----------------------------------------------------------------------------

    def started(self, queue: VirtQueue) -> None:
        if queue.index == 0:
            self.rxq = queue
            self.flush_rx()
        elif queue.index == 1:
            self.txq = queue
            self.queue_kicked(queue)

    def queue_kicked(self, queue: VirtQueue) -> None:
        if queue.index == 0:
            self.flush_rx()
            return
        handled = 0
        while (chain := queue.pop()) is not None:
            data = queue.read_chain(chain, HDR.size + MAX_PKT_PAYLOAD)
            queue.push(chain, 0)
            handled += 1
            self.from_guest(Packet.decode(data))
        if handled:
            queue.notify()
        self.flush_rx()

    def send(self, pkt: Packet) -> None:
        self.rx_pending.append(pkt)
        self.rx_bytes += len(pkt.payload)
        self.flush_rx()

    def flush_rx(self) -> None:
        q = self.rxq
        if q is None or not q.ready:
            return
        sent = 0
        try:
            while self.rx_pending and (chain := q.pop()) is not None:
                pkt = self.rx_pending.popleft()
                room = chain.writable_len - HDR.size
                if room < 0:
                    raise DeviceError("rx buffer smaller than a vsock header")
                if len(pkt.payload) > room:
                    # The guest's buffer is smaller than this packet: send the part that fits.
                    rest = Packet(**{**pkt.__dict__, "payload": pkt.payload[room:]})
                    pkt = Packet(**{**pkt.__dict__, "payload": pkt.payload[:room]})
                    self.rx_pending.appendleft(rest)
                self.rx_bytes -= len(pkt.payload)
                q.push(chain, q.write_chain(chain, pkt.encode()))
                sent += 1
        except DeviceError as e:
            q.fail(str(e))
            log.error("rx queue failed: %s", e)
        if sent:
            q.notify()
        if self.rx_bytes < RX_BACKLOG_LIMIT:
            self.rx_space.set()

    def reset(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn, notify_guest=False)
        for port in self.waiting_guest.values():
            port.clear()
        self.rx_pending.clear()
        self.rx_bytes = 0
        self.rxq = self.txq = None

    # -- packets ----------------------------------------------------------------------------

    def _pkt(self, conn: Conn, op: int, payload: bytes = b"", flags: int = 0) -> Packet:
        conn.reported_fwd = conn.fwd_cnt
        return Packet(
            src_cid=HOST_CID,
            dst_cid=self.guest_cid,
            src_port=conn.host_port,
            dst_port=conn.guest_port,
            op=op,
            flags=flags,
            buf_alloc=BUF_ALLOC,
            fwd_cnt=conn.fwd_cnt,
            payload=payload,
        )

    def _rst(self, pkt: Packet) -> None:
        if pkt.op != Op.RST:
            self.send(Packet(HOST_CID, self.guest_cid, pkt.dst_port, pkt.src_port, Op.RST))

    def from_guest(self, pkt: Packet) -> None:
        if pkt.src_cid != self.guest_cid or pkt.dst_cid != HOST_CID or pkt.type != TYPE_STREAM:
            self._rst(pkt)
            return
        conn = self.conns.get((pkt.dst_port, pkt.src_port))
        if conn is None:
            if pkt.op == Op.REQUEST:
                self._guest_connects(pkt)
            else:
                self._rst(pkt)
            return
        conn.peer_buf_alloc, conn.peer_fwd_cnt = pkt.buf_alloc, pkt.fwd_cnt
        conn.credit.set()
        if pkt.op == Op.RESPONSE and conn.connect_mode and not conn.established:
            conn.established = True
            self._start_pumping(conn)
        elif pkt.op == Op.RW:
            self._guest_data(conn, pkt.payload)
        elif pkt.op == Op.CREDIT_REQUEST:
            self.send(self._pkt(conn, Op.CREDIT_UPDATE))
        elif pkt.op == Op.SHUTDOWN:
            if pkt.flags & SHUT_SEND:
                conn.guest_done_sending = True
                self._maybe_half_close(conn)
            if pkt.flags & SHUT_RCV and pkt.flags & SHUT_SEND:
                self._close(conn, notify_guest=True)
        elif pkt.op == Op.RST:
            self._close(conn, notify_guest=False)
        elif pkt.op == Op.REQUEST:
            self._rst(pkt)

    def _guest_connects(self, pkt: Packet) -> None:
        port = self.ports.get(pkt.dst_port)
        if port is None or port.connect or len(self.conns) >= MAX_CONNECTIONS:
            self._rst(pkt)
            return
        conn = Conn(pkt.dst_port, pkt.src_port, connect_mode=False, established=True)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = pkt.buf_alloc, pkt.fwd_cnt
        self.conns[conn.key] = conn
        self.send(self._pkt(conn, Op.RESPONSE))
        waiting = self.waiting_host[port.port]
        while waiting:
            reader, writer = waiting.popleft()
            if not writer.is_closing():
                self._attach(conn, reader, writer)
                return
        self.waiting_guest[port.port].append(conn)

    def _guest_data(self, conn: Conn, data: bytes) -> None:
        if len(conn.to_host) + len(data) > BUF_ALLOC + MAX_PKT_PAYLOAD:
            log.warning("guest overran its vsock credit; resetting %s", conn.key)
            self._close(conn, notify_guest=True)
            return
        conn.to_host += data
        self._forward_to_host(conn)

    def _forward_to_host(self, conn: Conn) -> None:
        if conn.writer is None or not conn.to_host:
            self._maybe_half_close(conn)
            return
        data = bytes(conn.to_host)
        conn.to_host.clear()
        try:
            conn.writer.write(data)
        except (ConnectionError, RuntimeError):
            self._close(conn, notify_guest=True)
            return
        drain = asyncio.ensure_future(self._credit_after_drain(conn, len(data)))
        conn.drains.add(drain)
        drain.add_done_callback(conn.drains.discard)
        self._maybe_half_close(conn)

    async def _credit_after_drain(self, conn: Conn, n: int) -> None:
        assert conn.writer is not None
        try:
            await conn.writer.drain()
        except (ConnectionError, RuntimeError):
            self._close(conn, notify_guest=True)
            return
        conn.fwd_cnt += n
        if not conn.closed and conn.fwd_cnt - conn.reported_fwd >= BUF_ALLOC // 4:
            self.send(self._pkt(conn, Op.CREDIT_UPDATE))

    def _maybe_half_close(self, conn: Conn) -> None:
        if conn.guest_done_sending and not conn.to_host and conn.writer is not None:
            with contextlib.suppress(OSError, RuntimeError):
                if conn.writer.can_write_eof():
                    conn.writer.write_eof()
            if conn.host_done_sending:
                self._close(conn, notify_guest=True)

    # -- host side --------------------------------------------------------------------------

    def host_client(
        self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        cfg = self.ports[port]
        if cfg.connect:
            self._host_connects(cfg, reader, writer)
            return
        pending = self.waiting_guest[port]
        while pending:
            conn = pending.popleft()
            if not conn.closed:
                self._attach(conn, reader, writer)
                return
        self.waiting_host[port].append((reader, writer))

    def _host_connects(
        self, cfg: PortConfig, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self.rxq is None or len(self.conns) >= MAX_CONNECTIONS:
            writer.close()  # no guest driver yet: the client may retry
            return
        host_port = self._ephemeral_port(cfg.port)
        conn = Conn(host_port, cfg.port, connect_mode=True, writer=writer, reader=reader)
        self.conns[conn.key] = conn
        self.send(self._pkt(conn, Op.REQUEST))

    def _ephemeral_port(self, guest_port: int) -> int:
        for _ in range(65536):
            port = self._next_port
            self._next_port = EPHEMERAL_START if port >= 0xFFFFFFFE else port + 1
            if (port, guest_port) not in self.conns and port not in self.ports:
                return port
        raise DeviceError("no free vsock ports")

    def _attach(
        self, conn: Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn.reader, conn.writer = reader, writer
        self._forward_to_host(conn)  # what the guest sent before we were paired
        self._start_pumping(conn)

    def _start_pumping(self, conn: Conn) -> None:
        conn.task = asyncio.ensure_future(self._pump_host_to_guest(conn))

    async def _pump_host_to_guest(self, conn: Conn) -> None:
        assert conn.reader is not None
        try:
            while not conn.closed:
                while conn.peer_credit() <= 0 and not conn.closed:
                    conn.credit.clear()
                    self.send(self._pkt(conn, Op.CREDIT_REQUEST))
                    await conn.credit.wait()
                while self.rx_bytes >= RX_BACKLOG_LIMIT:
                    self.rx_space.clear()
                    await self.rx_space.wait()
                data = await conn.reader.read(min(conn.peer_credit(), MAX_PKT_PAYLOAD))
                if conn.closed:
                    return
                if not data:
                    conn.host_done_sending = True
                    self.send(self._pkt(conn, Op.SHUTDOWN, flags=SHUT_SEND))
                    if conn.guest_done_sending:
                        self._close(conn, notify_guest=True)
                    return
                conn.tx_cnt += len(data)
                self.send(self._pkt(conn, Op.RW, data))
        except (ConnectionError, OSError):
            self._close(conn, notify_guest=True)

    def _close(self, conn: Conn, notify_guest: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        conn.credit.set()
        self.conns.pop(conn.key, None)
        if notify_guest:
            self.send(self._pkt(conn, Op.RST))
        if conn.writer is not None:
            conn.writer.close()
        if conn.task is not None and conn.task is not asyncio.current_task():
            conn.task.cancel()
