"""TCP NAT: each guest connection is terminated in the gateway and relayed to a host socket.

The gateway plays the remote peer towards the guest (its sequence numbers, window and
retransmissions) and an ordinary socket client or server towards the host. Sequence
numbers are kept as unbounded integers and wrapped to 32 bits only on the wire.

Flow control is end to end: the window the guest sees shrinks as the host socket's write
buffer fills, and the host socket stops being read while the guest has not acknowledged
enough of what it was sent.

Memory is bounded three ways: each connection holds at most ``RECV_BUFFER`` guest bytes
and ``SEND_BUFFER`` host bytes; all connections of one VM share a :class:`Budget`, and all
VMs of a network share one above those. A connection's window closes, and its host socket
stops being read, when the budget has no room; both reopen when another connection of
the budget drains.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import cast

from capsa.net.frames import TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, Tcp

log = logging.getLogger("capsa.net")

MASK = 0xFFFFFFFF
WSCALE = 7  # our receive window scale: up to 8 MiB advertised
RECV_BUFFER = 4 << 20  # guest bytes we accept ahead of the host socket
SEND_BUFFER = 4 << 20  # host bytes we hold for the guest before pausing the socket
# asyncio reads at most this much from a socket at once (selector transports' max_size):
# a budget with less room than this stops every host socket it pays for being read.
READ_CHUNK = 256 * 1024
INITIAL_RTO = 0.2
MAX_RTO = 30.0
MAX_RETRIES = 12
CONNECT_TIMEOUT = 30.0

Key = tuple[IPv4Address, int, IPv4Address, int]  # guest ip, guest port, remote ip, remote port


class TcpState(enum.Enum):
    CONNECTING = "connecting"  # guest SYN seen; host socket being opened
    SYN_SENT = "syn-sent"  # we opened towards the guest (a port forward)
    SYN_RECEIVED = "syn-received"  # our SYN-ACK sent, waiting for the guest's ACK
    ESTABLISHED = "established"
    CLOSED = "closed"


def unwrap(value: int, base: int) -> int:
    """The unbounded sequence number nearest ``base`` whose low 32 bits are ``value``."""
    delta = (value - base) & MASK
    if delta >= 1 << 31:
        delta -= 1 << 32
    return base + delta


class Budget:
    """Bytes that connections may hold in buffers (guest bytes not yet taken by the host
    socket, host bytes not yet acknowledged by the guest): one per VM, under one per
    network. Connections charge what they hold as it changes; the counts are exact."""

    def __init__(self, limit: int, parent: Budget | None = None) -> None:
        self.limit, self.parent = limit, parent
        self.used = 0
        self.members: set[TcpConnection] = set()
        self.starved: set[TcpConnection] = set()  # told "no room": woken when room returns
        self._wake_pending = False

    def room(self) -> int:
        own = self.limit - self.used
        return own if self.parent is None else min(own, self.parent.room())

    def short(self) -> bool:
        """Too little room for one more socket read."""
        return self.room() < min(READ_CHUNK, self.limit // 4)

    def join(self, conn: TcpConnection) -> None:
        self.members.add(conn)
        if self.parent is not None:
            self.parent.join(conn)

    def leave(self, conn: TcpConnection) -> None:
        self.members.discard(conn)
        self.starved.discard(conn)
        if self.parent is not None:
            self.parent.leave(conn)

    def charge(self, delta: int) -> None:
        self.used += delta
        if self.parent is not None:
            self.parent.charge(delta)
        if delta < 0 and self.starved and not self._wake_pending and self._roomy():
            self._wake_pending = True
            asyncio.get_running_loop().call_soon(self._wake)

    def _roomy(self) -> bool:
        """Room enough to wake the starved (twice what ``short`` wants: no flapping)."""
        return self.room() >= min(2 * READ_CHUNK, self.limit // 2)

    def starve(self, conn: TcpConnection) -> None:
        self.starved.add(conn)
        if self.parent is not None:
            self.parent.starve(conn)

    def squeeze(self) -> None:
        """No room for another read: stop reading every host socket this budget pays for
        (one read each could otherwise overshoot it by a read per connection)."""
        budget: Budget | None = self
        while budget is not None:
            if budget.short():
                for conn in list(budget.members):
                    conn.pause_for_budget()
            budget = budget.parent

    def _wake(self) -> None:
        self._wake_pending = False
        starved, self.starved = self.starved, set()
        for conn in starved:
            conn.budget_freed()


class TcpConnection(asyncio.Protocol):
    """One NATed connection: guest side as a TCP state machine, host side as a transport."""

    def __init__(
        self,
        key: Key,
        guest_mac: bytes,
        send: Callable[[TcpConnection, Tcp], None],
        on_closed: Callable[[TcpConnection], None],
        mss: int,
        budget: Budget | None = None,
    ) -> None:
        self.key, self.guest_mac = key, guest_mac
        self._send, self._on_closed = send, on_closed
        self.budget = budget
        self.charged = 0  # bytes this connection holds, as last charged to its budget
        if budget is not None:
            budget.join(self)
        self.state = TcpState.CONNECTING
        self.our_mss = mss
        self.peer_mss = 536
        self.peer_wscale: int | None = None
        self.iss = random.getrandbits(32)
        self.snd_una = self.snd_nxt = self.snd_max = self.iss
        self.snd_wnd = 0
        self.rcv_nxt = 0
        self.send_buffer = bytearray()  # host bytes from snd_una (after the SYN) onwards
        self.host_eof = False  # the host closed its side: FIN follows the buffered data
        self.fin_sent = False
        self.guest_fin = False
        self.transport: asyncio.Transport | None = None
        self.pending: bytearray | None = None  # guest bytes held until the host is ready
        self.pending_fin = False
        self.hold_limit: int | None = None  # while held for inspection: at most this many
        self.reading_paused = False
        self.rto = INITIAL_RTO
        self.retries = 0
        self.dup_acks = 0
        self.timer: asyncio.TimerHandle | None = None
        self.counters = {"in": 0, "out": 0, "holes": 0, "old": 0, "trimmed": 0, "rexmit": 0}
        # Hooks for the gateway: a forwarded host client arrived; guest bytes are held
        # (called with the bytes just added).
        self.on_connected: Callable[[TcpConnection], None] | None = None
        self.on_pending: Callable[[TcpConnection, bytes], None] | None = None

    # -- the host side (asyncio.Protocol) ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # Told of every full drain (resume_writing), so what the budget is charged for the
        # socket's write buffer never stays stale.
        self.transport.set_write_buffer_limits(high=0)
        if self.on_connected is not None:
            self.on_connected(self)

    def data_received(self, data: bytes) -> None:
        self.send_buffer += data
        self._recharge()
        if len(self.send_buffer) >= SEND_BUFFER and self.transport is not None:
            self.transport.pause_reading()
            self.reading_paused = True
        elif self.budget is not None and self.budget.short():
            self.budget.squeeze()
        self.push()

    def eof_received(self) -> bool:
        self.host_eof = True
        self.push()
        return True  # keep our writing side open: the guest may still be sending

    def connection_lost(self, exc: Exception | None) -> None:
        # Our own close() happens in CLOSED; anything else is the host giving up.
        self.transport = None
        if self.state is not TcpState.CLOSED:
            self.reset()
        self._release()

    def pause_writing(self) -> None:
        pass  # the advertised window already shrinks with the transport's buffer

    def resume_writing(self) -> None:
        self._recharge()
        self.ack()  # window update: the guest may have been told the window is closed

    # -- the budget -------------------------------------------------------------------------

    def _held(self) -> int:
        held = len(self.send_buffer) + (len(self.pending) if self.pending is not None else 0)
        if self.transport is not None:
            held += self.transport.get_write_buffer_size()
        return held

    def _recharge(self) -> None:
        if self.budget is None:
            return
        held = self._held()
        if held != self.charged:
            delta, self.charged = held - self.charged, held
            self.budget.charge(delta)

    def _release(self) -> None:
        """Once closed, give back what is no longer held (a gracefully closed socket may
        still be flushing its write buffer: that stays charged until it is gone)."""
        self._recharge()
        if self.budget is not None and self.charged == 0 and self.state is TcpState.CLOSED:
            self.budget.leave(self)

    def pause_for_budget(self) -> None:
        if self.state is TcpState.CLOSED or self.transport is None or self.reading_paused:
            return
        self.transport.pause_reading()
        self.reading_paused = True
        assert self.budget is not None
        self.budget.starve(self)

    def budget_freed(self) -> None:
        """Room came back: read the host socket again, and tell the guest our window."""
        if self.state is TcpState.CLOSED:
            return
        self._resume_reading_if_room()
        self.ack()

    def _resume_reading_if_room(self) -> None:
        if not self.reading_paused or self.state is not TcpState.ESTABLISHED:
            return
        if len(self.send_buffer) >= SEND_BUFFER // 2:
            return  # the guest's own acknowledgements resume it
        if self.budget is not None and self.budget.short():
            self.budget.starve(self)
            return
        if self.transport is not None:
            self.transport.resume_reading()
        self.reading_paused = False

    # -- opening --------------------------------------------------------------------------

    def accept_syn(self, syn: Tcp) -> None:
        """The guest's SYN: remember its parameters; the SYN-ACK waits for :meth:`host_ready`."""
        self.rcv_nxt = syn.seq + 1
        self.peer_mss = min(syn.mss or 536, self.our_mss)
        self.peer_wscale = syn.wscale
        self.snd_wnd = syn.window

    def host_ready(self) -> None:
        """The host side exists (or is deferred): answer the guest's SYN."""
        if self.state is not TcpState.CONNECTING:
            return
        self.state = TcpState.SYN_RECEIVED
        self._syn_ack()
        self._arm_timer()

    def open_to_guest(self) -> None:
        """Active open towards the guest (port forwarding): send our SYN."""
        self.state = TcpState.SYN_SENT
        self._emit(TCP_SYN, self.iss, 0, mss=self.our_mss, wscale=WSCALE)
        self.snd_nxt = self.snd_max = self.iss + 1
        self._arm_timer()

    def _syn_ack(self) -> None:
        wscale = WSCALE if self.peer_wscale is not None else None
        self._emit(TCP_SYN | TCP_ACK, self.iss, self.rcv_nxt, mss=self.our_mss, wscale=wscale)
        self.snd_nxt = self.snd_max = self.iss + 1

    # -- segments from the guest ----------------------------------------------------------

    def segment(self, tcp: Tcp) -> None:
        if self.state is TcpState.CLOSED:
            return
        if tcp.flags & TCP_RST:
            self._guest_reset(tcp)
            return
        if self.state is TcpState.SYN_SENT:
            self._syn_sent(tcp)
            return
        if tcp.flags & TCP_SYN:
            if self.state is TcpState.SYN_RECEIVED and tcp.seq + 1 == self.rcv_nxt:
                self._syn_ack()  # our SYN-ACK was lost: the guest asks again
            return  # while the host socket opens the guest's retransmitted SYNs wait
        if self.state is TcpState.CONNECTING or not tcp.flags & TCP_ACK:
            return
        if not self._ack(tcp):
            return
        self._receive(tcp)
        self.push()

    def _guest_reset(self, tcp: Tcp) -> None:
        seq = unwrap(tcp.seq, self.rcv_nxt)
        if self.state is TcpState.SYN_SENT or abs(seq - self.rcv_nxt) <= self._window():
            self._close(abort_host=True)

    def _syn_sent(self, tcp: Tcp) -> None:
        wanted = TCP_SYN | TCP_ACK
        if tcp.flags & wanted != wanted or (tcp.ack & MASK) != (self.iss + 1) & MASK:
            return
        self.rcv_nxt = tcp.seq + 1
        self.peer_mss = min(tcp.mss or 536, self.our_mss)
        self.peer_wscale = tcp.wscale
        self.snd_una = self.iss + 1
        self.snd_wnd = tcp.window  # never scaled in a SYN
        self.state = TcpState.ESTABLISHED
        self._reset_timer()
        self.ack()
        if self.transport is not None and self.reading_paused:
            self.transport.resume_reading()
            self.reading_paused = False
        self.push()

    def _ack(self, tcp: Tcp) -> bool:
        """Process the acknowledgement field; False when the segment is to be ignored."""
        ack = unwrap(tcp.ack, self.snd_una)
        if ack > self.snd_max:
            self.ack()  # acknowledges what we never sent
            return False
        if ack < self.snd_una:
            ack = self.snd_una  # an old duplicate acknowledgement: still carries data
        if self.state is TcpState.SYN_RECEIVED:
            if ack < self.iss + 1:
                return False
            self.state = TcpState.ESTABLISHED
            self.snd_una = self.iss + 1
        window = tcp.window << self._peer_shift()
        advanced = ack - self.snd_una
        if advanced > 0:
            data = min(advanced, len(self.send_buffer))
            del self.send_buffer[:data]
            self.snd_una = ack
            self.snd_nxt = max(self.snd_nxt, ack)
            self.dup_acks = 0
            self.retries = 0
            self.rto = INITIAL_RTO
            self._reset_timer()
            self._recharge()
            self._resume_reading_if_room()
        elif not tcp.payload and window == self.snd_wnd and self.snd_max > self.snd_una:
            self.dup_acks += 1
            if self.dup_acks == 3:
                self._retransmit()
        self.snd_wnd = window
        if self._everything_done():
            self._close(abort_host=False)
            return False
        return True

    def _receive(self, tcp: Tcp) -> None:
        payload = tcp.payload
        seq = unwrap(tcp.seq, self.rcv_nxt)
        fin = bool(tcp.flags & TCP_FIN)
        if seq < self.rcv_nxt:  # (partly) a retransmission of what we already have
            skip = self.rcv_nxt - seq
            if skip > len(payload):
                if payload or fin:
                    self.ack()
                return
            payload, seq = payload[skip:], self.rcv_nxt
            self.counters["old"] += 1
        if seq > self.rcv_nxt:
            self.counters["holes"] += 1
            self.ack()  # a hole: say where we are; the guest retransmits
            return
        if self.guest_fin:
            if payload or fin:
                self.ack()
            return
        room = self._window()
        if len(payload) > room:
            payload, fin = payload[:room], False  # beyond the window: the guest sends it again
            self.counters["trimmed"] += 1
        if payload:
            self.counters["in"] += len(payload)
            self._to_host(payload)
            self.rcv_nxt += len(payload)
        if fin:
            self.rcv_nxt += 1
            self.guest_fin = True
            self._host_eof()
        if payload or fin:
            self.ack()
        if self._everything_done():
            self._close(abort_host=False)

    def _to_host(self, data: bytes) -> None:
        if self.pending is not None or self.transport is None:
            if self.pending is None:
                self.pending = bytearray()
            self.pending += data
            self._recharge()
            if self.on_pending is not None:
                self.on_pending(self, data)
        else:
            self.transport.write(data)
            self._recharge()

    def _host_eof(self) -> None:
        if self.pending is not None or self.transport is None:
            self.pending_fin = True
        elif self.transport.can_write_eof():
            self.transport.write_eof()

    def flush_pending(self) -> None:
        """The host side is now open: hand over what the guest sent while it was not."""
        if self.transport is None:
            return
        data, self.pending = self.pending, None
        self.hold_limit = None
        if data:
            self.transport.write(data)
        self._recharge()
        if self.pending_fin:
            self.pending_fin = False
            if self.transport.can_write_eof():
                self.transport.write_eof()
        self.ack()

    # -- segments to the guest ------------------------------------------------------------

    def _peer_shift(self) -> int:
        return self.peer_wscale if self.peer_wscale is not None else 0

    def _window(self) -> int:
        """How many more guest bytes we take now."""
        held = len(self.pending) if self.pending is not None else 0
        queued = held
        if self.transport is not None:
            queued += self.transport.get_write_buffer_size()
        window = RECV_BUFFER - queued
        if self.hold_limit is not None:
            window = min(window, self.hold_limit - held)
        if self.budget is not None:
            self._recharge()
            room = self.budget.room()
            if room < window:
                window = room
                if room < self.peer_mss:
                    self.budget.starve(self)  # a window update follows when room returns
        return max(0, window)

    def _advertised(self) -> int:
        shift = WSCALE if self.peer_wscale is not None else 0
        return min(0xFFFF, self._window() >> shift)

    def ack(self) -> None:
        if self.state in (TcpState.ESTABLISHED, TcpState.SYN_RECEIVED):
            self._emit(TCP_ACK, self.snd_nxt, self.rcv_nxt)

    def push(self) -> None:
        """Send what the guest's window allows, then our FIN once the host has closed."""
        if self.state is not TcpState.ESTABLISHED:
            return
        while True:
            in_flight = self.snd_nxt - self.snd_una
            unsent = len(self.send_buffer) - in_flight
            room = self.snd_wnd - in_flight
            size = min(unsent, room, self.peer_mss)
            if size <= 0:
                break
            data = bytes(self.send_buffer[in_flight : in_flight + size])
            self._emit(TCP_ACK | TCP_PSH, self.snd_nxt, self.rcv_nxt, payload=data)
            self.snd_nxt += size
            self.snd_max = max(self.snd_max, self.snd_nxt)
        everything_sent = self.snd_nxt - self.snd_una == len(self.send_buffer)
        if self.host_eof and not self.fin_sent and everything_sent:
            self._emit(TCP_FIN | TCP_ACK, self.snd_nxt, self.rcv_nxt)
            self.fin_sent = True
            self.snd_nxt += 1
            self.snd_max = max(self.snd_max, self.snd_nxt)
        if self.snd_max > self.snd_una or (self.send_buffer and self.snd_wnd == 0):
            self._arm_timer()
        if self._everything_done():
            self._close(abort_host=False)

    def _emit(
        self,
        flags: int,
        seq: int,
        ack: int,
        payload: bytes = b"",
        mss: int | None = None,
        wscale: int | None = None,
    ) -> None:
        window = self._advertised() if not flags & TCP_SYN else min(0xFFFF, self._window())
        _, guest_port, _, remote_port = self.key
        tcp = Tcp(
            src_port=remote_port,
            dst_port=guest_port,
            seq=seq & MASK,
            ack=ack & MASK,
            flags=flags,
            window=window,
            payload=payload,
            mss=mss,
            wscale=wscale,
        )
        self._send(self, tcp)

    def _everything_done(self) -> bool:
        fin_acked = self.fin_sent and self.snd_una == self.snd_max
        return fin_acked and self.guest_fin and self.state is TcpState.ESTABLISHED

    # -- timers ---------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.rto, self._on_timer)

    def _reset_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.snd_max > self.snd_una:
            self._arm_timer()

    def _on_timer(self) -> None:
        self.timer = None
        if self.state is TcpState.CLOSED:
            return
        self.retries += 1
        if self.retries > MAX_RETRIES:
            log.info("tcp %s: guest stopped answering", self.key)
            self.reset()
            return
        self.rto = min(self.rto * 2, MAX_RTO)
        if self.state is TcpState.SYN_SENT:
            self._emit(TCP_SYN, self.iss, 0, mss=self.our_mss, wscale=WSCALE)
        elif self.state is TcpState.SYN_RECEIVED:
            self._syn_ack()
        elif self.snd_max > self.snd_una:
            self._retransmit()
        elif self.send_buffer and self.snd_wnd == 0:
            self._probe_window()
        waiting = self.state in (TcpState.SYN_SENT, TcpState.SYN_RECEIVED)
        if waiting or self.snd_max > self.snd_una or (self.send_buffer and self.snd_wnd == 0):
            self._arm_timer()

    def _retransmit(self) -> None:
        """Go back to the oldest unacknowledged byte and send again from there."""
        self.counters["rexmit"] += 1
        self.snd_nxt = self.snd_una
        if self.fin_sent and self.snd_una < self.snd_max:
            self.fin_sent = False
        saved, self.snd_wnd = self.snd_wnd, max(self.snd_wnd, 1)
        self.push()
        self.snd_wnd = saved

    def _probe_window(self) -> None:
        self._emit(TCP_ACK, self.snd_nxt - 1, self.rcv_nxt)

    # -- closing --------------------------------------------------------------------------

    def reset(self) -> None:
        """Abort towards the guest (RST) and the host."""
        if self.state is TcpState.CLOSED:
            return
        if self.state is TcpState.CONNECTING:
            self._emit(TCP_RST | TCP_ACK, 0, self.rcv_nxt)
        elif self.state is not TcpState.SYN_SENT or self.snd_nxt > self.iss:
            self._emit(TCP_RST | TCP_ACK, self.snd_nxt, self.rcv_nxt)
        self._close(abort_host=True)

    def _close(self, abort_host: bool) -> None:
        if self.state is TcpState.CLOSED:
            return
        self.state = TcpState.CLOSED
        log.debug("tcp %s closed: %s", self.key, self.counters)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            if abort_host:
                self.transport.abort()
            else:
                self.transport.close()
        self.send_buffer.clear()
        self.pending = None
        self._release()
        self._on_closed(self)
