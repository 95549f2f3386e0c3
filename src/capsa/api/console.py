"""The guest's serial console: pattern waits, raw I/O, and shell-style command execution.

A background task reads the serial socket from the moment QEMU starts, so no output is
lost and the tail is always available for error messages. Reads consume from a buffer,
so a pattern is found even on a line that never gets a newline (``login: ``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import socket
from collections import deque

from capsa.errors import CapsaTimeout, PatternNotFound

Pattern = str | re.Pattern[str]

# Escape sequences the console may carry (busybox ash asks for the cursor position
# before each prompt); they are noise in text results.
_ANSI_CSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_MAX_PENDING = 16 * 1024 * 1024
_TAIL_BYTES = 64 * 1024


class ConsoleTap:
    """Owns the serial socket's read side: keeps unconsumed bytes and a rolling tail."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._pending = bytearray()
        self._tail: deque[bytes] = deque()
        self._tail_len = 0
        self._changed = asyncio.Condition()
        self._eof = False
        self._dropped = 0
        self._task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await loop.sock_recv(self._sock, 65536)
                if not data:
                    break
                self._append(data)
                async with self._changed:
                    self._changed.notify_all()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._eof = True
            async with self._changed:
                self._changed.notify_all()

    def _append(self, data: bytes) -> None:
        self._pending += data
        if len(self._pending) > _MAX_PENDING:
            # Nobody is reading: keep memory bounded, newest output wins.
            cut = len(self._pending) - _MAX_PENDING
            del self._pending[:cut]
            self._dropped += cut
        self._tail.append(data)
        self._tail_len += len(data)
        while self._tail_len - len(self._tail[0]) >= _TAIL_BYTES:
            self._tail_len -= len(self._tail.popleft())

    @property
    def eof(self) -> bool:
        return self._eof

    def tail(self, max_chars: int = 4000) -> str:
        text = b"".join(self._tail).decode("utf-8", "replace")
        return clean_text(text)[-max_chars:]

    def take(self, n: int | None = None) -> bytes:
        n = len(self._pending) if n is None else n
        out = bytes(self._pending[:n])
        del self._pending[:n]
        return out

    def peek_text(self) -> str:
        # surrogateescape round-trips exactly, so text offsets map back to byte counts.
        return self._pending.decode("utf-8", "surrogateescape")

    async def wait_change(self, timeout: float | None) -> None:
        async with self._changed:
            if self._eof:
                return
            await asyncio.wait_for(self._changed.wait(), timeout)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task


def clean_text(text: str) -> str:
    return _ANSI_CSI.sub("", text).replace("\r\n", "\n")


def _find(pattern: Pattern, text: str) -> tuple[int, int] | None:
    if isinstance(pattern, re.Pattern):
        m = pattern.search(text)
        return (m.start(), m.end()) if m else None
    i = text.find(pattern)
    return (i, i + len(pattern)) if i >= 0 else None


