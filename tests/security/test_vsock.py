"""The vsock back end against a hostile guest: what it makes the helper hold stays bounded,
and the credit counters wrap at 2**32.

Component tests: a VsockDevice driven through real split rings in a memfd guest memory, the
guest's side played by the test (as in tests/unit/test_devices.py) with descriptors reused
the way a driver does, so a test can send thousands of packets; host clients are socketpairs.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import tracemalloc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from capsa.devices.guest_memory import GuestMemory, memfd_memory
from capsa.devices.virtqueue import VIRTQ_DESC_F_WRITE, VirtQueue
from capsa.devices.vsock import BUF_ALLOC, HDR, MAX_PKT_PAYLOAD, Op, Packet, PortConfig, VsockDevice

GUEST_CID = 3
PORT = 1024
QSIZE = 64
USER_BASE = 0x7F00_0000_0000
DESC, AVAIL, USED, BUFFERS = 0x0, 0x1000, 0x2000, 0x4000
SLOT = HDR.size + MAX_PKT_PAYLOAD
RX_BASE, TX_BASE = 0, 8 << 20
MEM = 16 << 20
WRAP = 1 << 32


class GuestRing:
    """The guest's side of one split virtqueue; descriptor i always points at buffer slot i.

    The device returns chains in order, so the next slot is free whenever fewer than QSIZE
    chains are out with the device."""

    def __init__(self, mem: GuestMemory, base: int, index: int) -> None:
        self.mem, self.base = mem, base
        self.q = VirtQueue(index)
        self.q.set_num(QSIZE)
        self.q.desc, self.q.avail, self.q.used = (USER_BASE + base + o for o in (DESC, AVAIL, USED))
        self.q.start(mem)
        self.avail_idx = 0
        self.used_seen = 0

    def _buffer(self, slot: int) -> int:
        return self.base + BUFFERS + slot * SLOT

    def _used_idx(self) -> int:
        return int(struct.unpack("<H", self.mem.read(self.base + USED + 2, 2))[0])

    def with_device(self) -> int:
        """Chains made available that the device has not returned yet."""
        return (self.avail_idx - self._used_idx()) & 0xFFFF

    def _publish(self, length: int, flags: int) -> None:
        slot = self.avail_idx % QSIZE
        desc = struct.pack("<QIHH", self._buffer(slot), length, flags, 0)
        self.mem.write(self.base + DESC + 16 * slot, desc)
        self.mem.write(self.base + AVAIL + 4 + 2 * slot, struct.pack("<H", slot))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(self.base + AVAIL + 2, struct.pack("<H", self.avail_idx))

    def offer(self, data: bytes) -> bool:
        """Make ``data`` available as a readable chain; False when the ring is full."""
        if self.with_device() == QSIZE:
            return False
        self.mem.write(self._buffer(self.avail_idx % QSIZE), data)
        self._publish(len(data), 0)
        return True

    def post_buffers(self) -> None:
        """Make every buffer available whose contents were taken (see :meth:`take`)."""
        while (self.avail_idx - self.used_seen) & 0xFFFF < QSIZE:
            self._publish(SLOT, VIRTQ_DESC_F_WRITE)

    def take(self) -> list[bytes]:
        """What the device wrote into the chains it returned since the last call."""
        out = []
        while self.used_seen != self._used_idx():
            entry = self.base + USED + 4 + 8 * (self.used_seen % QSIZE)
            head, length = struct.unpack("<II", self.mem.read(entry, 8))
            out.append(self.mem.read(self._buffer(head), length))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out


class Guest:
    """A guest driver in front of a VsockDevice."""

    def __init__(self, mem: GuestMemory, reads_rx: bool = True) -> None:
        self.device = VsockDevice(GUEST_CID, [PortConfig(PORT, connect=False)])
        self.rx = GuestRing(mem, RX_BASE, 0)
        self.tx = GuestRing(mem, TX_BASE, 1)
        if reads_rx:
            self.rx.post_buffers()
        self.device.started(self.rx.q)
        self.device.started(self.tx.q)

    def send(
        self, op: int, src_port: int, payload: bytes = b"", fwd_cnt: int = 0, dst_port: int = PORT
    ) -> bool:
        """Put one packet on the tx queue and kick; False when the device left the ring full."""
        pkt = Packet(
            src_cid=GUEST_CID,
            dst_cid=2,
            src_port=src_port,
            dst_port=dst_port,
            op=op,
            buf_alloc=BUF_ALLOC,
            fwd_cnt=fwd_cnt,
            payload=payload,
        )
        if not self.tx.offer(pkt.encode()):
            return False
        self.device.queue_kicked(self.tx.q)
        return True

    def receive(self) -> list[Packet]:
        """Give the device rx buffers, read what it wrote, and give them back, as a driver does."""
        self.rx.post_buffers()
        self.device.queue_kicked(self.rx.q)
        packets = [Packet.decode(data) for data in self.rx.take()]
        self.rx.post_buffers()
        self.device.queue_kicked(self.rx.q)
        return packets

    def connect(self, src_port: int) -> Op:
        """Connect from ``src_port``; the device's answer (RESPONSE or RST)."""
        assert self.send(Op.REQUEST, src_port)
        (answer,) = [p for p in self.receive() if p.dst_port == src_port]
        return Op(answer.op)

    async def receive_until(
        self, done: Callable[[list[Packet]], bool], seconds: float = 5.0
    ) -> list[Packet]:
        """Receive packets, letting the event loop run, until ``done(packets)``."""
        packets: list[Packet] = []
        for _ in range(int(seconds * 100)):
            packets += self.receive()
            if done(packets):
                break
            await asyncio.sleep(0.01)
        return packets


