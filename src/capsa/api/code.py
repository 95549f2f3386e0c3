"""Code execution contexts: a long-lived interpreter in the sandbox that runs cells and
keeps their state, like a notebook kernel (Python, or bash).

    ctx = await sb.code_context("python")
    run = await ctx.run("import math\\nx = math.tau\\nx / 2")
    run.text        # '3.141592653589793' (the last expression's value)
    run.stdout      # what print() and child processes wrote
    run.error       # CodeError(name, value, traceback) when the cell raised
    async for event in ctx.stream("for i in range(3): print(i)"): ...
    await ctx.interrupt()   # stops the running cell; the context and its state stay

The guest side is ``capsa/guest/code_kernel.py``, run by the image's ``python3`` (or, in
the minimal image, the agent's own interpreter). Everything it says is checked: lines and
kinds are bounded, and so is what one cell may make the host keep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capsa.errors import AgentProtocolError, CapsaTimeout, CodeContextError, InvalidConfig

if TYPE_CHECKING:
    from capsa.api.agent import AgentClient
    from capsa.api.process import Process

LANGUAGES = ("python", "bash")
KERNEL_SOURCE = Path(__file__).parents[1] / "guest" / "code_kernel.py"
# Bounds on what a (hostile) guest can make the host hold for one context and one cell.
MAX_LINE = 48 << 20  # one event: a display's PNG, base64
MAX_CELL_TEXT = 8 << 20  # characters kept per stream and cell
MAX_DISPLAYS = 64
START_TIMEOUT = 120.0
INTERRUPT_GRACE = 5.0  # how long an interrupted cell may take to end before the kill
EVENT_KINDS = ("stdout", "stderr", "display", "result", "error", "done")
# Run the kernel under the image's python3, else the agent's own interpreter.
LAUNCH = (
    'for p in python3 /usr/lib/capsa/python/bin/python3; do command -v "$p" >/dev/null '
    '&& exec "$p" -u -c "$0" "$@"; done; echo "no python3 in this sandbox" >&2; exit 127'
)


@dataclass(frozen=True)
class CodeError:
    """What a cell raised: the exception's type name, its message, the traceback text."""

    name: str
    value: str
    traceback: str


@dataclass(frozen=True)
class CodeEvent:
    """One thing a running cell produced: ``kind`` is stdout, stderr, display, result or
    error; ``text`` for output, ``data`` (MIME type → text, or base64 for images) for
    display and result, ``error`` for error."""

    kind: str
    text: str = ""
    data: dict[str, str] = field(default_factory=dict)
    error: CodeError | None = None


@dataclass
class Execution:
    """A finished cell. ``result`` is the last expression's value as a MIME bundle (None
    when the cell ended in a statement); ``displays`` holds ``display()`` calls and
    matplotlib figures; ``truncated`` says output past the caps was dropped."""

    stdout: str = ""
    stderr: str = ""
    result: dict[str, str] | None = None
    displays: list[dict[str, str]] = field(default_factory=list)
    error: CodeError | None = None
    exit_code: int | None = None  # bash cells: the last command's status
    truncated: bool = False

    @property
    def text(self) -> str | None:
        """The result's plain-text form."""
        return None if self.result is None else self.result.get("text/plain")

    def add(self, event: CodeEvent) -> None:
        if event.kind in ("stdout", "stderr"):
            kept = getattr(self, event.kind)
            room = MAX_CELL_TEXT - len(kept)
            if len(event.text) > room:
                self.truncated = True
            setattr(self, event.kind, kept + event.text[: max(room, 0)])
        elif event.kind == "display":
            if len(self.displays) < MAX_DISPLAYS:
                self.displays.append(event.data)
            else:
                self.truncated = True
        elif event.kind == "result":
            self.result = event.data
        elif event.kind == "error":
            self.error = event.error