class Console:
    """Interactive access to the guest's serial port (ttyS0)."""

    _exec_ids = itertools.count(1)

    def __init__(self, tap: ConsoleTap, sock: socket.socket, default_timeout: float | None) -> None:
        self._tap = tap
        self._sock = sock
        self._timeout = default_timeout
        self._write_lock = asyncio.Lock()
        self._split = False
        self._feeder: asyncio.Future[None] | None = None

    # -- reading ------------------------------------------------------------------------------

    async def wait_for(self, pattern: Pattern, timeout: float | None = None) -> str:
        """Wait until ``pattern`` appears; return (and consume) the text up to and including it."""
        _, text = await self.wait_for_any([pattern], timeout)
        return text

    async def wait_for_any(
        self, patterns: list[Pattern] | tuple[Pattern, ...], timeout: float | None = None
    ) -> tuple[int, str]:
        """Wait for the earliest match of any pattern; return ``(index, text)``."""
        if not patterns:
            raise ValueError("wait_for_any needs at least one pattern")
        limit = self._timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = None if limit is None else loop.time() + limit
        while True:
            raw = self._tap.peek_text()
            best: tuple[int, int, int] | None = None
            for idx, pat in enumerate(patterns):
                hit = _find(pat, raw)
                if hit and (best is None or hit[0] < best[1]):
                    best = (idx, hit[0], hit[1])
            if best is not None:
                idx, _, end = best
                consumed = self._tap.take(len(raw[:end].encode("utf-8", "surrogateescape")))
                return idx, consumed.decode("utf-8", "replace")
            if self._tap.eof:
                raise PatternNotFound(" | ".join(map(str, patterns)), self._tap.tail())
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise CapsaTimeout(
                    f"pattern {' | '.join(map(str, patterns))!r} not found within {limit}s; "
                    f"console tail:\n{self._tap.tail(1000)}"
                )
            with contextlib.suppress(asyncio.TimeoutError):
                await self._tap.wait_change(remaining)

    async def read_available(self, settle: float = 0.05) -> str:
        """Everything received and not yet consumed, once output has been quiet ``settle`` s."""
        while not self._tap.eof:
            try:
                await self._tap.wait_change(settle)
            except TimeoutError:
                break
        return self._tap.take().decode("utf-8", "replace")

    # -- writing ------------------------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        async with self._write_lock:
            await asyncio.get_running_loop().sock_sendall(self._sock, data)

    async def write_str(self, text: str) -> None:
        await self.write(text.encode())

    async def write_line(self, line: str) -> None:
        await self.write(line.encode() + b"\n")

    async def send_interrupt(self) -> None:
        await self.write(b"\x03")

    async def send_eof(self) -> None:
        await self.write(b"\x04")

    # -- shell helpers --------------------------------------------------------------------------

    async def run_command(self, cmd: str, prompt: Pattern, timeout: float | None = None) -> str:
        """Type ``cmd`` and return everything up to the next ``prompt`` (echo included)."""
        await self.write_line(cmd)
        return await self.wait_for(prompt, timeout)

    async def exec(self, cmd: str, timeout: float | None = None) -> str:
        """Run ``cmd`` in the console's shell and return its output, without the echoed line.

        The markers are printed with ``printf`` format arguments, so the echo of the typed
        line (which holds only the format) can never match them.
        """
        n = next(self._exec_ids)
        begin, end = f"__CAPSA_BEGIN_{n}__", f"__CAPSA_END_{n}__"
        quoted = "'" + cmd.replace("'", "'\\''") + "'"
        # One line, and the command behind eval, so a trailing '#' or '&' cannot eat the marker.
        line = (
            f"printf '%s_%s_%d__\\n' __CAPSA BEGIN {n}; eval {quoted}; "
            f"printf '\\n%s_%s_%d__\\n' __CAPSA END {n}"
        )
        await self.write_line(line)
        await self.wait_for(begin + "\r\n", timeout)
        text = await self.wait_for(end, timeout)
        out = clean_text(text[: -len(end)])
        # Drop the newline our own printf put before the end marker.
        return out[:-1] if out.endswith("\n") else out

    async def login(
        self, user: str, password: str | None = None, timeout: float | None = None
    ) -> str:
        await self.wait_for("login: ", timeout)
        await self.write_line(user)
        if password is not None:
            await self.wait_for("Password: ", timeout)
            await self.write_line(password)
        _, text = await self.wait_for_any(["# ", "$ ", "> "], timeout)
        return text

    async def split(self) -> tuple[asyncio.StreamReader, ConsoleWriter]:
        """A stream reader fed with console output (starting with unconsumed text) and a writer."""
        if self._split:
            raise RuntimeError("console already split")
        self._split = True
        reader = asyncio.StreamReader()
        self._feeder = asyncio.ensure_future(self._feed(reader))
        return reader, ConsoleWriter(self)

    async def _feed(self, reader: asyncio.StreamReader) -> None:
        while True:
            data = self._tap.take()
            if data:
                reader.feed_data(data)
            elif self._tap.eof:
                reader.feed_eof()
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await self._tap.wait_change(None)

    def tail(self, max_chars: int = 4000) -> str:
        return self._tap.tail(max_chars)


class ConsoleWriter:
    """The write half from :meth:`Console.split` (``write`` + ``drain``, like a StreamWriter)."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._buffer = bytearray()

    def write(self, data: bytes) -> None:
        self._buffer += data

    async def drain(self) -> None:
        data, self._buffer = bytes(self._buffer), bytearray()
        if data:
            await self._console.write(data)

    def close(self) -> None:
        """Nothing to release: the VM owns the serial port."""
