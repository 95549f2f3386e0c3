"""The virtio-fs device: FUSE requests from the guest's virtqueues to a :class:`SharedFs`.

Queue 0 is the high-priority queue (FORGET), the others carry requests; both are served
the same way. Each descriptor chain holds one request in its readable buffers and room
for the reply in its writable ones. READ and WRITE data move straight between guest
memory and the host file (``preadv``/``pwritev`` on views of guest RAM): no copy of the
payload is made in Python.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from capsa.devices import fuse
from capsa.devices.fuse import Body, FuseError, Op
from capsa.devices.guest_memory import DeviceError
from capsa.devices.shared_fs import MAX_IO, SharedFs
from capsa.devices.vhost_user import (
    PROTOCOL_F_DEVICE_STATE,
    PROTOCOL_F_LOG_SHMFD,
    Device,
)
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
    """virtio device 26, one share.

    Requests are answered in order on the event loop, except FSYNC, which can block for
    long: it runs on a worker thread (on a duplicate of the file's descriptor, so a RELEASE
    cannot pull it away) and returns its chain when done, while later requests go on being
    served. READ and WRITE of up to 1 MiB are served inline: handing them to a thread and
    back cost more than it overlapped (sequential read 248 -> 375 MB/s, write 164 -> 184
    inline, alternating runs under TCG), and the guest waits for each of them anyway.
    """

    migratable = True
    protocol_features = Device.protocol_features | PROTOCOL_F_LOG_SHMFD | PROTOCOL_F_DEVICE_STATE

    def __init__(self, fs: SharedFs, request_queues: int = 1, workers: int = 4) -> None:
        self.fs = fs
        self.num_queues = 1 + request_queues
        self.requests = 0
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        # Requests on workers: the queue and chain each one answers.
        self._pending: dict[Future[int], tuple[VirtQueue, Chain]] = {}
        self._generation = 0  # bumped on reset: late completions are dropped

    def queue_kicked(self, queue: VirtQueue) -> None:
        while (chain := queue.pop()) is not None:
            try:
                written = self._serve(queue, chain)
            except DeviceError:
                raise
            except Exception:  # a bug costs this request (answered empty), not the queue
                log.exception("virtio-fs request failed")
                written = 0
            if written is not None:
                queue.push(chain, written)
            self.requests += 1
        queue.notify()

    def stopped(self, queue: VirtQueue) -> None:
        """QEMU stops the queue (the VM pauses, or is about to be saved): finish what the
        workers do for it and return those chains. The FUSE session itself lives on: the
        guest keeps its mount across the pause (or in the saved state)."""
        mine = [f for f, (q, _) in self._pending.items() if q is queue]
        wait(mine, timeout=30)
        for future in mine:
            if future.done():
                self._complete(queue, self._pending[future][1], future, self._generation)
        if queue.ready:
            queue.notify()

    def reset(self) -> None:
        """The guest driver went away: its inodes and open files with it."""
        self._generation += 1
        wait(list(self._pending), timeout=10)
        self._pending.clear()
        self.fs.destroy(None, None)

    def save_state(self) -> bytes:
        return self.fs.export_state()

    def load_state(self, data: bytes) -> None:
        try:
            self.fs.import_state(data)
        except ValueError as e:
            raise DeviceError(f"bad virtio-fs state: {e}") from None

    def close(self) -> None:
        self.reset()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    # -- worker threads ---------------------------------------------------------------------

    def _offload(self, queue: VirtQueue, chain: Chain, job: Callable[[], int]) -> bool:
        """Run ``job`` on a worker and return ``chain`` when it is done; False when there is
        no event loop to come back to (then the caller runs it inline)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="virtio-fs")
        future = self._pool.submit(job)
        self._pending[future] = (queue, chain)
        generation = self._generation

        def done(f: Future[int]) -> None:
            loop.call_soon_threadsafe(self._complete, queue, chain, f, generation)

        future.add_done_callback(done)
        return True

    def _complete(self, queue: VirtQueue, chain: Chain, f: Future[int], generation: int) -> None:
        if self._pending.pop(f, None) is None:
            return  # already returned when the queue stopped
        if generation != self._generation or not queue.ready:
            return  # the device was reset meanwhile: that chain is no longer ours to return
        try:
            written = f.result()
        except Exception:
            log.exception("virtio-fs request failed on a worker")
            written = 0
        queue.push(chain, written)
        queue.notify()

    # -- requests ---------------------------------------------------------------------------

    def _serve(self, queue: VirtQueue, chain: Chain) -> int | None:
        """Handle one request: bytes of reply written, or None when a worker finishes it."""
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
        if header.opcode not in (Op.READ, Op.WRITE, Op.FSYNC):
            reply = self.fs.answer(header, gather(ins, total))
            return 0 if reply is None else self._put(header, reply, outs)
        try:
            self.fs.admit(header)
            if header.opcode == Op.READ:
                job = self._read(header, gather(ins, total), outs)
            elif header.opcode == Op.WRITE:
                job = self._write(header, head, slice_views(ins, IO_HEAD, total - IO_HEAD), outs)
            else:
                job = self._fsync(header, gather(ins, total), outs)
        except (FuseError, OSError) as e:
            reply = self.fs.error_reply(header, e)
            return 0 if reply is None else self._put(header, reply, outs)
        if job.offload and self._offload(queue, chain, job):
            return None
        return job()

    def _put(self, header: fuse.Header, reply: bytes, outs: list[memoryview]) -> int:
        if len(reply) > sum(len(v) for v in outs):
            reply = fuse.pack_reply(header.unique, error=errno.ERANGE)
        return scatter(outs, reply)

    def _read(self, header: fuse.Header, data: bytes, outs: list[memoryview]) -> Job:
        """READ straight into the guest's buffers, after the 16-byte reply header."""
        hdr = fuse.OUT_HEADER.size
        fd, offset, size = self.fs.read_request(Body(data))
        room = sum(len(v) for v in outs) - hdr
        if room < 0:
            raise DeviceError("no room for a FUSE reply header")
        views = slice_views(outs, hdr, min(size, room))

        def run(fd: int) -> int:
            n = os.preadv(fd, views, offset) if views else 0
            scatter(outs, fuse.OUT_HEADER.pack(hdr + n, 0, header.unique))
            return hdr + n

        return Job(self, header, outs, fd, run, offload=False)

    def _write(
        self, header: fuse.Header, head: bytes, data: list[memoryview], outs: list[memoryview]
    ) -> Job:
        """WRITE straight from the guest's buffers."""
        fd, offset, size = self.fs.write_request(Body(head))
        if size != sum(len(v) for v in data):
            raise FuseError(errno.EINVAL, "write data does not match its size")

        def run(fd: int) -> int:
            n = os_pwritev(fd, data, offset) if size else 0
            return scatter(outs, fuse.pack_reply(header.unique, fuse.WRITE_OUT.pack(n, 0)))

        return Job(self, header, outs, fd, run, offload=False)

    def _fsync(self, header: fuse.Header, data: bytes, outs: list[memoryview]) -> Job:
        fd, datasync = self.fs.fsync_request(Body(data))

        def run(fd: int) -> int:
            os.fdatasync(fd) if datasync else os.fsync(fd)
            return scatter(outs, fuse.pack_reply(header.unique))

        return Job(self, header, outs, fd, run, offload=True)


class Job:
    """One READ, WRITE or FSYNC, ready to run here or on a worker."""

    def __init__(
        self,
        device: VirtioFsDevice,
        header: fuse.Header,
        outs: list[memoryview],
        fd: int,
        run: Callable[[int], int],
        offload: bool,
    ) -> None:
        self.device, self.header, self.outs = device, header, outs
        self.fd, self.run, self.offload = fd, run, offload
        # On a worker the descriptor is a duplicate: a RELEASE racing with it closes only
        # the original, and a reused number can never receive this request's data.
        self._dup = os.dup(fd) if offload else None

    def __call__(self) -> int:
        fd = self.fd if self._dup is None else self._dup
        try:
            return self.run(fd)
        except OSError as e:
            reply = self.device.fs.error_reply(self.header, e)
            return 0 if reply is None else self.device._put(self.header, reply, self.outs)
        finally:
            if self._dup is not None:
                os.close(self._dup)
                self._dup = None


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
