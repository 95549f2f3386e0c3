"""The vhost-user protocol, back-end side: QEMU connects, hands us guest memory and the
virtqueues, and kicks us through eventfds. Device logic lives in a :class:`Device`.

Only what capsa's devices need is implemented: features, owner, memory table, vring
set-up, enable, config space, REPLY_ACK and, for devices whose state can migrate, the
dirty log (``VHOST_F_LOG_ALL``, ``SET_LOG_BASE``) and the device state transfer
(``SET_DEVICE_STATE_FD``, ``CHECK_DEVICE_STATE``). Every message is size-checked before
use.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from capsa.devices.guest_memory import MAX_REGIONS, DeviceError, DirtyLog, GuestMemory
from capsa.devices.virtqueue import VirtQueue

log = logging.getLogger("capsa.vhost_user")

VHOST_USER_VERSION = 1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
VIRTIO_F_VERSION_1 = 1 << 32
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
VHOST_F_LOG_ALL = 1 << 26
PROTOCOL_F_MQ = 1 << 0
PROTOCOL_F_LOG_SHMFD = 1 << 1
PROTOCOL_F_REPLY_ACK = 1 << 3
PROTOCOL_F_CONFIG = 1 << 9
PROTOCOL_F_DEVICE_STATE = 1 << 19
VHOST_VRING_F_LOG = 1
VRING_NOFD = 0x100
VRING_INDEX = 0xFF
MAX_PAYLOAD = 4096
MAX_FDS = 8

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
REGION = struct.Struct("<QQQQ")
CONFIG_HDR = struct.Struct("<III")
LOG = struct.Struct("<QQ")  # mmap size, offset
TRANSFER = struct.Struct("<II")  # direction (0 save, 1 load), migration phase (0 stopped)
MAX_LOG_BYTES = 1 << 30  # a bit per 4 KiB page: enough for 32 TiB of guest memory
MAX_DEVICE_STATE = 64 << 20
SAVE, LOAD = 0, 1
PHASE_STOPPED = 0


class Req:
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    GET_CONFIG = 24
    SET_CONFIG = 25
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int]

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


class Device:
    """What a vhost-user device implements on top of :class:`VhostUserBackend`."""

    num_queues = 1
    device_features = 0
    protocol_features = PROTOCOL_F_MQ | PROTOCOL_F_REPLY_ACK
    # Whether the device's state travels in QEMU's migration stream (save_state and
    # load_state); such a device also offers the dirty log QEMU requires for migration.
    migratable = False

    def config(self) -> bytes:
        return b""

    def queue_kicked(self, queue: VirtQueue) -> None:
        """The guest made buffers available in ``queue``."""

    def started(self, queue: VirtQueue) -> None:
        """``queue`` has become usable."""

    def stopped(self, queue: VirtQueue) -> None:
        """QEMU stops ``queue`` (GET_VRING_BASE): every chain taken from it must be
        returned before this returns. By default the device starts over."""
        self.reset()

    def reset(self) -> None:
        """The VMM stopped the device (or went away): drop every guest-side state."""

    def save_state(self) -> bytes:
        """The device's state, for a migratable device stopped by QEMU."""
        raise DeviceError("this device has no state to migrate")

    def load_state(self, data: bytes) -> None:
        """Take over the state ``save_state`` gave (on another host or in another process)."""
        raise DeviceError("this device has no state to migrate")


def encode_message(request: int, payload: bytes = b"", flags: int = VHOST_USER_VERSION) -> bytes:
    return HEADER.pack(request, flags, len(payload)) + payload


