"""TCP NAT: each guest connection is terminated in the gateway and relayed to a host socket.

The gateway plays the remote peer towards the guest (its sequence numbers, window and
retransmissions) and an ordinary socket client or server towards the host. Sequence
numbers are kept as unbounded integers and wrapped to 32 bits only on the wire.

Flow control is end to end: the window the guest sees shrinks as the host socket's write
buffer fills, and the host socket stops being read while the guest has not acknowledged
enough of what it was sent.
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
INITIAL_RTO = 0.2
MAX_RTO = 30.0
MAX_RETRIES = 12
CONNECT_TIMEOUT = 30.0
INSPECT_LIMIT = 16 * 1024 + 5  # one TLS record, or an HTTP request head
INSPECT_WAIT = 3.0  # a client that says nothing first is treated as opaque

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


class TcpConnection(asyncio.Protocol):
    """One NATed connection: guest side as a TCP state machine, host side as a transport."""

    def __init__(
        self,
        key: Key,
        guest_mac: bytes,
        send: Callable[[TcpConnection, Tcp], None],
        on_closed: Callable[[TcpConnection], None],
        mss: int,
    ) -> None:
        self.key, self.guest_mac = key, guest_mac
        self._send, self._on_closed = send, on_closed
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
        self.reading_paused = False
        self.rto = INITIAL_RTO
        self.retries = 0
        self.dup_acks = 0
        self.timer: asyncio.TimerHandle | None = None
        self.counters = {"in": 0, "out": 0, "holes": 0, "old": 0, "trimmed": 0, "rexmit": 0}
        # Hooks for the gateway: a forwarded host client arrived; guest bytes are held.
        self.on_connected: Callable[[TcpConnection], None] | None = None
        self.on_pending: Callable[[TcpConnection], None] | None = None

    # -- the host side (asyncio.Protocol) ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.on_connected is not None:
            self.on_connected(self)

    def data_received(self, data: bytes) -> None:
        self.send_buffer += data
        if len(self.send_buffer) >= SEND_BUFFER and self.transport is not None:
            self.transport.pause_reading()
            self.reading_paused = True
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

    def pause_writing(self) -> None:
        pass  # the advertised window already shrinks with the transport's buffer

    def resume_writing(self) -> None:
        self.ack()  # window update: the guest may have been told the window is closed

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
            if self.reading_paused and len(self.send_buffer) < SEND_BUFFER // 2:
                if self.transport is not None:
                    self.transport.resume_reading()
                self.reading_paused = False
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
            if self.on_pending is not None:
                self.on_pending(self)
        else:
            self.transport.write(data)

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
        if data:
            self.transport.write(bytes(data))
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
        queued = len(self.pending) if self.pending is not None else 0
        if self.transport is not None:
            queued += self.transport.get_write_buffer_size()
        return max(0, RECV_BUFFER - queued)

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
        self._on_closed(self)
