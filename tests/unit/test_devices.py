"""Virtqueue, vhost-user and vsock logic against hand-laid rings in a memfd 'guest memory'."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capsa.devices.guest_memory import DeviceError, GuestMemory, memfd_memory
from capsa.devices.vhost_user import (
    HEADER,
    U64,
    VRING_ADDR,
    VRING_STATE,
    Device,
    Message,
    Req,
    VhostUserBackend,
    encode_message,
    recv_message,
)
from capsa.devices.virtqueue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VirtQueue
from capsa.devices.vsock import HDR, Op, Packet, PortConfig, VsockDevice

NEXT, WRITE = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
MEM = 1 << 20
USER_BASE = 0x7F00_0000_0000
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
QSIZE = 16


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m, fd = memfd_memory(MEM)
    yield m
    m.close()
    os.close(fd)


class Ring:
    """The guest's side of one split virtqueue, for tests."""

    def __init__(self, mem: GuestMemory, base: int, index: int = 0) -> None:
        self.mem, self.base = mem, base
        self.q = VirtQueue(index)
        self.q.set_num(QSIZE)
        self.q.desc, self.q.avail, self.q.used = (USER_BASE + base + o for o in (DESC, AVAIL, USED))
        self.q.start(mem)
        self.next_desc = 0
        self.avail_idx = 0
        self.data = base + 0x10000

    def desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.mem.write(self.base + DESC + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def publish(self, head: int) -> None:
        self.mem.write(
            self.base + AVAIL + 4 + 2 * (self.avail_idx % QSIZE), struct.pack("<H", head)
        )
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(self.base + AVAIL + 2, struct.pack("<H", self.avail_idx))

    def add_readable(self, payload: bytes) -> None:
        i = self.next_desc
        self.next_desc += 1
        self.mem.write(self.data, payload)
        self.desc(i, self.data, len(payload), 0)
        self.data += len(payload) + 64
        self.publish(i)

    def add_writable(self, size: int) -> None:
        i = self.next_desc
        self.next_desc += 1
        self.desc(i, self.data, size, VIRTQ_DESC_F_WRITE)
        self.data += size + 64
        self.publish(i)

    def used(self) -> list[bytes]:
        """Contents of the buffers the device returned, in order."""
        (idx,) = struct.unpack("<H", self.mem.read(self.base + USED + 2, 2))
        out = []
        for n in range(idx):
            head, length = struct.unpack("<II", self.mem.read(self.base + USED + 4 + 8 * n, 8))
            addr, _, _, _ = struct.unpack("<QIHH", self.mem.read(self.base + DESC + 16 * head, 16))
            out.append(self.mem.read(addr, length))
        return out


def test_memory_views_are_bounds_checked(mem: GuestMemory) -> None:
    mem.write(MEM - 4, b"abcd")
    assert mem.read(MEM - 4, 4) == b"abcd"
    for addr, length in ((MEM - 3, 4), (MEM, 1), (-1, 1), (0, MEM + 1), (2**64 - 1, 2)):
        with pytest.raises(DeviceError):
            mem.view(addr, length)


def test_chain_with_readable_and_writable_parts(mem: GuestMemory) -> None:
    ring = Ring(mem, 0)
    mem.write(0x20000, b"request!")
    ring.desc(0, 0x20000, 8, VIRTQ_DESC_F_NEXT, 1)
    ring.desc(1, 0x21000, 100, VIRTQ_DESC_F_WRITE)
    ring.publish(0)
    chain = ring.q.pop()
    assert chain is not None and ring.q.read_chain(chain, 64) == b"request!"
    ring.q.push(chain, ring.q.write_chain(chain, b"reply"))
    assert mem.read(0x21000, 5) == b"reply"
    assert ring.q.pop() is None


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda r: r.desc(0, MEM - 2, 8, 0), "outside guest memory"),
        (lambda r: (r.desc(0, 0x20000, 8, NEXT, 1), r.desc(1, 0x20000, 8, NEXT, 0)), "loop"),
        (lambda r: r.desc(0, 0x20000, 8, VIRTQ_DESC_F_NEXT, QSIZE + 3), "outside a 16-entry"),
        (lambda r: r.desc(0, 0x20000, 8, 4), "indirect"),
        (
            lambda r: (r.desc(0, 0x20000, 8, WRITE | NEXT, 1), r.desc(1, 0x20000, 8, 0)),
            "readable descriptor after",
        ),
    ],
)
def test_hostile_chains_are_refused(mem: GuestMemory, setup: object, message: str) -> None:
    ring = Ring(mem, 0)
    setup(ring)  # type: ignore[operator]
    ring.publish(0)
    with pytest.raises(DeviceError, match=message):
        ring.q.pop()