def recv_message(sock: socket.socket) -> Message | None:
    """One message from QEMU (None at EOF); fds travel with the header."""
    fds = array.array("i")
    data, ancdata, _, _ = sock.recvmsg(HEADER.size, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    if not data:
        return None
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
    try:
        while len(data) < HEADER.size:
            more = sock.recv(HEADER.size - len(data))
            if not more:
                raise DeviceError("truncated message header")
            data += more
        request, flags, size = HEADER.unpack(data)
        if size > MAX_PAYLOAD:
            raise DeviceError(f"message payload of {size} bytes is too large")
        payload = b""
        while len(payload) < size:
            more = sock.recv(size - len(payload))
            if not more:
                raise DeviceError("truncated message payload")
            payload += more
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Message(request, flags, payload, list(fds))


class VhostUserBackend:
    """Drives one device for one QEMU connection."""

    def __init__(self, device: Device, sock: socket.socket) -> None:
        self.device = device
        self.sock = sock
        self.mem = GuestMemory()
        self.queues = [VirtQueue(i) for i in range(device.num_queues)]
        self.features = 0
        self.protocol_features = 0
        self.owned = False
        # Called with (fd, queue) when a kick fd is installed; the loop watches it.
        self.on_kick_fd: Callable[[int, VirtQueue], None] = lambda fd, q: None
        self.on_kick_fd_removed: Callable[[int], object] = lambda fd: None
        self._mem_fds: list[int] = []
        self._claimed: set[int] = set()
        self.log: DirtyLog | None = None
        # A device state transfer agreed on in the last reply: (direction, pipe fd).
        self._transfer: tuple[int, int] | None = None
        self._transfer_ok = True

    @property
    def offered_features(self) -> int:
        features = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES
        if self.device.migratable:
            features |= VHOST_F_LOG_ALL
        return features | self.device.device_features

    def handle(self, msg: Message) -> None:
        """Process one message; DeviceError means QEMU sent something invalid."""
        try:
            reply = self._dispatch(msg)
        finally:
            unused = [fd for fd in msg.fds if fd not in self._claimed]
            for fd in unused:
                os.close(fd)
            self._claimed = set()
        if reply is not None:
            self.sock.sendall(encode_message(msg.request, reply, VHOST_USER_VERSION | FLAG_REPLY))
        elif msg.need_reply and self.protocol_features & PROTOCOL_F_REPLY_ACK:
            self.sock.sendall(
                encode_message(msg.request, U64.pack(0), VHOST_USER_VERSION | FLAG_REPLY)
            )
        if self._transfer is not None:
            # After the reply: QEMU reads (or writes) the pipe only once it has it.
            direction, fd = self._transfer
            self._transfer = None
            self._transfer_ok = self._move_state(direction, fd)

    def _claim(self, msg: Message, count: int) -> list[int]:
        if len(msg.fds) != count:
            raise DeviceError(f"request {msg.request} carried {len(msg.fds)} fds, wanted {count}")
        self._claimed = set(msg.fds)
        return msg.fds

    def _u64(self, msg: Message) -> int:
        if len(msg.payload) != U64.size:
            raise DeviceError(f"request {msg.request}: payload is not a u64")
        return int(U64.unpack(msg.payload)[0])

    def _queue(self, index: int) -> VirtQueue:
        if not 0 <= index < len(self.queues):
            raise DeviceError(f"no virtqueue {index}")
        return self.queues[index]

    def _state(self, msg: Message) -> tuple[VirtQueue, int]:
        if len(msg.payload) != VRING_STATE.size:
            raise DeviceError("bad vring state payload")
        index, num = VRING_STATE.unpack(msg.payload)
        return self._queue(index), num

    def _dispatch(self, msg: Message) -> bytes | None:
        r = msg.request
        if r == Req.GET_FEATURES:
            return U64.pack(self.offered_features)
        if r == Req.SET_FEATURES:
            self.features = self._u64(msg) & self.offered_features
            self._apply_log()
            return None
        if r == Req.GET_PROTOCOL_FEATURES:
            return U64.pack(self.device.protocol_features)
        if r == Req.SET_PROTOCOL_FEATURES:
            self.protocol_features = self._u64(msg) & self.device.protocol_features
            return None
        if r == Req.GET_QUEUE_NUM:
            return U64.pack(len(self.queues))
        if r == Req.SET_OWNER:
            self.owned = True
            return None
        if r == Req.RESET_OWNER:
            self.reset()
            return None
        if r == Req.SET_MEM_TABLE:
            self._set_mem_table(msg)
            return None
        if r == Req.SET_VRING_NUM:
            q, num = self._state(msg)
            q.set_num(num)
            return None
        if r == Req.SET_VRING_BASE:
            q, base = self._state(msg)
            if base > 0xFFFF:
                raise DeviceError("vring base out of range")
            q.last_avail = base
            return None
        if r == Req.GET_VRING_BASE:
            q, _ = self._state(msg)
            self.device.stopped(q)
            base = q.stop()
            self._drop_kick(q)
            return VRING_STATE.pack(q.index, base)
        if r == Req.SET_VRING_ADDR:
            if len(msg.payload) != VRING_ADDR.size:
                raise DeviceError("bad vring address payload")
            index, flags, desc, used, avail, log_addr = VRING_ADDR.unpack(msg.payload)
            q = self._queue(index)
            q.desc, q.used, q.avail = desc, used, avail
            q.log_used = log_addr if flags & VHOST_VRING_F_LOG else None
            return None
        if r == Req.SET_LOG_BASE:
            return self._set_log_base(msg)
        if r == Req.SET_LOG_FD:
            self._claim(msg, 1)
            os.close(msg.fds[0])  # we never signal log changes: QEMU syncs the bitmap itself
            return None
        if r == Req.SET_DEVICE_STATE_FD:
            return self._set_device_state_fd(msg)
        if r == Req.CHECK_DEVICE_STATE:
            return U64.pack(0 if self._transfer_ok else 1)
        if r in (Req.SET_VRING_KICK, Req.SET_VRING_CALL, Req.SET_VRING_ERR):
            self._set_vring_fd(msg)
            return None
        if r == Req.SET_VRING_ENABLE:
            q, enable = self._state(msg)
            q.enabled = bool(enable)
            return None
        if r == Req.GET_CONFIG:
            return self._get_config(msg)
        if r == Req.SET_CONFIG:
            return None  # our config spaces are read-only
        raise DeviceError(f"unsupported vhost-user request {r}")

    def _set_mem_table(self, msg: Message) -> None:
        if len(msg.payload) < 8:
            raise DeviceError("short memory table")
        (nregions,) = struct.unpack_from("<I", msg.payload)
        if not 0 < nregions <= MAX_REGIONS or len(msg.payload) != 8 + nregions * REGION.size:
            raise DeviceError(f"bad memory table ({nregions} regions)")
        fds = self._claim(msg, nregions)
        for q in self.queues:
            q.mem = None
        self.mem.close()
        for fd in self._mem_fds:
            os.close(fd)
        self._mem_fds = list(fds)
        self.mem = GuestMemory()
        for i, fd in enumerate(fds):
            gpa, size, user, offset = REGION.unpack_from(msg.payload, 8 + i * REGION.size)
            self.mem.add_region(fd, gpa, size, user, offset)
        for q in self.queues:
            if q.started:
                q.mem = self.mem

    def _set_log_base(self, msg: Message) -> bytes:
        if not self.device.migratable or len(msg.payload) != LOG.size:
            raise DeviceError("unexpected dirty log")
        size, offset = LOG.unpack(msg.payload)
        (fd,) = self._claim(msg, 1)
        try:
            if not 0 < size <= MAX_LOG_BYTES:
                raise DeviceError(f"dirty log of {size} bytes")
            log = DirtyLog(fd, size, offset)
        finally:
            os.close(fd)
        if self.log is not None:
            self.log.close()
        self.log = log
        self._apply_log()
        return U64.pack(0)

    def _apply_log(self) -> None:
        """Log writes to guest memory while QEMU asks for it (VHOST_F_LOG_ALL)."""
        active = self.log if self.features & VHOST_F_LOG_ALL else None
        for q in self.queues:
            q.log = active

    def _set_device_state_fd(self, msg: Message) -> bytes:
        if not self.device.migratable or len(msg.payload) != TRANSFER.size:
            raise DeviceError("unexpected device state transfer")
        direction, phase = TRANSFER.unpack(msg.payload)
        (fd,) = self._claim(msg, 1)
        if (
            direction not in (SAVE, LOAD)
            or phase != PHASE_STOPPED
            or any(q.started for q in self.queues)
        ):
            os.close(fd)
            return U64.pack(1 | VRING_NOFD)  # refused: QEMU fails the migration
        self._transfer = (direction, fd)
        return U64.pack(VRING_NOFD)  # accepted, on QEMU's own pipe

    def _move_state(self, direction: int, fd: int) -> bool:
        """Write our state into the pipe (save) or read and apply it (load)."""
        try:
            os.set_blocking(fd, True)
            if direction == SAVE:
                data = self.device.save_state()
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                return True
            chunks, size = [], 0
            while chunk := os.read(fd, 1 << 16):
                size += len(chunk)
                if size > MAX_DEVICE_STATE:
                    raise DeviceError(f"device state larger than {MAX_DEVICE_STATE} bytes")
                chunks.append(chunk)
            self.device.load_state(b"".join(chunks))
            return True
        except (DeviceError, OSError, ValueError) as e:
            log.error("device state transfer failed: %s", e)
            return False
        finally:
            os.close(fd)

    def _set_vring_fd(self, msg: Message) -> None:
        value = self._u64(msg)
        q = self._queue(value & VRING_INDEX)
        fd = None if value & VRING_NOFD else self._claim(msg, 1)[0]
        if msg.request == Req.SET_VRING_KICK:
            self._drop_kick(q)
            q.kick_fd = fd
            if fd is not None:
                os.set_blocking(fd, False)
                # A kick fd means the ring is live (QEMU kicks right away, even before
                # SET_VRING_ENABLE).
                q.start(self.mem)
                self.device.started(q)
                self.on_kick_fd(fd, q)
        elif msg.request == Req.SET_VRING_CALL:
            if q.call_fd is not None:
                os.close(q.call_fd)
            q.call_fd = fd
        elif fd is not None:
            os.close(fd)  # error notifications: we never report any

    def _drop_kick(self, q: VirtQueue) -> None:
        if q.kick_fd is not None:
            self.on_kick_fd_removed(q.kick_fd)
            os.close(q.kick_fd)
            q.kick_fd = None

    def _get_config(self, msg: Message) -> bytes:
        if len(msg.payload) < CONFIG_HDR.size:
            raise DeviceError("short config request")
        offset, size, flags = CONFIG_HDR.unpack_from(msg.payload)
        space = self.device.config()
        if offset + size > len(space):
            raise DeviceError(f"config read {offset}+{size} beyond {len(space)} bytes")
        return CONFIG_HDR.pack(offset, size, flags) + space[offset : offset + size]

    def kicked(self, q: VirtQueue) -> None:
        q.drain_kick()
        if q.failed is not None or not q.started:
            return
        try:
            self.device.queue_kicked(q)
        except DeviceError as e:
            log.error("virtqueue %d failed: %s", q.index, e)
            q.fail(str(e))

    def reset(self) -> None:
        for q in self.queues:
            q.stop()
            self._drop_kick(q)
            if q.call_fd is not None:
                os.close(q.call_fd)
                q.call_fd = None
        self.device.reset()

    def close(self) -> None:
        self.reset()
        if self.log is not None:
            self.log.close()
            self.log = None
        self.mem.close()
        for fd in self._mem_fds:
            os.close(fd)
        self._mem_fds = []
