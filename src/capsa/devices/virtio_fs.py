"""The virtio-fs device: FUSE requests from the guest's virtqueues to a :class:`SharedFs`.

Queue 0 is the high-priority queue (FORGET), the others carry requests; both are served
the same way. Each descriptor chain holds one request in its readable buffers and room
for the reply in its writable ones. READ and WRITE data move straight between guest
memory and the host file (``preadv``/``pwritev`` on views of guest RAM): no copy of the
payload is made in Python.
"""

from __future__ import annotations

import errno
import logging
import os

from capsa.devices import fuse
from capsa.devices.fuse import Body, FuseError, Op
from capsa.devices.guest_memory import DeviceError
from capsa.devices.shared_fs import MAX_IO, SharedFs
from capsa.devices.vhost_user import Device
from capsa.devices.virtqueue import Chain, VirtQueue

log = logging.getLogger("capsa.virtio_fs")

IO_HEAD = fuse.IN_HEADER.size + fuse.READ_IN.size  # header + read_in/write_in
MAX_REQUEST = MAX_IO + 64 * 1024  # the largest request we accept (a 1 MiB write + slack)


def slice_views(views: list[memoryview], start: int, length: int) -> list[memoryview]:
    """The views covering bytes ``start .. start+length`` of the concatenation of ``views``."""
    out: list[memoryview] = []
    pos = 0
    end = start + length
    for v in views:
        lo, hi = max(start, pos), min(end, pos + len(v))
        if lo < hi:
            out.append(v[lo - pos : hi - pos])
        pos += len(v)
        if pos >= end:
            break
    return out


def gather(views: list[memoryview], length: int) -> bytes:
    return b"".join(bytes(v) for v in slice_views(views, 0, length))


def scatter(views: list[memoryview], data: bytes) -> int:
    pos = 0
    for v in views:
        if pos >= len(data):
            break
        n = min(len(v), len(data) - pos)
        v[:n] = data[pos : pos + n]
        pos += n
    return pos


class VirtioFsDevice(Device):
    """virtio device 26, one share."""

    def __init__(self, fs: SharedFs, request_queues: int = 1) -> None:
        self.fs = fs
        self.num_queues = 1 + request_queues
        self.requests = 0

    def queue_kicked(self, queue: VirtQueue) -> None:
        while (chain := queue.pop()) is not None:
            try:
                written = self._serve(queue, chain)
            except DeviceError:
                raise
            except Exception:  # a bug costs this request (answered empty), not the queue
                log.exception("virtio-fs request failed")
                written = 0
            queue.push(chain, written)
            self.requests += 1
        queue.notify()

    def reset(self) -> None:
        """The guest driver went away: its inodes and open files with it."""
        self.fs.destroy(None, None)

    def _serve(self, queue: VirtQueue, chain: Chain) -> int:
        """Handle one request; returns how many bytes of reply were written."""
        assert queue.mem is not None
        ins = [queue.mem.view(b.addr, b.length) for b in chain.readable]
        outs = [queue.mem.view(b.addr, b.length) for b in chain.writable]
        total = sum(len(v) for v in ins)
        if total > MAX_REQUEST:
            raise DeviceError(f"FUSE request of {total} bytes")
        head = gather(ins, min(total, IO_HEAD))
        try:
            header = fuse.parse_header(head, total)
        except FuseError as e:
            log.warning("dropping a malformed FUSE request: %s", e)
            return 0
        if header.opcode == Op.READ:
            return self._read(header, gather(ins, total), outs)
        if header.opcode == Op.WRITE:
            reply = self._write(header, head, slice_views(ins, IO_HEAD, total - IO_HEAD))
        else:
            reply = self.fs.handle(gather(ins, total))
        return 0 if reply is None else self._put(header, reply, outs)

    def _put(self, header: fuse.Header, reply: bytes, outs: list[memoryview]) -> int:
        if len(reply) > sum(len(v) for v in outs):
            reply = fuse.pack_reply(header.unique, error=errno.ERANGE)
        return scatter(outs, reply)

    def _read(self, header: fuse.Header, data: bytes, outs: list[memoryview]) -> int:
        """READ straight into the guest's buffers, after the 16-byte reply header."""
        hdr = fuse.OUT_HEADER.size
        try:
            self.fs.admit(header)
            fd, offset, size = self.fs.read_request(Body(data))
            room = sum(len(v) for v in outs) - hdr
            if room < 0:
                raise DeviceError("no room for a FUSE reply header")
            n = 0
            if size:
                n = os.preadv(fd, slice_views(outs, hdr, min(size, room)), offset)
        except (FuseError, OSError) as e:
            reply = self.fs.error_reply(header, e)
            return 0 if reply is None else self._put(header, reply, outs)
        scatter(outs, fuse.OUT_HEADER.pack(hdr + n, 0, header.unique))
        return hdr + n

    def _write(self, header: fuse.Header, head: bytes, data: list[memoryview]) -> bytes | None:
        """WRITE straight from the guest's buffers."""
        try:
            self.fs.admit(header)
            fd, offset, size = self.fs.write_request(Body(head))
            if size != sum(len(v) for v in data):
                raise FuseError(errno.EINVAL, "write data does not match its size")
            n = os_pwritev(fd, data, offset) if size else 0
        except (FuseError, OSError) as e:
            return self.fs.error_reply(header, e)
        return fuse.pack_reply(header.unique, fuse.WRITE_OUT.pack(n, 0))


def os_pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
    """Write all of ``buffers`` (pwritev may stop short, e.g. on a full disk)."""
    total = sum(len(b) for b in buffers)
    done = os.pwritev(fd, buffers, offset)
    while done < total:
        rest = slice_views(buffers, done, total - done)
        n = os.pwritev(fd, rest, offset + done)
        if n == 0:
            break
        done += n
    return done