GuestFactory = Callable[..., Guest]


@pytest.fixture
async def new_guest() -> AsyncIterator[GuestFactory]:
    """Guests on a fresh guest memory; their devices are reset (as when QEMU goes away)
    before the memory is unmapped, so no task of theirs touches it afterwards."""
    mem, fd = memfd_memory(MEM)
    guests: list[Guest] = []

    def make(reads_rx: bool = True) -> Guest:
        guests.append(Guest(mem, reads_rx))
        return guests[-1]

    yield make
    for guest in guests:
        guest.device.reset()
    mem.close()
    os.close(fd)


@asynccontextmanager
async def host_client(
    guest: Guest, small_buffers: bool = False
) -> AsyncIterator[tuple[socket.socket, asyncio.StreamWriter]]:
    """A host program attached to the guest's waiting connection: (its socket, our writer)."""
    ours, theirs = socket.socketpair()
    if small_buffers:  # so what the host does not read stays in the helper, not the kernel
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    theirs.setblocking(False)
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    guest.device.host_client(PORT, reader, writer)
    try:
        yield theirs, writer
    finally:
        writer.close()
        theirs.close()


async def recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, n - len(data)), 5)
        assert chunk, f"EOF after {len(data)} of {n} bytes"
        data += chunk
    return data


# -- (a) a reset connection's memory is freed at once ----------------------------------------


async def test_connect_reset_cycles_leave_nothing_behind(new_guest: GuestFactory) -> None:
    guest = new_guest()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(3000):
            port = 10_000 + i
            assert guest.connect(port) == Op.RESPONSE
            assert guest.send(Op.RW, port, b"x" * 16384)  # no host client takes it yet
            assert guest.send(Op.RST, port)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert guest.device.conns == {}
    assert len(guest.device.waiting_guest[PORT]) == 0
    assert len(guest.device.rx_pending) == 0
    assert grown < 2 << 20, f"3000 reset connections still hold {grown} bytes"


async def test_reset_drops_what_a_host_client_has_not_read(new_guest: GuestFactory) -> None:
    guest = new_guest()
    assert guest.connect(5000) == Op.RESPONSE
    async with host_client(guest, small_buffers=True) as (_, writer):
        for _ in range(3):
            assert guest.send(Op.RW, 5000, b"y" * MAX_PKT_PAYLOAD)
        assert writer.transport.get_write_buffer_size() > 0  # the host client reads nothing
        assert guest.send(Op.RST, 5000)
        assert writer.transport.get_write_buffer_size() == 0
        assert guest.device.conns == {}


# -- (b) credit is enforced ------------------------------------------------------------------


async def test_guest_beyond_its_credit_is_reset_while_a_host_client_is_attached(
    new_guest: GuestFactory,
) -> None:
    guest = new_guest()
    assert guest.connect(5000) == Op.RESPONSE
    async with host_client(guest, small_buffers=True) as (_, writer):
        sent = reported_fwd = 0

        def credit() -> int:  # as the guest's driver computes it from what we told it
            return BUF_ALLOC - (sent - reported_fwd)

        # Up to the credit we advertised is fine, however slowly the host client reads,
        # and the helper never holds more than that.
        for _ in range(100):
            if credit() <= 0:
                break
            chunk = min(credit(), MAX_PKT_PAYLOAD)
            assert guest.send(Op.RW, 5000, b"z" * chunk)
            sent += chunk
            await asyncio.sleep(0.01)
            for p in guest.receive():
                assert p.op == Op.CREDIT_UPDATE
                reported_fwd = p.fwd_cnt
            assert writer.transport.get_write_buffer_size() <= BUF_ALLOC
        assert credit() == 0
        # One packet more is refused: the connection is reset and nothing stays buffered.
        assert guest.send(Op.RW, 5000, b"z" * MAX_PKT_PAYLOAD)
        assert [(p.op, p.dst_port) for p in guest.receive()] == [(Op.RST, 5000)]
        assert guest.device.conns == {}
        assert writer.transport.get_write_buffer_size() == 0
    assert guest.device.refusals.credit_overruns == 1


