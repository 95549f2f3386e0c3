"""Split virtqueues (virtio 1.x, section 2.7): descriptor chains in, used entries out.

The guest writes the descriptor table and the avail ring; we read them only through
bounds-checked memory views, limit chain length, reject loops and indirect tables, and
fail the queue (never the process) on anything malformed.
"""

from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass, field

from capsa.devices.guest_memory import DeviceError, DirtyLog, GuestMemory

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
MAX_QUEUE_SIZE = 32768
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


@dataclass
class Buffer:
    addr: int
    length: int
    writable: bool


@dataclass
class Chain:
    head: int
    readable: list[Buffer] = field(default_factory=list)
    writable: list[Buffer] = field(default_factory=list)

    @property
    def writable_len(self) -> int:
        return sum(b.length for b in self.writable)


class VirtQueue:
    """One split virtqueue, configured by the vhost-user SET_VRING_* messages."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.num = 0
        # Ring addresses as QEMU gives them: its own virtual addresses (translated through
        # the memory table's user_addr); descriptor buffers are guest-physical.
        self.desc = self.avail = self.used = 0
        self.last_avail = 0
        self.used_idx = 0
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.enabled = False
        self.started = False
        self.failed: str | None = None
        self.mem: GuestMemory | None = None
        # While QEMU migrates: the dirty log, and where writes to the used ring are logged.
        self.log: DirtyLog | None = None
        self.log_used: int | None = None

    @property
    def ready(self) -> bool:
        return self.started and self.mem is not None and self.failed is None and self.num > 0

    def set_num(self, num: int) -> None:
        if not 0 < num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise DeviceError(f"queue size {num} is not a power of two up to {MAX_QUEUE_SIZE}")
        self.num = num

    def start(self, mem: GuestMemory) -> None:
        if self.num == 0:
            raise DeviceError("queue started before its size was set")
        # Check the rings lie in guest memory once; every access is checked again anyway.
        self.mem = mem
        self._ring(self.desc, 16 * self.num)
        self._ring(self.avail, 6 + 2 * self.num)
        self._ring(self.used, 6 + 8 * self.num)
        self.started = True
        self.used_idx = self.last_avail

    def stop(self) -> int:
        self.started = False
        return self.last_avail

    def fail(self, why: str) -> None:
        self.failed = why

    # -- reading chains --------------------------------------------------------------------

    def _ring(self, addr: int, length: int) -> memoryview:
        assert self.mem is not None
        return self.mem.view(addr, length, user=True)

    def _avail_idx(self) -> int:
        assert self.mem is not None
        return int(self.mem.unpack(_U16, self.avail + 2, user=True)[0])

    def pending(self) -> int:
        """How many chains the guest has made available that we have not taken."""
        if not self.ready:
            return 0
        n = (self._avail_idx() - self.last_avail) & 0xFFFF
        if n > self.num:
            raise DeviceError(f"avail index ran {n} entries ahead of a {self.num}-entry queue")
        return n

    def pop(self) -> Chain | None:
        if self.pending() == 0:
            return None
        assert self.mem is not None
        slot = self.last_avail % self.num
        head = int(self.mem.unpack(_U16, self.avail + 4 + 2 * slot, user=True)[0])
        chain = self._walk(head)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return chain

    def _walk(self, head: int) -> Chain:
        assert self.mem is not None
        chain = Chain(head)
        index = head
        for _ in range(self.num):
            if index >= self.num:
                raise DeviceError(f"descriptor index {index} outside a {self.num}-entry table")
            addr, length, flags, nxt = self.mem.unpack(_DESC, self.desc + 16 * index, user=True)
            if flags & VIRTQ_DESC_F_INDIRECT:
                raise DeviceError("indirect descriptors were not negotiated")
            self.mem.view(addr, length)  # must lie inside guest memory
            buf = Buffer(addr, length, bool(flags & VIRTQ_DESC_F_WRITE))
            if buf.writable:
                chain.writable.append(buf)
            elif chain.writable:
                raise DeviceError("readable descriptor after a writable one")
            else:
                chain.readable.append(buf)
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            index = nxt
        raise DeviceError("descriptor chain longer than the queue (a loop)")

    def read_chain(self, chain: Chain, limit: int) -> bytes:
        """The chain's readable bytes, at most ``limit`` (more is a guest error)."""
        assert self.mem is not None
        total = sum(b.length for b in chain.readable)
        if total > limit:
            raise DeviceError(f"guest buffer of {total} bytes exceeds the {limit}-byte limit")
        return b"".join(self.mem.read(b.addr, b.length) for b in chain.readable)

    def write_chain(self, chain: Chain, data: bytes) -> int:
        assert self.mem is not None
        if len(data) > chain.writable_len:
            raise DeviceError("reply larger than the guest's buffer")
        pos = 0
        for b in chain.writable:
            if pos >= len(data):
                break
            n = min(b.length, len(data) - pos)
            self.mem.write(b.addr, data[pos : pos + n])
            pos += n
        return pos

    # -- returning chains -------------------------------------------------------------------

    def push(self, chain: Chain, written: int) -> None:
        assert self.mem is not None
        slot = self.used_idx % self.num
        self._ring(self.used + 4 + 8 * slot, 8)[:] = _USED_ELEM.pack(chain.head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._ring(self.used + 2, 2)[:] = _U16.pack(self.used_idx)
        if self.log is not None:
            for b in chain.writable:
                self.log.mark(b.addr, b.length)
            if self.log_used is not None:
                self.log.mark(self.log_used + 2, 2)
                self.log.mark(self.log_used + 4 + 8 * slot, 8)

    def notify(self) -> None:
        """Interrupt the guest unless it asked us not to."""
        if self.call_fd is None or self.mem is None:
            return
        flags = int(self.mem.unpack(_U16, self.avail, user=True)[0])
        if not flags & VIRTQ_AVAIL_F_NO_INTERRUPT:
            with contextlib.suppress(OSError):
                os.eventfd_write(self.call_fd, 1)

    def drain_kick(self) -> None:
        if self.kick_fd is not None:
            with contextlib.suppress(BlockingIOError, OSError):
                os.eventfd_read(self.kick_fd)