class CodeContext:
    """One interpreter in the sandbox; cells run one at a time, in order."""

    def __init__(self, agent: AgentClient, language: str, process: Process) -> None:
        self._agent = agent
        self.language = language
        self._process = process
        self._lines = _LineReader(process)
        self._lock = asyncio.Lock()
        self._cell = 0
        self._dead: str | None = None

    @classmethod
    async def start(cls, agent: AgentClient, language: str = "python") -> CodeContext:
        if language not in LANGUAGES:
            raise InvalidConfig(f"code context language {language!r} is not one of {LANGUAGES}")
        process = await _launch(agent, language)
        process.keeps_busy = False
        ctx = cls(agent, language, process)
        try:
            await asyncio.wait_for(ctx._ready(), START_TIMEOUT)
        except BaseException as e:
            await ctx._kill()
            if isinstance(e, TimeoutError):
                raise CodeContextError(f"the {language} context did not start") from None
            raise
        return ctx

    async def _ready(self) -> None:
        said = ""  # what the kernel wrote before it was ready (why it failed, if it did)
        while (header := await self._next()) is not None and header.get("t") == "stderr":
            said = (said + _text(header, "text"))[-2048:]
        if header is None:
            why = await self._why()
            detail = f": {said.strip()}" if said.strip() else ""
            raise CodeContextError(f"the {self.language} context failed to start: {why}{detail}")
        if header.get("t") != "ready":
            raise AgentProtocolError(f"code context: expected 'ready', got {header.get('t')!r}")

    @property
    def alive(self) -> bool:
        return self._dead is None

    async def run(
        self,
        code: str,
        *,
        timeout: float | None = None,
        on_stdout: Callable[[str], object] | None = None,
        on_stderr: Callable[[str], object] | None = None,
        on_display: Callable[[dict[str, str]], object] | None = None,
    ) -> Execution:
        """Run ``code`` and return what it produced; callbacks see output as it comes. A
        cell past ``timeout`` seconds is interrupted (the context stays) and raises
        :class:`~capsa.errors.CapsaTimeout`."""
        execution = Execution()
        callbacks: dict[str, Callable[[Any], object] | None] = {
            "stdout": on_stdout,
            "stderr": on_stderr,
            "display": on_display,
        }
        async for event in self.stream(code, timeout=timeout, _into=execution):
            callback = callbacks.get(event.kind)
            if callback is not None:
                callback(event.data if event.kind == "display" else event.text)
        return execution

    async def stream(
        self, code: str, *, timeout: float | None = None, _into: Execution | None = None
    ) -> AsyncIterator[CodeEvent]:
        """Run ``code``, yielding its events as they come (see :meth:`run`)."""
        if not isinstance(code, str):
            raise InvalidConfig("code must be a str")
        async with self._lock:
            self._check_alive()
            self._process.keeps_busy = True  # a running cell is use; an open context is not
            try:
                async for event in self._run_cell(code, timeout, _into):
                    yield event
            finally:
                self._process.keeps_busy = False

    async def _run_cell(
        self, code: str, timeout: float | None, into: Execution | None
    ) -> AsyncIterator[CodeEvent]:
        self._cell += 1
        cell = self._cell
        request = json.dumps({"id": cell, "code": code}).encode() + b"\n"
        await self._process.write_stdin(request)
        execution = into if into is not None else Execution()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        interrupted = False
        while True:
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0 and not interrupted:
                await self.interrupt()
                interrupted = True
                deadline = loop.time() + INTERRUPT_GRACE
                continue
            if left is not None and left <= 0:
                await self._kill()
                self._dead = "it did not stop when interrupted, and was killed"
                raise CapsaTimeout(f"the cell ran past {timeout}s; the context was killed")
            try:
                header = await asyncio.wait_for(self._next(), left)
            except TimeoutError:
                continue
            except AgentProtocolError as e:
                await self._drop(e)
                raise
            if header is None:
                self._dead = await self._why()
                raise CodeContextError(f"the {self.language} context died: {self._dead}")
            if header.get("id") != cell:
                continue  # a late event of an earlier, interrupted cell
            kind = header.get("t")
            if kind == "done":
                execution.truncated = execution.truncated or header.get("truncated") is True
                if interrupted:
                    raise CapsaTimeout(f"the cell ran past {timeout}s and was interrupted")
                return
            try:
                event = _event(header)
            except AgentProtocolError as e:
                await self._drop(e)
                raise
            if kind == "result" and isinstance(header.get("exit_code"), int):
                execution.exit_code = header["exit_code"]
            execution.add(event)
            yield event

    async def interrupt(self) -> None:
        """Stop the running cell (SIGINT: KeyboardInterrupt in Python); the context keeps
        its state."""
        if self._dead is None:
            await self._process.kill(signal.SIGINT)

    async def restart(self) -> None:
        """A fresh interpreter in place of this one (its state is lost)."""
        async with self._lock:
            await self._kill()
            fresh = await CodeContext.start(self._agent, self.language)
            self._lines.close()
            self._process, self._lines = fresh._process, fresh._lines
            self._dead = None

    async def close(self) -> None:
        await self._kill()
        self._dead = self._dead or "closed"

    async def __aenter__(self) -> CodeContext:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the wire ---------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise CodeContextError(
                f"the {self.language} context is gone ({self._dead}): restart() makes a new one"
            )

    async def _next(self) -> dict[str, Any] | None:
        """The next event from the kernel (None: it ended)."""
        line = await self._lines.get()
        if line is None:
            return None
        try:
            header = json.loads(line)
        except ValueError:
            raise AgentProtocolError("code context: a line that is not JSON") from None
        if not isinstance(header, dict) or not isinstance(header.get("t"), str):
            raise AgentProtocolError("code context: an event without a kind")
        return header

    async def _drop(self, error: AgentProtocolError) -> None:
        """A kernel that broke the protocol is not trusted with another cell."""
        await self._kill()
        self._dead = f"it broke the protocol ({error})"

    async def _why(self) -> str:
        said = await self._stderr_tail()
        with contextlib.suppress(Exception):
            code = await self._process.wait(timeout=5)
            return f"its interpreter exited with status {code}" + (f": {said}" if said else "")
        return "its interpreter stopped answering"

    async def _stderr_tail(self) -> str:
        """What the interpreter wrote to its own stderr before the kernel took it over
        (why it could not start), at most 2 KiB."""
        kept = b""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                async for chunk in self._process.stderr:
                    kept = (kept + chunk)[-2048:]
        return kept.decode(errors="replace").strip()

    async def _kill(self) -> None:
        self._lines.close()
        with contextlib.suppress(Exception):
            await self._process.kill()
        with contextlib.suppress(Exception):
            await self._process.wait(timeout=5)