def test_avail_index_running_ahead_is_refused(mem: GuestMemory) -> None:
    ring = Ring(mem, 0)
    mem.write(AVAIL + 2, struct.pack("<H", QSIZE + 1))
    with pytest.raises(DeviceError, match="ahead"):
        ring.q.pending()


@settings(max_examples=300, deadline=None)
@given(
    table=st.binary(min_size=16 * QSIZE, max_size=16 * QSIZE),
    avail=st.binary(min_size=4 + 2 * QSIZE, max_size=4 + 2 * QSIZE),
)
def test_random_rings_never_escape_or_crash(table: bytes, avail: bytes) -> None:
    mem, fd = memfd_memory(MEM)
    try:
        ring = Ring(mem, 0)
        mem.write(DESC, table)
        mem.write(AVAIL, avail)
        for _ in range(QSIZE + 1):
            try:
                chain = ring.q.pop()
            except DeviceError:
                break
            if chain is None:
                break
            for b in chain.readable + chain.writable:
                assert b.addr >= 0 and b.addr + b.length <= MEM
            ring.q.read_chain(chain, 1 << 30)
    finally:
        mem.close()
        os.close(fd)


# -- vhost-user ------------------------------------------------------------------------------


class Recorder(Device):
    num_queues = 2

    def __init__(self) -> None:
        self.kicks: list[int] = []

    def queue_kicked(self, queue: VirtQueue) -> None:
        self.kicks.append(queue.index)


def _roundtrip(backend: VhostUserBackend, peer: socket.socket, msg: Message) -> bytes:
    backend.handle(msg)
    peer.settimeout(1)
    header = peer.recv(HEADER.size)
    _, flags, size = HEADER.unpack(header)
    assert flags & 0x4
    return peer.recv(size) if size else b""


def test_feature_and_queue_negotiation() -> None:
    ours, peer = socket.socketpair()
    backend = VhostUserBackend(Recorder(), ours)
    reply = _roundtrip(backend, peer, Message(Req.GET_FEATURES, 1, b"", []))
    assert U64.unpack(reply)[0] & (1 << 32)
    assert U64.unpack(_roundtrip(backend, peer, Message(Req.GET_QUEUE_NUM, 1, b"", [])))[0] == 2
    backend.handle(Message(Req.SET_PROTOCOL_FEATURES, 1, U64.pack(1 << 3), []))
    # With REPLY_ACK negotiated, NEED_REPLY gets a zero status.
    assert U64.unpack(_roundtrip(backend, peer, Message(Req.SET_OWNER, 1 | 0x8, b"", [])))[0] == 0


def test_messages_over_a_real_socket_with_fds() -> None:
    ours, peer = socket.socketpair()
    r, w = os.pipe()
    socket.send_fds(peer, [encode_message(Req.SET_VRING_CALL, U64.pack(1))], [w])
    msg = recv_message(ours)
    assert msg is not None and msg.request == Req.SET_VRING_CALL and len(msg.fds) == 1
    os.close(msg.fds[0])
    os.close(r)
    os.close(w)


@pytest.mark.parametrize(
    "msg",
    [
        Message(Req.SET_VRING_NUM, 1, VRING_STATE.pack(7, 16), []),
        Message(Req.SET_VRING_NUM, 1, VRING_STATE.pack(0, 1000), []),
        Message(Req.SET_VRING_ADDR, 1, b"short", []),
        Message(Req.SET_MEM_TABLE, 1, struct.pack("<II", 9, 0), []),
        Message(Req.SET_FEATURES, 1, b"\x00", []),
        Message(Req.GET_CONFIG, 1, struct.pack("<III", 0, 64, 0), []),
        Message(999, 1, b"", []),
    ],
)
def test_invalid_vhost_user_messages_are_device_errors(msg: Message) -> None:
    ours, _ = socket.socketpair()
    with pytest.raises(DeviceError):
        VhostUserBackend(Recorder(), ours).handle(msg)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=30), st.binary(max_size=80))
