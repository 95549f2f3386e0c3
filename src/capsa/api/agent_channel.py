"""The agent channel, kept apart from what is asked over it (as ``qemu.qmp`` keeps its
protocol apart from its client): frames in and out, request ids, one reader task that
routes every frame to its call, and the agent's unsolicited messages (its hello, the main
process's exit). See :mod:`capsa.guest.protocol` for the wire format.

A :class:`Call` is one request and everything that answers it; the operations
(:mod:`capsa.api.agent`) and processes (:mod:`capsa.api.process`) are written on calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import Mapping
from typing import Any, TypeGuard

from capsa.errors import (
    AgentDisconnected,
    AgentError,
    AgentLimitExceeded,
    AgentProtocolError,
    CapsaTimeout,
)
from capsa.guest.protocol import VERSION, Decoder, ProtocolError, encode

Header = dict[str, Any]
Frame = tuple[Header, bytes]
# A streamed read keeps at most this many frames queued before the channel is paused.
READ_WINDOW = 32
# The longest the channel stays paused for a streamed read whose reader takes nothing: then
# the stream is dropped (its reader gets CapsaTimeout), so a reader that went away without
# closing its stream cannot stall every other call forever.
STALL_TIMEOUT = 30.0
# The most answer bytes a call that never pauses the channel may hold unread; past it the
# call fails. Its readers (commands, started processes, one-answer requests) take frames as
# they come, so only a guest flooding the host's memory gets there.
MAX_BACKLOG = 64 * 1024 * 1024
# How long close() lets unsent frames drain before dropping them.
CLOSE_TIMEOUT = 2.0
# The main process's exit code as the guest reports it: a C int.
_EXIT_CODES = range(-(2**31), 2**31)
# Every kind the agent may send; anything else ends the channel as corrupted.
REPLY_KINDS = frozenset({"hello", "res", "err", "data", "out", "exit", "event"})


class Call:
    """One request: frames for it are queued here in arrival order.

    A ``bounded`` call queues at most :data:`READ_WINDOW` frames: the channel waits for its
    reader (at most the channel's ``stall_timeout``) before routing more. Any other call
    queues at most :data:`MAX_BACKLOG` body bytes unread, or fails."""

    def __init__(self, channel: AgentChannel, rid: int, bounded: bool) -> None:
        self.channel = channel
        self.id = rid
        self.bounded = bounded
        self._frames: asyncio.Queue[Frame | BaseException] = asyncio.Queue(
            READ_WINDOW if bounded else 0
        )
        self._backlog = 0
        # Once set, raised by every next() after the frames already queued.
        self._end: BaseException | None = None
        # While open, the sandbox is in use (an idle timeout waits). Off for calls that
        # merely follow something: a code context between cells, a background process.
        self.keeps_busy = True

    async def next(self) -> Frame:
        """The next frame for this request (the channel's failure, if it ended)."""
        if self._end is not None and self._frames.empty():
            raise self._end
        item = await self._frames.get()
        if isinstance(item, BaseException):
            raise item
        self._backlog -= len(item[1])
        return item

    async def result(self) -> Header:
        """Skip to the final answer (``res``) and return it; an ``err`` raises."""
        while True:
            header, _ = await self.next()
            if header["t"] in ("res", "err"):
                return raise_if_error(header)

    def send(self, kind: str, body: bytes = b"", **fields: Any) -> None:
        """A frame of ``kind`` for this request (stream data, stdin, a signal...)."""
        self.channel.send({"t": kind, "id": self.id, **fields}, body)

    async def drain(self) -> None:
        await self.channel.drain()

    def close(self) -> None:
        """Forget this request: frames that still arrive for it are dropped."""
        self.channel.forget(self.id)
        # Emptying the queue also frees the channel's reader if it waits for room here.
        while not self._frames.empty():
            self._frames.get_nowait()
        self._backlog = 0

    @property
    def backlog(self) -> int:
        """Body bytes queued and not yet read."""
        return self._backlog

    @property
    def has_room(self) -> bool:
        return not self._frames.full()

    def _accept(self, frame: Frame) -> None:
        self._frames.put_nowait(frame)
        self._backlog += len(frame[1])

    async def _accept_when_room(self, frame: Frame) -> None:
        await self._frames.put(frame)
        self._backlog += len(frame[1])

    def _fail(self, error: BaseException) -> None:
        """End this call with ``error`` (after what is queued); never blocks, never raises."""
        if self._end is None:
            self._end = error
        if not self._frames.full():
            self._frames.put_nowait(error)  # wakes a reader waiting on an empty queue


def raise_if_error(header: Header) -> Header:
    if header["t"] == "err":
        errno = header.get("errno")
        raise AgentError(str(header.get("msg", "agent error")), errno if _is_int(errno) else None)
    return header


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


class AgentChannel:
    """One byte stream to a guest agent, shared by any number of concurrent calls.

    Whatever the agent sends that breaks the protocol (a malformed or over-deep frame, an
    unknown kind, a frame without a request id, a bad event) ends the channel: every
    pending and later call fails with :class:`~capsa.errors.AgentProtocolError`.
    ``stall_timeout`` bounds how long one unread stream may pause the channel (see
    :class:`Call`)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._calls: dict[int, Call] = {}
        self._hello: asyncio.Future[Header] = asyncio.get_running_loop().create_future()
        self._exit_code: int | None = None
        self._exited = asyncio.Event()
        self._closed: BaseException | None = None
        self.stall_timeout = STALL_TIMEOUT
        # When a frame last went either way (the event loop's clock): idle timeouts.
        self.last_active = asyncio.get_running_loop().time()
        self._task = asyncio.ensure_future(self._read_loop())

    @classmethod
    async def connect_socket(cls, sock: socket.socket) -> AgentChannel:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer)

    # -- frames in ------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        error: BaseException = AgentDisconnected("agent channel closed")
        try:
            await self._read_frames()
        except (OSError, asyncio.CancelledError):
            pass
        except ProtocolError as e:
            error = AgentProtocolError(f"agent channel corrupted: {e}")
        except Exception as e:
            # Whatever else a frame made decoding or routing raise: the stream can no
            # longer be trusted, and no call may be left waiting on it.
            error = AgentProtocolError(f"agent channel corrupted: {type(e).__name__}: {e}")
        self._fail_all(error)

    async def _read_frames(self) -> None:
        decoder = Decoder()
        while data := await self._reader.read(1 << 20):
            for header, body in decoder.feed(data):
                await self._route(header, body)

    def _fail_all(self, error: BaseException) -> None:
        self._closed = error
        if not self._hello.done():
            self._hello.set_exception(error)
            self._hello.exception()  # retrieved: nobody may ever wait for readiness
        for call in self._calls.values():
            call._fail(error)
        self._calls.clear()
        self._exited.set()

    @property
    def busy(self) -> bool:
        """Whether a call that keeps the sandbox in use is open."""
        return any(call.keeps_busy for call in self._calls.values())

    async def _route(self, header: Header, body: bytes) -> None:
        self.last_active = asyncio.get_running_loop().time()
        kind = header.get("t")
        if kind not in REPLY_KINDS:
            raise ProtocolError(f"unknown frame kind {kind!r}")
        if kind == "hello":
            if not self._hello.done():
                self._hello.set_result(header)
            return
        rid = header.get("id")
        if not _is_int(rid):
            raise ProtocolError(f"a {kind} frame without a request id")
        if kind == "event":
            self._on_event(header, rid)
            # Each event is acknowledged: a guest sending events and never reading the
            # acks must pause its own channel, not grow this process's write buffer.
            await self.drain()
        elif (call := self._calls.get(rid)) is not None:
            await self._deliver(call, (header, body))

    async def _deliver(self, call: Call, frame: Frame) -> None:
        if not call.bounded:
            if call.backlog + len(frame[1]) > MAX_BACKLOG:
                unread = f"more than {MAX_BACKLOG} bytes of answers unread"
                self._drop(call, AgentLimitExceeded(f"request {call.id}: {unread}"))
            else:
                call._accept(frame)
        elif call.has_room:
            call._accept(frame)
        else:
            try:
                await asyncio.wait_for(call._accept_when_room(frame), self.stall_timeout)
            except TimeoutError:
                stalled = f"its stream was not read for {self.stall_timeout}s and was dropped"
                self._drop(call, CapsaTimeout(f"request {call.id}: {stalled}"))

    def _drop(self, call: Call, error: BaseException) -> None:
        self.forget(call.id)
        call._fail(error)

    def _on_event(self, header: Header, rid: int) -> None:
        event = header.get("event")
        if not isinstance(event, str):
            raise ProtocolError(f"an event frame names no event: {event!r}")
        if event == "exit":
            code = header.get("code")
            if not _is_int(code) or code not in _EXIT_CODES:
                raise ProtocolError(f"the main process's exit code is {code!r}")
            self._exit_code = code
            self._exited.set()
        self.send({"t": "ack", "id": rid})

    # -- frames out -----------------------------------------------------------------------

    def send(self, header: Header, body: bytes = b"") -> None:
        if self._closed is not None:
            raise self._closed
        self.last_active = asyncio.get_running_loop().time()
        self._writer.write(encode(header, body))

    async def drain(self) -> None:
        await self._writer.drain()

    def open(
        self,
        op: str,
        fields: Mapping[str, Any] | None = None,
        body: bytes = b"",
        *,
        bounded: bool = False,
    ) -> Call:
        """Send request ``op`` and return the call its answers arrive on (``bounded``: a
        stream the caller consumes as it goes, so the channel pauses if it falls behind)."""
        call = Call(self, next(self._ids), bounded)
        self._calls[call.id] = call
        try:
            self.send({"t": "req", "id": call.id, "op": op, **(fields or {})}, body)
        except BaseException:
            self._calls.pop(call.id, None)
            raise
        return call

    def forget(self, rid: int) -> None:
        self._calls.pop(rid, None)

    async def request(self, op: str, body: bytes = b"", **fields: Any) -> Header:
        """A request with one answer: its result header (an agent error raises)."""
        call = self.open(op, fields, body)
        try:
            await self.drain()
            return await call.result()
        finally:
            call.close()

    # -- the agent's lifecycle --------------------------------------------------------------

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait for the agent's hello (it is sent once, when the agent starts)."""
        try:
            hello = await asyncio.wait_for(asyncio.shield(self._hello), timeout)
        except TimeoutError:
            raise CapsaTimeout(f"agent not ready after {timeout}s") from None
        check_version(hello)

    def accept_hello(self, header: Header) -> None:
        """Take ``header`` as the agent's hello (a restored agent's answer to ``resume``
        stands in for the one it sent long ago, in the snapshot's past)."""
        check_version(header)
        if not self._hello.done():
            self._hello.set_result(header)

    @property
    def exit_code(self) -> int | None:
        """The main process's exit code, once the guest reported it."""
        return self._exit_code

    async def wait_exit(self) -> int | None:
        await self._exited.wait()
        return self._exit_code

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        self._writer.close()
        try:
            await asyncio.wait_for(asyncio.shield(self._writer.wait_closed()), CLOSE_TIMEOUT)
        except TimeoutError:
            # A closing stream first sends what is buffered: a guest that stopped reading
            # must not keep us waiting for that.
            self._writer.transport.abort()
        except Exception:
            pass


def check_version(header: Header) -> None:
    if header.get("v") != VERSION:
        raise AgentProtocolError(f"agent speaks protocol {header.get('v')}, we speak {VERSION}")
