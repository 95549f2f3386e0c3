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

The guest is hostile, so everything the helper holds for it is bounded per VM (the helper
serves one VM): guest data by the credit we advertise (a guest that sends more is reset),
connections by MAX_CONNECTIONS, host-to-guest data by RX_BACKLOG_LIMIT, and control replies
by MAX_PENDING_REPLIES (past it we stop taking the guest's tx queue until it reads rx).
A connection's memory is freed as soon as it is reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import struct
from collections import deque
from dataclasses import dataclass, field

from capsa.devices.guest_memory import DeviceError
from capsa.devices.vhost_user import PROTOCOL_F_CONFIG, PROTOCOL_F_MQ, PROTOCOL_F_REPLY_ACK, Device
from capsa.devices.virtqueue import VirtQueue

log = logging.getLogger("capsa.devices")

HDR = struct.Struct("<QQIIIHHIII")
HOST_CID = 2
TYPE_STREAM = 1
# The receive buffer we advertise per connection: Linux's default vsock buffer size, enough
# for full-speed transfers. It is also the most guest data we ever hold for one connection.
BUF_ALLOC = 256 * 1024
MAX_PKT_PAYLOAD = 64 * 1024
# Host-to-guest bytes queued for the rx queue, all connections together, before the pumps
# wait for the guest to take some: dozens of full packets, enough to keep a guest busy.
RX_BACKLOG_LIMIT = 4 * 1024 * 1024
# What a queued packet costs beyond its payload (its Python objects measure about 250
# bytes). Counted in the backlog so a flood of tiny packets is bounded like a few big ones.
QUEUED_PACKET_OVERHEAD = 512
# Control packets (RESPONSE, RST, CREDIT_*, SHUTDOWN) waiting for rx buffers. At this many
# we stop taking the guest's tx queue until it reads its rx queue, as Linux's vhost-vsock
# does; an honest driver refills rx at once, so only a guest that never reads waits.
MAX_PENDING_REPLIES = 256
EPHEMERAL_START = 49152
# Live connections per VM. Each may hold BUF_ALLOC of guest data that no host client has
# taken yet (listen mode before a client attaches, or a client that does not read), so this
# caps that at 64 MiB per VM; sandboxes use a handful of connections.
MAX_CONNECTIONS = 256
# tx_cnt, fwd_cnt and the like are u32 on the wire and wrap (virtio 1.2, 5.10.6.3).
COUNTER_MASK = 0xFFFF_FFFF


def counter_diff(later: int, earlier: int) -> int:
    """``later - earlier`` for wrapping u32 counters."""
    return (later - earlier) & COUNTER_MASK


def counter_add(counter: int, n: int) -> int:
    return (counter + n) & COUNTER_MASK


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
    # Byte counters, all modulo 2**32 like their wire fields.
    tx_cnt: int = 0  # bytes we sent to the guest
    rx_cnt: int = 0  # bytes the guest sent us
    fwd_cnt: int = 0  # guest bytes the host client took
    reported_fwd: int = 0  # the fwd_cnt the guest last saw
    to_host: bytearray = field(default_factory=bytearray)  # until a host client attaches
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    task: asyncio.Task[None] | None = None
    drainer: asyncio.Task[None] | None = None
    credit: asyncio.Event = field(default_factory=asyncio.Event)
    queued_credit_ops: set[int] = field(default_factory=set)  # at most one of each waits
    guest_done_sending: bool = False
    host_done_sending: bool = False
    closed: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return (self.host_port, self.guest_port)

    def peer_credit(self) -> int:
        return self.peer_buf_alloc - counter_diff(self.tx_cnt, self.peer_fwd_cnt)

    def guest_bytes_held(self) -> int:
        """Guest bytes we hold or handed to the host client without it having taken them."""
        return counter_diff(self.rx_cnt, self.fwd_cnt)

    def credit_given(self) -> int:
        """How many more bytes the guest may send us."""
        return BUF_ALLOC - self.guest_bytes_held()


@dataclass
class Outgoing:
    """A packet waiting for an rx buffer; a connection's credit fields are filled when sent."""

    pkt: Packet
    conn: Conn | None

    @property
    def cost(self) -> int:
        return len(self.pkt.payload) + QUEUED_PACKET_OVERHEAD

    @property
    def is_control(self) -> bool:
        return self.pkt.op != Op.RW


@dataclass
class Refusals:
    """What this VM's guest did that we refused, counted."""

    credit_overruns: int = 0
    connections_over_cap: int = 0


def warn_sometimes(count: int, msg: str, *args: object) -> None:
    """Log the 1st, 2nd, 4th, 8th... time: a hostile guest must not flood the owner's log."""
    if count & (count - 1) == 0:
        log.warning(msg + " (%d times so far)", *args, count)


class VsockDevice(Device):
    num_queues = 2  # rx, tx (the event queue stays in QEMU)
    protocol_features = PROTOCOL_F_MQ | PROTOCOL_F_REPLY_ACK | PROTOCOL_F_CONFIG

    def __init__(self, guest_cid: int, ports: list[PortConfig]) -> None:
        self.guest_cid = guest_cid
        self.ports = {p.port: p for p in ports}
        self.conns: dict[tuple[int, int], Conn] = {}
        # Insertion-ordered, so the oldest waits first and a reset one leaves at once.
        self.waiting_guest: dict[int, dict[tuple[int, int], Conn]] = {p.port: {} for p in ports}
        self.waiting_host: dict[int, deque[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {
            p.port: deque() for p in ports
        }
        self.rx_pending: deque[Outgoing] = deque()
        self.rx_bytes = 0  # the cost of rx_pending
        self.replies_pending = 0  # control packets in rx_pending
        self.rx_space = asyncio.Event()
        self.rxq: VirtQueue | None = None
        self.txq: VirtQueue | None = None
        self.tx_waiting = False  # the tx queue may hold chains we have not taken
        self._taking_tx = False
        self.refusals = Refusals()
        self._next_port = EPHEMERAL_START

    def config(self) -> bytes:
        return struct.pack("<Q", self.guest_cid)

    # -- queues -----------------------------------------------------------------------------

    def started(self, queue: VirtQueue) -> None:
        if queue.index == 0:
            self.rxq = queue
        elif queue.index == 1:
            self.txq = queue
            self.tx_waiting = True
        self.flush_rx()

    def queue_kicked(self, queue: VirtQueue) -> None:
        if queue.index == 1:
            self.tx_waiting = True
        self.flush_rx()

    def _take_tx(self) -> None:
        """Handle the guest's packets until its queue is empty or too many replies wait."""
        q = self.txq
        if q is None or not q.ready:
            self.tx_waiting = False
            return
        self._taking_tx = True
        handled = 0
        try:
            while not self._too_many_replies():
                chain = q.pop()
                if chain is None:
                    self.tx_waiting = False
                    break
                data = q.read_chain(chain, HDR.size + MAX_PKT_PAYLOAD)
                q.push(chain, 0)
                handled += 1
                self.from_guest(Packet.decode(data))
        except DeviceError as e:
            q.fail(str(e))
            self.tx_waiting = False
            log.error("tx queue failed: %s", e)
        finally:
            self._taking_tx = False
        if handled:
            q.notify()

    def _too_many_replies(self) -> bool:
        return self.replies_pending >= MAX_PENDING_REPLIES

    def send(self, pkt: Packet, conn: Conn | None = None) -> None:
        self._enqueue(Outgoing(pkt, conn))
        self.flush_rx()

    def _enqueue(self, out: Outgoing, front: bool = False) -> None:
        if front:
            self.rx_pending.appendleft(out)
        else:
            self.rx_pending.append(out)
        self.rx_bytes += out.cost
        self.replies_pending += out.is_control

    def _dequeue(self) -> Outgoing:
        out = self.rx_pending.popleft()
        self.rx_bytes -= out.cost
        self.replies_pending -= out.is_control
        return out

    def flush_rx(self) -> None:
        """Fill the guest's rx buffers, then take tx again if we stopped for want of room."""
        self._fill_rx_buffers()
        # A loop, not recursion: handling tx queues replies, which flush_rx again.
        while self.tx_waiting and not self._taking_tx and not self._too_many_replies():
            self._take_tx()
            self._fill_rx_buffers()

    def _fill_rx_buffers(self) -> None:
        q = self.rxq
        if q is None or not q.ready:
            return
        sent = 0
        try:
            while self.rx_pending and (chain := q.pop()) is not None:
                q.push(chain, q.write_chain(chain, self._next_packet(chain.writable_len)))
                sent += 1
        except DeviceError as e:
            q.fail(str(e))
            log.error("rx queue failed: %s", e)
        if sent:
            q.notify()
        if self.rx_bytes < RX_BACKLOG_LIMIT:
            self.rx_space.set()

    def _next_packet(self, buffer_len: int) -> bytes:
        room = buffer_len - HDR.size
        if room < 0:
            raise DeviceError("rx buffer smaller than a vsock header")
        out = self._dequeue()
        pkt = out.pkt
        if len(pkt.payload) > room:
            # The guest's buffer is smaller than this packet: send the part that fits.
            rest = dataclasses.replace(pkt, payload=pkt.payload[room:])
            pkt = dataclasses.replace(pkt, payload=pkt.payload[:room])
            self._enqueue(Outgoing(rest, out.conn), front=True)
        if out.conn is not None:
            self._stamp_credit(pkt, out.conn)
        return pkt.encode()

    def _stamp_credit(self, pkt: Packet, conn: Conn) -> None:
        # Filled in as late as possible: the guest learns the newest fwd_cnt.
        pkt.buf_alloc, pkt.fwd_cnt = BUF_ALLOC, conn.fwd_cnt
        conn.reported_fwd = conn.fwd_cnt
        conn.queued_credit_ops.discard(pkt.op)

    def _forget_queued(self, conn: Conn) -> None:
        """Drop what still waits for the guest on ``conn``: it will never read it."""
        conn.queued_credit_ops.clear()
        if not any(out.conn is conn for out in self.rx_pending):
            return
        kept = [out for out in self.rx_pending if out.conn is not conn]
        self.rx_pending.clear()
        self.rx_bytes = self.replies_pending = 0
        for out in kept:
            self._enqueue(out)

    def reset(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn, notify_guest=False)
        for port in self.waiting_guest.values():
            port.clear()
        self.rx_pending.clear()
        self.rx_bytes = self.replies_pending = 0
        self.tx_waiting = False
        self.rxq = self.txq = None

    # -- packets ----------------------------------------------------------------------------

    def _pkt(self, conn: Conn, op: int, payload: bytes = b"", flags: int = 0) -> Packet:
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

    def _send_on(self, conn: Conn, op: int, payload: bytes = b"", flags: int = 0) -> None:
        self.send(self._pkt(conn, op, payload, flags), conn)

    def _send_credit_op(self, conn: Conn, op: int) -> None:
        """CREDIT_UPDATE / CREDIT_REQUEST, coalesced: one waiting says all a second would."""
        if op not in conn.queued_credit_ops:
            conn.queued_credit_ops.add(op)
            self._send_on(conn, op)

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
            self._send_credit_op(conn, Op.CREDIT_UPDATE)
        elif pkt.op == Op.SHUTDOWN:
            self._guest_shuts_down(conn, pkt.flags)
        elif pkt.op == Op.RST:
            self._abort(conn, notify_guest=False)
        elif pkt.op == Op.REQUEST:
            self._abort(conn, notify_guest=True)  # a second REQUEST on a live connection

    def _guest_shuts_down(self, conn: Conn, flags: int) -> None:
        if flags & SHUT_SEND:
            conn.guest_done_sending = True
            self._maybe_half_close(conn)
        if flags & SHUT_RCV and flags & SHUT_SEND and not conn.closed:
            self._forget_queued(conn)  # the guest reads no more; the host still gets its data
            self._close(conn, notify_guest=True)

    def _guest_connects(self, pkt: Packet) -> None:
        port = self.ports.get(pkt.dst_port)
        if port is None or port.connect:
            self._rst(pkt)
            return
        if len(self.conns) >= MAX_CONNECTIONS:
            self.refusals.connections_over_cap += 1
            warn_sometimes(
                self.refusals.connections_over_cap,
                "guest asked for more than %d live vsock connections; refusing the extra ones",
                MAX_CONNECTIONS,
            )
            self._rst(pkt)
            return
        conn = Conn(pkt.dst_port, pkt.src_port, connect_mode=False, established=True)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = pkt.buf_alloc, pkt.fwd_cnt
        self.conns[conn.key] = conn
        self._send_on(conn, Op.RESPONSE)
        waiting = self.waiting_host[port.port]
        while waiting:
            reader, writer = waiting.popleft()
            if not writer.is_closing():
                self._attach(conn, reader, writer)
                return
        self.waiting_guest[port.port][conn.key] = conn

    def _guest_data(self, conn: Conn, data: bytes) -> None:
        if not data:
            return
        if len(data) > conn.credit_given():
            self._guest_overran_credit(conn, len(data))
            return
        conn.rx_cnt = counter_add(conn.rx_cnt, len(data))
        if conn.writer is None:
            conn.to_host += data
        else:
            self._write_to_host(conn, data)

    def _guest_overran_credit(self, conn: Conn, sent: int) -> None:
        # The spec lets us reset a connection whose peer ignores flow control.
        self.refusals.credit_overruns += 1
        warn_sometimes(
            self.refusals.credit_overruns,
            "guest sent %d vsock bytes on %s with %d of credit; resetting it",
            sent,
            conn.key,
            conn.credit_given(),
        )
        self._abort(conn, notify_guest=True)

    def _write_to_host(self, conn: Conn, data: bytes) -> None:
        assert conn.writer is not None
        try:
            conn.writer.write(data)
        except (ConnectionError, RuntimeError):
            self._close(conn, notify_guest=True)
            return
        if conn.drainer is None:
            conn.drainer = asyncio.ensure_future(self._credit_as_host_takes(conn))

    async def _credit_as_host_takes(self, conn: Conn) -> None:
        """Return credit for what the host client took: one task per connection at most."""
        writer = conn.writer
        assert writer is not None
        try:
            while not conn.closed and (n := conn.guest_bytes_held() - len(conn.to_host)) > 0:
                # The writer has no high-water mark (see _hold_host_side): once drain()
                # returns, every byte written before it has left our buffer.
                await writer.drain()
                self._host_took(conn, n)
        except (ConnectionError, RuntimeError):
            self._close(conn, notify_guest=True)
        finally:
            conn.drainer = None

    def _host_took(self, conn: Conn, n: int) -> None:
        conn.fwd_cnt = counter_add(conn.fwd_cnt, n)
        if not conn.closed and counter_diff(conn.fwd_cnt, conn.reported_fwd) >= BUF_ALLOC // 4:
            self._send_credit_op(conn, Op.CREDIT_UPDATE)

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
        if pending:
            conn = pending.pop(next(iter(pending)))
            self._attach(conn, reader, writer)
            return
        self.waiting_host[port].append((reader, writer))

    def _host_connects(
        self, cfg: PortConfig, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self.rxq is None or len(self.conns) >= MAX_CONNECTIONS:
            writer.close()  # no guest driver yet, or no room: the client may retry
            return
        host_port = self._ephemeral_port(cfg.port)
        conn = Conn(host_port, cfg.port, connect_mode=True)
        self._hold_host_side(conn, reader, writer)
        self.conns[conn.key] = conn
        self._send_on(conn, Op.REQUEST)

    def _ephemeral_port(self, guest_port: int) -> int:
        for _ in range(65536):
            port = self._next_port
            self._next_port = EPHEMERAL_START if port >= 0xFFFFFFFE else port + 1
            if (port, guest_port) not in self.conns and port not in self.ports:
                return port
        raise DeviceError("no free vsock ports")

    def _hold_host_side(
        self, conn: Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn.reader, conn.writer = reader, writer
        # Without a high-water mark drain() waits until our buffer is empty, so the credit
        # we return is for bytes that left the helper: it never holds more than BUF_ALLOC
        # of a connection's guest data, however slowly the host client reads.
        writer.transport.set_write_buffer_limits(high=0)

    def _attach(
        self, conn: Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._hold_host_side(conn, reader, writer)
        if conn.to_host:  # what the guest sent before we were paired
            early, conn.to_host = bytes(conn.to_host), bytearray()
            self._write_to_host(conn, early)
        self._maybe_half_close(conn)
        if not conn.closed:
            self._start_pumping(conn)

    def _start_pumping(self, conn: Conn) -> None:
        conn.task = asyncio.ensure_future(self._pump_host_to_guest(conn))

    async def _pump_host_to_guest(self, conn: Conn) -> None:
        assert conn.reader is not None
        try:
            while not conn.closed:
                if conn.peer_credit() <= 0:
                    conn.credit.clear()
                    self._send_credit_op(conn, Op.CREDIT_REQUEST)
                    await conn.credit.wait()
                    continue
                if self.rx_bytes >= RX_BACKLOG_LIMIT:
                    self.rx_space.clear()
                    await self.rx_space.wait()
                    continue  # the guest may have shrunk its credit meanwhile
                data = await conn.reader.read(min(conn.peer_credit(), MAX_PKT_PAYLOAD))
                if conn.closed:
                    return
                if not data:
                    self._host_done_sending(conn)
                    return
                conn.tx_cnt = counter_add(conn.tx_cnt, len(data))
                self._send_on(conn, Op.RW, data)
        except (ConnectionError, OSError):
            self._close(conn, notify_guest=True)

    def _host_done_sending(self, conn: Conn) -> None:
        conn.host_done_sending = True
        self._send_on(conn, Op.SHUTDOWN, flags=SHUT_SEND)
        if conn.guest_done_sending:
            self._close(conn, notify_guest=True)

    def _abort(self, conn: Conn, notify_guest: bool) -> None:
        """Reset ``conn``: whatever it still has queued, either way, is dropped at once."""
        self._forget_queued(conn)
        if conn.writer is not None:
            conn.writer.transport.abort()
        self._close(conn, notify_guest)

    def _close(self, conn: Conn, notify_guest: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        conn.credit.set()
        self.conns.pop(conn.key, None)
        self.waiting_guest.get(conn.host_port, {}).pop(conn.key, None)
        conn.to_host = bytearray()  # no host client will take it now
        if notify_guest:
            self._send_on(conn, Op.RST)
        if conn.writer is not None:
            conn.writer.close()  # after what it holds for the host client is written
        for task in (conn.task, conn.drainer):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