def test_random_messages_only_raise_device_errors(request: int, payload: bytes) -> None:
    ours, peer = socket.socketpair()
    backend = VhostUserBackend(Recorder(), ours)
    try:
        backend.handle(Message(request, 1, payload, []))
    except DeviceError:
        pass
    finally:
        ours.close()
        peer.close()


def test_vring_address_and_kick_start_a_queue(mem: GuestMemory) -> None:
    ours, _ = socket.socketpair()
    device = Recorder()
    backend = VhostUserBackend(device, ours)
    backend.mem = mem
    backend.handle(Message(Req.SET_VRING_NUM, 1, VRING_STATE.pack(1, QSIZE), []))
    addr = VRING_ADDR.pack(1, 0, USER_BASE + DESC, USER_BASE + USED, USER_BASE + AVAIL, 0)
    backend.handle(Message(Req.SET_VRING_ADDR, 1, addr, []))
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    backend.handle(Message(Req.SET_VRING_KICK, 1, U64.pack(1), [kick]))
    q = backend.queues[1]
    assert q.ready and q.kick_fd == kick
    os.eventfd_write(kick, 1)
    backend.kicked(q)
    assert device.kicks == [1]
    assert (
        VRING_STATE.unpack(
            _roundtrip(backend, _, Message(Req.GET_VRING_BASE, 1, VRING_STATE.pack(1, 0), []))
        )[1]
        == 0
    )


# -- vsock -----------------------------------------------------------------------------------


def _vsock(mem: GuestMemory, ports: list[PortConfig]) -> tuple[VsockDevice, Ring, Ring]:
    device = VsockDevice(3, ports)
    rx, tx = Ring(mem, 0, 0), Ring(mem, 0x40000, 1)
    device.started(rx.q)
    device.started(tx.q)
    return device, rx, tx


def _guest_sends(device: VsockDevice, tx: Ring, pkt: Packet) -> None:
    tx.add_readable(pkt.encode())
    device.queue_kicked(tx.q)


async def test_guest_connect_to_a_listen_port_and_data_before_the_host_attaches(
    mem: GuestMemory,
) -> None:
    device, rx, tx = _vsock(mem, [PortConfig(1024, connect=False)])
    for _ in range(4):
        rx.add_writable(HDR.size + 4096)
    _guest_sends(device, tx, Packet(3, 2, 5000, 1024, Op.REQUEST, buf_alloc=65536))
    _guest_sends(device, tx, Packet(3, 2, 5000, 1024, Op.RW, buf_alloc=65536, payload=b"early"))
    response = Packet.decode(rx.used()[0])
    assert (response.op, response.dst_port, response.src_port) == (Op.RESPONSE, 5000, 1024)
    # A host client attaches later and still gets the early bytes.
    a, b = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=a)
    device.host_client(1024, reader, writer)
    b.settimeout(2)
    assert b.recv(100) == b"early"
    b.sendall(b"to guest")
    for _ in range(1000):
        await asyncio.sleep(0.01)
        if len(rx.used()) > 1:
            break
    data = Packet.decode(rx.used()[1])
    assert (data.op, data.payload) == (Op.RW, b"to guest")
    writer.close()
    b.close()


async def test_unknown_port_and_foreign_cid_get_rst(mem: GuestMemory) -> None:
    device, rx, tx = _vsock(mem, [PortConfig(1024, connect=False)])
    rx.add_writable(HDR.size)
    rx.add_writable(HDR.size)
    _guest_sends(device, tx, Packet(3, 2, 5000, 9999, Op.REQUEST, buf_alloc=4096))
    _guest_sends(device, tx, Packet(7, 2, 5000, 1024, Op.REQUEST, buf_alloc=4096))
    assert [Packet.decode(p).op for p in rx.used()] == [Op.RST, Op.RST]
    assert device.conns == {}


def test_host_data_never_exceeds_guest_credit() -> None:
    from capsa.devices.vsock import Conn

    conn = Conn(1, 2, connect_mode=False, peer_buf_alloc=1000, peer_fwd_cnt=0, tx_cnt=900)
    assert conn.peer_credit() == 100
    conn.peer_fwd_cnt = 900
    assert conn.peer_credit() == 1000


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_packets_only_raise_device_errors(data: bytes) -> None:
    try:
        pkt = Packet.decode(data)
    except DeviceError:
        return
    assert len(pkt.payload) <= len(data) - HDR.size