async def test_guest_beyond_its_credit_is_reset_before_a_host_client_attaches(
    new_guest: GuestFactory,
) -> None:
    guest = new_guest()
    assert guest.connect(5000) == Op.RESPONSE
    for _ in range(BUF_ALLOC // MAX_PKT_PAYLOAD):
        assert guest.send(Op.RW, 5000, b"z" * MAX_PKT_PAYLOAD)
    assert guest.receive() == []
    assert guest.send(Op.RW, 5000, b"!")
    assert [(p.op, p.dst_port) for p in guest.receive()] == [(Op.RST, 5000)]
    assert guest.device.conns == {}
    assert len(guest.device.waiting_guest[PORT]) == 0


# -- (c) control replies are bounded ---------------------------------------------------------


async def test_guest_that_never_reads_rx_makes_the_device_stop_not_queue(
    new_guest: GuestFactory,
) -> None:
    guest = new_guest(reads_rx=False)
    requests = 0
    # Nothing listens on port 9999: every request earns an RST.
    while requests < 5000 and guest.send(Op.REQUEST, 20_000 + requests, dst_port=9999):
        requests += 1
    # Whatever the limit, far fewer replies wait than requests were made: the device left
    # the guest's tx ring full instead.
    assert requests < 5000
    assert guest.tx.with_device() == QSIZE
    assert len(guest.device.rx_pending) < 1024
    # Once the guest reads, every request gets its answer and the device takes tx again.
    answers = [p.dst_port for p in guest.receive()]
    for _ in range(requests):
        if len(answers) >= requests:
            break
        answers += [p.dst_port for p in guest.receive()]
    assert sorted(answers) == list(range(20_000, 20_000 + requests))
    assert guest.tx.with_device() == 0
    assert len(guest.device.rx_pending) == 0


async def test_credit_requests_from_a_guest_that_never_reads_are_coalesced(
    new_guest: GuestFactory,
) -> None:
    guest = new_guest(reads_rx=False)
    assert guest.send(Op.REQUEST, 5000)
    for _ in range(2000):
        assert guest.send(Op.CREDIT_REQUEST, 5000)
    assert len(guest.device.rx_pending) == 2
    # Once the guest reads: its RESPONSE and one CREDIT_UPDATE saying all 2000 would.
    assert [p.op for p in guest.receive()] == [Op.RESPONSE, Op.CREDIT_UPDATE]


# -- connection cap --------------------------------------------------------------------------


async def test_connections_per_vm_are_capped(new_guest: GuestFactory) -> None:
    guest = new_guest()
    accepted = 0
    while accepted <= 4096 and guest.connect(30_000 + accepted) == Op.RESPONSE:
        accepted += 1
    # Each live connection may hold BUF_ALLOC of guest data no host client took yet: the
    # cap keeps that within 64 MiB for the VM.
    assert 0 < accepted * BUF_ALLOC <= 64 << 20
    assert len(guest.device.conns) == accepted
    assert guest.connect(40_000) == Op.RST
    # The cap is on live connections: one reset frees a place.
    assert guest.send(Op.RST, 30_000)
    assert guest.connect(40_001) == Op.RESPONSE
    assert guest.connect(40_002) == Op.RST
    assert guest.device.refusals.connections_over_cap == 3


# -- counters wrap at 2**32 ------------------------------------------------------------------


async def test_counters_wrap_past_four_gib_and_data_keeps_flowing(new_guest: GuestFactory) -> None:
    guest = new_guest()
    assert guest.connect(5000) == Op.RESPONSE
    async with host_client(guest) as (sock, _):
        # As if 4 GiB minus a little had already gone both ways on this connection.
        start = WRAP - 1000
        conn = guest.device.conns[(PORT, 5000)]
        conn.fwd_cnt = conn.reported_fwd = conn.rx_cnt = start
        conn.tx_cnt = conn.peer_fwd_cnt = start
        guest_fwd = start  # what the guest's driver counts as taken from us

        # Guest to host, across the wrap, within credit: the host gets every byte and the
        # guest its credit back with a wrapped fwd_cnt.
        sent = bytes(range(256)) * 900
        for i in range(0, len(sent), 60_000):
            assert guest.send(Op.RW, 5000, sent[i : i + 60_000], fwd_cnt=guest_fwd)
        assert await recv_exactly(sock, len(sent)) == sent
        taken = (start + len(sent)) % WRAP
        updates = await guest.receive_until(
            lambda ps: any(p.op == Op.CREDIT_UPDATE and p.fwd_cnt == taken for p in ps)
        )
        assert [p.fwd_cnt for p in updates if p.op == Op.CREDIT_UPDATE][-1:] == [taken]

        # Host to guest, across the wrap and through more than a whole credit window: the
        # guest acknowledges with wrapped fwd_cnt values and the data keeps coming.
        to_guest = os.urandom(3 * BUF_ALLOC)
        sending = asyncio.ensure_future(asyncio.get_running_loop().sock_sendall(sock, to_guest))
        got = b""
        for _ in range(500):
            for p in guest.receive():
                if p.op == Op.RW:
                    got += p.payload
                    guest_fwd = (guest_fwd + len(p.payload)) % WRAP
                    assert guest.send(Op.CREDIT_UPDATE, 5000, fwd_cnt=guest_fwd)
            if len(got) >= len(to_guest):
                break
            await asyncio.sleep(0.01)
        await asyncio.wait_for(sending, 5)
        assert got == to_guest
        assert conn.tx_cnt == (start + len(to_guest)) % WRAP
        assert (PORT, 5000) in guest.device.conns
