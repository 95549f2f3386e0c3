"""The agent wire protocol, shared by the host client and the guest agent (stdlib only).

Version 1. The channel is one byte stream (a virtio-serial port) carrying frames:

    u32 BE  n          length of what follows (at most MAX_FRAME)
    u32 BE  h          length of the header (h <= n)
    h bytes header     UTF-8 JSON object: {"t": kind, "id": request id, ...}
    n-4-h   body       raw bytes (file data, process output); never encoded

Kinds, host -> guest: ``req`` (``op`` names the operation), ``data`` / ``end`` (a write
stream's chunks and its end), ``stdin`` / ``stdin_close`` / ``kill`` / ``resize`` (for a
started process). Guest -> host: ``hello`` (sent once when the agent starts: it is the
readiness signal, with the protocol version), ``res`` (success, result fields in the
header), ``err`` (``errno`` and ``msg``), ``data`` (a read stream's chunks), ``out``
(process output, ``fd`` 1 or 2), ``exit`` (a started process ended: ``code``,
``timed_out``), ``event`` (unsolicited: ``event: "exit"`` with the main process's
``code``). Every request has an id chosen by the host; every reply and stream message
carries it, so any number of requests run at once over the one channel.
"""

from __future__ import annotations

import errno
import io
import json
import os
import struct

VERSION = 1
AGENT_PORT_NAME = "org.capsa.agent.0"
MAX_FRAME = 2 * 1024 * 1024
CHUNK = 256 * 1024
# What one read asks for: a read returns what the port has, at most this.
READ_SIZE = 256 * 1024
MAX_NESTING = 32  # real headers nest two or three levels
_LEN = struct.Struct(">II")


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame."""


def encode(header: dict[str, object], body: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    n = 4 + len(head) + len(body)
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
    return _LEN.pack(n, len(head)) + head + body


def frame_prefix(header: dict[str, object], body_size: int) -> bytes:
    """A frame's lengths and header: what goes before a body of ``body_size`` bytes (so the
    body is written from where it lies, not copied into one frame first)."""
    head = json.dumps(header, separators=(",", ":")).encode()
    n = 4 + len(head) + body_size
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
    return _LEN.pack(n, len(head)) + head


class FrameReader:
    """Frames read from a descriptor into one buffer that is reused: a body is handed out
    as a view of that buffer, valid until the next :meth:`read`, so file data goes from the
    channel to its file with no copy in between (under emulation every copy shows)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        # FileIO.readinto: no list and no call through os per page (see _read_to).
        self._file = io.FileIO(fd, "rb", closefd=False)
        # A whole frame fits after the unparsed rest is moved to the front, with room to
        # read on.
        self._buf = bytearray(4 + MAX_FRAME + READ_SIZE)
        self._view = memoryview(self._buf)
        self._start = 0  # the first byte not parsed yet
        self._end = 0  # the end of what was read

    def read(self) -> int:
        """Read what the descriptor has, and on to the end of a frame begun (0: end of
        stream); frames() then gives them. A virtio-serial read returns one page at most
        (the buffer the host filled; a readv of page-sized pieces measured slower): the loop
        that collects a frame's pages is kept this tight on purpose."""
        target = self._frame_end()
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buf) - self._end < READ_SIZE or (target or 0) > len(self._buf):
            rest = self._end - self._start
            self._buf[:rest] = self._view[self._start : self._end]
            self._start, self._end = 0, rest
            target = self._frame_end()
        n = os.readv(self.fd, [self._view[self._end : target or self._end + READ_SIZE]])
        self._end += n
        if target is None:
            target = self._frame_end()
        if n and target is not None and self._end < target:
            n += self._read_to(target)
        return n

    def _read_to(self, target: int) -> int:
        """Read until ``target`` (the end of a frame) or the end of the stream."""
        readinto, view = self._file.readinto, self._view
        start = end = self._end
        target = min(target, len(self._buf))  # the rest after the next read() compacts
        try:
            while end < target:
                got = readinto(view[end:target])
                if not got:
                    if got is None:
                        raise BlockingIOError(errno.EAGAIN, "no data")
                    break
                end += got
        finally:  # an interrupted read keeps what came before it
            self._end = end
        return end - start

    def _frame_end(self) -> int | None:
        """Where the frame begun ends (None: its lengths are not read yet, or are bad: then
        frames() says so)."""
        if self._end - self._start < 8:
            return None
        n, h = _LEN.unpack_from(self._buf, self._start)
        if n > MAX_FRAME or n < 4 or h > n - 4:
            return None
        end: int = self._start + 4 + n
        return end

    def frames(self) -> list[tuple[dict[str, object], memoryview]]:
        """The complete frames read so far; their bodies are views (see the class)."""
        found = []
        while self._end - self._start >= 8:
            n, h = _LEN.unpack_from(self._buf, self._start)
            if n > MAX_FRAME or n < 4 or h > n - 4:
                raise ProtocolError(f"bad frame lengths (total {n}, header {h})")
            if self._end - self._start < 4 + n:
                break
            head = bytes(self._view[self._start + 8 : self._start + 8 + h])
            body = self._view[self._start + 8 + h : self._start + 4 + n]
            self._start += 4 + n
            found.append((_parse_header(head), body))
        return found

    def reset(self) -> None:
        """Drop everything unparsed (after a protocol error nothing can be resynchronized)."""
        self._start = self._end = 0


class Decoder:
    """Turns a byte stream into ``(header, body)`` frames; rejects anything malformed."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[dict[str, object], bytes]]:
        self._buf += data
        frames: list[tuple[dict[str, object], bytes]] = []
        while len(self._buf) >= 8:
            n, h = _LEN.unpack_from(self._buf)
            if n > MAX_FRAME or n < 4 or h > n - 4:
                raise ProtocolError(f"bad frame lengths (total {n}, header {h})")
            if len(self._buf) < 4 + n:
                break
            head = bytes(self._buf[8 : 8 + h])
            body = bytes(self._buf[8 + h : 4 + n])
            del self._buf[: 4 + n]
            frames.append((_parse_header(head), body))
        return frames

    @property
    def pending(self) -> int:
        return len(self._buf)


def _nesting(raw: bytes) -> int:
    """How deep arrays and objects nest in the JSON text ``raw`` (strings skipped)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def _parse_header(raw: bytes) -> dict[str, object]:
    # A header may be as long as a frame. Nested deep enough it would exhaust the parser's
    # stack, and a RecursionError caught inside the C decoder leaves the interpreter's
    # recursion accounting unreliable: refuse deep headers before parsing them.
    if _nesting(raw) > MAX_NESTING:
        raise ProtocolError(f"frame header nests deeper than {MAX_NESTING}")
    try:
        header = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"frame header is not JSON: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("t"), str):
        raise ProtocolError("frame header must be an object with a string 't'")
    rid = header.get("id", 0)
    if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid < 2**63:
        raise ProtocolError(f"bad request id {rid!r}")
    return header