async def _launch(agent: AgentClient, language: str) -> Process:
    source = KERNEL_SOURCE.read_text()
    return await agent.start(
        ["/bin/sh", "-c", LAUNCH, source, language],
        env={"PYTHONDONTWRITEBYTECODE": "1", "MPLBACKEND": "Agg"},
        max_unread_output=MAX_LINE * 2,
    )


class _LineReader:
    """The kernel's stdout as lines (each at most MAX_LINE bytes), read by a task of its
    own so that a caller's timeout never cuts a line in two. At most 256 lines wait; then
    the process's own bound on unread output applies."""

    def __init__(self, process: Process) -> None:
        self._queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(256)
        self._task = asyncio.ensure_future(self._read(process))

    async def _read(self, process: Process) -> None:
        pending = b""
        try:
            async for chunk in process.stdout:
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    await self._queue.put(line)
                if len(pending) > MAX_LINE:
                    raise AgentProtocolError(f"code context: an event over {MAX_LINE} bytes")
            await self._queue.put(None)
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            await self._queue.put(e)

    async def get(self) -> bytes | None:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is None:
            self._queue.put_nowait(None)  # it stays ended for every later reader
        return item

    def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)


def _text(header: dict[str, Any], key: str) -> str:
    value = header.get(key, "")
    if not isinstance(value, str):
        raise AgentProtocolError(f"code context: {key!r} is not text")
    return value


def _bundle(header: dict[str, Any]) -> dict[str, str]:
    data = header.get("data")
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise AgentProtocolError("code context: a MIME bundle that is not text by type")
    return dict(data)


def _event(header: dict[str, Any]) -> CodeEvent:
    kind = header["t"]
    if kind not in EVENT_KINDS:
        raise AgentProtocolError(f"code context: unknown event {kind!r}")
    if kind in ("stdout", "stderr"):
        return CodeEvent(kind, text=_text(header, "text"))
    if kind in ("display", "result"):
        return CodeEvent(kind, data=_bundle(header))
    error = CodeError(_text(header, "name"), _text(header, "value"), _text(header, "traceback"))
    return CodeEvent(kind, error=error)
