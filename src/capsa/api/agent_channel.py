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
from typing import Any

from capsa.errors import AgentDisconnected, AgentError, AgentProtocolError, CapsaTimeout
from capsa.guest.protocol import VERSION, Decoder, ProtocolError, encode

Header = dict[str, Any]
Frame = tuple[Header, bytes]
# A streamed read keeps at most this many frames queued before the channel is paused.
READ_WINDOW = 32
# Every kind the agent may send; anything else ends the channel as corrupted.
REPLY_KINDS = frozenset({"hello", "res", "err", "data", "out", "exit", "event"})


class Call:
    """One request: frames for it are queued here in arrival order."""

    def __init__(self, channel: AgentChannel, rid: int, bounded: bool) -> None:
        self.channel = channel
        self.id = rid
        self._frames: asyncio.Queue[Frame | BaseException] = asyncio.Queue(
            READ_WINDOW if bounded else 0
        )

    async def next(self) -> Frame:
        """The next frame for this request (the channel's failure, if it ended)."""
        item = await self._frames.get()
        if isinstance(item, BaseException):
            raise item
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

    async def _deliver(self, item: Frame | BaseException) -> None:
        await self._frames.put(item)

    def _fail(self, error: BaseException) -> None:
        self._frames.put_nowait(error)


def raise_if_error(header: Header) -> Header:
    if header["t"] == "err":
        errno = header.get("errno")
        raise AgentError(str(header.get("msg", "agent error")), errno if _is_int(errno) else None)
    return header


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class AgentChannel:
    """One byte stream to a guest agent, shared by any number of concurrent calls."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._calls: dict[int, Call] = {}
        self._hello: asyncio.Future[Header] = asyncio.get_running_loop().create_future()
        self._exit_code: int | None = None
        self._exited = asyncio.Event()
        self._closed: BaseException | None = None
        self._task = asyncio.ensure_future(self._read_loop())

    @classmethod
    async def connect_socket(cls, sock: socket.socket) -> AgentChannel:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer)

    # -- frames in ------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        decoder = Decoder()
        error: BaseException = AgentDisconnected("agent channel closed")
        try:
            while data := await self._reader.read(1 << 20):
                for header, body in decoder.feed(data):
                    await self._route(header, body)
        except ProtocolError as e:
            error = AgentProtocolError(f"agent channel corrupted: {e}")
        except (OSError, asyncio.CancelledError):
            pass
        self._fail_all(error)

    def _fail_all(self, error: BaseException) -> None:
        self._closed = error
        if not self._hello.done():
            self._hello.set_exception(error)
            self._hello.exception()  # retrieved: nobody may ever wait for readiness
        for call in self._calls.values():
            call._fail(error)
        self._calls.clear()
        self._exited.set()

    async def _route(self, header: Header, body: bytes) -> None:
        kind = header.get("t")
        if kind not in REPLY_KINDS:
            raise ProtocolError(f"unknown frame kind {kind!r}")
        if kind == "hello":
            if not self._hello.done():
                self._hello.set_result(header)
            return
        rid = header.get("id")
        if not isinstance(rid, int) or isinstance(rid, bool):
            raise ProtocolError(f"a {kind} frame without a request id")
        if kind == "event":
            self._on_event(header)
        elif (call := self._calls.get(rid)) is not None:
            await call._deliver((header, body))

    def _on_event(self, header: Header) -> None:
        if header.get("event") == "exit":
            code = header.get("code", 0)
            self._exit_code = code if _is_int(code) else -1
            self._exited.set()
        self.send({"t": "ack", "id": header["id"]})

    # -- frames out -----------------------------------------------------------------------

    def send(self, header: Header, body: bytes = b"") -> None:
        if self._closed is not None:
            raise self._closed
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
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


def check_version(header: Header) -> None:
    if header.get("v") != VERSION:
        raise AgentProtocolError(f"agent speaks protocol {header.get('v')}, we speak {VERSION}")
