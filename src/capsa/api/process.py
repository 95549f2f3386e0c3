"""Guest processes: a command run to completion (:class:`ExecCommand` -> :class:`ExecResult`)
and a started process with streamed output, stdin, signals and a terminal
(:class:`Process`). Both are written on one :class:`~capsa.api.agent_channel.Call` each.

The guest decides how much its processes write, and all of it lands in the user's
process: what is held for the user is bounded per stream (:data:`DEFAULT_MAX_OUTPUT`,
:data:`DEFAULT_MAX_UNREAD_OUTPUT`), and a process that goes past its bound is killed."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

from capsa.api.agent_channel import AgentChannel, Call, Header, raise_if_error
from capsa.errors import (
    AgentDisconnected,
    AgentError,
    AgentProtocolError,
    CapsaTimeout,
    InvalidConfig,
    OutputLimitExceeded,
    ProcessError,
)
from capsa.guest.protocol import CHUNK

# What a command run to completion may write to each of stdout and stderr.
DEFAULT_MAX_OUTPUT = 64 * 1024 * 1024
# What a started process's stream may hold that its reader has not taken yet.
DEFAULT_MAX_UNREAD_OUTPUT = 16 * 1024 * 1024


@dataclass(frozen=True)
class ExecResult:
    stdout: bytes
    stderr: bytes
    exit_code: int
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    @property
    def stdout_text(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode(errors="replace")


def command_spec(
    cmd: str | Sequence[str],
    env: Mapping[str, str] | None,
    cwd: str | None,
    timeout: float | None,
) -> Header:
    """The request fields for a command: a shell line (``cmd``) or an argv (no shell)."""
    spec: Header = {"cmd": cmd} if isinstance(cmd, str) else {"argv": list(cmd)}
    if env:
        spec["env"] = dict(env)
    if cwd is not None:
        spec["cwd"] = cwd
    if timeout is not None:
        spec["timeout"] = timeout
    return spec


def chunks_of(data: bytes) -> Generator[bytes, None, None]:
    view = memoryview(data)
    for i in range(0, len(data), CHUNK):
        yield bytes(view[i : i + CHUNK])


def positive_limit(name: str, value: int) -> int:
    """``value`` if it can bound something (a positive int); InvalidConfig otherwise."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidConfig(f"{name} must be a positive number of bytes, not {value!r}")
    return value


def stream_name(stream: int) -> str:
    return "stdout" if stream == 1 else "stderr"


def _stream_of(header: Header) -> int:
    return 1 if header.get("fd") == 1 else 2


def _kill(call: Call) -> None:
    # Not drained: a guest that stops reading must not hold back the caller's error.
    with contextlib.suppress(AgentError):
        call.send("kill", sig=int(signal.SIGKILL))


async def started_pid(call: Call) -> int:
    """The pid in the agent's first answer to ``start`` (an ``err`` raises)."""
    return pid_of(await started_header(call))


async def started_header(call: Call) -> Header:
    header, _ = await call.next()
    raise_if_error(header)
    pid_of(header)
    return header


def pid_of(header: Header) -> int:
    pid = header.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool):
        raise AgentProtocolError(f"the agent reported pid {pid!r}")
    return pid


def dropped_of(header: Header) -> tuple[int, int]:
    """Bytes of (stdout, stderr) a background process's buffers lost before an attach."""
    dropped = header.get("dropped", [0, 0])
    if (
        not isinstance(dropped, list)
        or len(dropped) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in dropped)
    ):
        raise AgentProtocolError(f"the agent reported dropped output {dropped!r}")
    return dropped[0], dropped[1]


def exit_status(header: Header) -> tuple[int, bool]:
    """(exit code, timed out) from a ``res`` or ``exit`` frame, checked."""
    code = header.get("code")
    if not isinstance(code, int) or isinstance(code, bool):
        raise AgentProtocolError(f"the agent reported exit code {code!r}")
    return code, bool(header.get("timed_out"))


class _KeptOutput:
    """What a command wrote, at most ``limit`` bytes per stream."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._streams = {1: bytearray(), 2: bytearray()}

    def add(self, stream: int, chunk: bytes) -> bool:
        """Keep ``chunk``; False if it goes past the cap (only what fits is kept then)."""
        kept = self._streams[stream]
        room = self.limit - len(kept)
        kept += chunk if len(chunk) <= room else chunk[:room]
        return len(chunk) <= room

    def result(self, code: int, timed_out: bool) -> ExecResult:
        return ExecResult(bytes(self._streams[1]), bytes(self._streams[2]), code, timed_out)

    def exceeded(self, stream: int) -> OutputLimitExceeded:
        return OutputLimitExceeded(
            f"the command wrote more than {self.limit} bytes to {stream_name(stream)}: killed",
            stream=stream,
            limit=self.limit,
            stdout=bytes(self._streams[1]),
            stderr=bytes(self._streams[2]),
        )


class CommandOptions:
    """What a command to run is made of, refined before it runs: its arguments (no shell
    then), environment, working directory, timeout, stdin, whether a failure raises.
    Shared by the agent's :class:`ExecCommand` and the server client's."""

    def __init__(
        self,
        cmd: str,
        env: Mapping[str, str] | None,
        cwd: str | None,
        timeout: float | None,
        stdin: bytes | None,
        check: bool,
    ) -> None:
        self._cmd = cmd
        self._args: list[str] = []
        self._env = dict(env or {})
        self._cwd = cwd
        self._timeout = timeout
        self._stdin = stdin or b""
        self._check = check

    def arg(self, value: str) -> Self:
        self._args.append(value)
        return self

    def args(self, values: Sequence[str]) -> Self:
        self._args.extend(values)
        return self

    def env(self, key: str, value: str) -> Self:
        self._env[key] = value
        return self

    def cwd(self, path: str) -> Self:
        self._cwd = path
        return self

    def timeout(self, seconds: float) -> Self:
        self._timeout = seconds
        return self

    def stdin(self, data: bytes) -> Self:
        self._stdin = data
        return self

    def check(self, enabled: bool = True) -> Self:
        """Raise :class:`~capsa.errors.ProcessError` unless the command exits 0."""
        self._check = enabled
        return self

    def _failure(self, result: ExecResult) -> ProcessError | None:
        """The error ``check`` asks for, when the command failed."""
        if not self._check or (result.exit_code == 0 and not result.timed_out):
            return None
        return ProcessError(
            f"{self._describe()} {_how_it_ended(result)}",
            exit_code=result.exit_code,
            stdout=result.stdout,
            stderr=result.stderr,
            timed_out=result.timed_out,
        )

    def _describe(self) -> str:
        text = " ".join([self._cmd, *self._args])
        return repr(text if len(text) <= 80 else text[:77] + "...")


class ExecCommand(CommandOptions):
    """A command to run: awaitable as is, or refined with ``arg``/``env``/``cwd`` first.

    What it collects is capped per stream (``max_output``, default 64 MiB): a command that
    writes more to stdout or stderr is killed and :class:`~capsa.errors.OutputLimitExceeded`
    is raised, carrying the output kept so far. Output is never cut short silently."""

    def __init__(
        self,
        channel: AgentChannel,
        cmd: str,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
        *,
        max_output: int = DEFAULT_MAX_OUTPUT,
        check: bool = False,
    ) -> None:
        super().__init__(cmd, env, cwd, timeout, stdin, check)
        self._channel = channel
        self._max_output = positive_limit("max_output", max_output)

    def max_output(self, limit: int) -> ExecCommand:
        """Cap each of stdout and stderr at ``limit`` bytes (past it: killed, and
        :class:`~capsa.errors.OutputLimitExceeded`)."""
        self._max_output = positive_limit("max_output", limit)
        return self

    async def run(self) -> ExecResult:
        result = await self._run()
        failure = self._failure(result)
        if failure is not None:
            raise failure
        return result

    async def _run(self) -> ExecResult:
        cmd: str | list[str] = [self._cmd, *self._args] if self._args else self._cmd
        spec = command_spec(cmd, self._env, self._cwd, self._timeout)
        # Started rather than exec'd: only a started process can be killed once its output
        # goes past the cap.
        call = self._channel.open("start", spec)
        feeder: asyncio.Future[None] | None = None
        try:
            await call.drain()
            await started_pid(call)
            if self._stdin:
                # Alongside the collecting: a command may write before it reads.
                feeder = asyncio.ensure_future(self._feed_stdin(call))
            else:
                call.send("stdin_close")
            return await self._collect(call)
        except asyncio.CancelledError:
            _kill(call)  # a caller that gives up on a command ends it
            raise
        finally:
            if feeder is not None:
                feeder.cancel()
            call.close()

    async def _feed_stdin(self, call: Call) -> None:
        # A failed channel is reported by the collecting side.
        with contextlib.suppress(AgentError, ConnectionError):
            for chunk in chunks_of(self._stdin):
                call.send("stdin", chunk)
                await call.drain()
            call.send("stdin_close")
            await call.drain()

    async def _collect(self, call: Call) -> ExecResult:
        kept = _KeptOutput(self._max_output)
        while True:
            header, body = await call.next()
            if header["t"] == "out":
                stream = _stream_of(header)
                if not kept.add(stream, body):
                    _kill(call)
                    raise kept.exceeded(stream)
            elif header["t"] == "exit":
                return kept.result(*exit_status(header))
            elif header["t"] == "err":
                raise_if_error(header)

    def __await__(self) -> Generator[Any, None, ExecResult]:
        return self.run().__await__()


class _OutputBuffer:
    """One stream's output until its reader takes it."""

    def __init__(self) -> None:
        self._chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._error: BaseException | None = None
        self.unread = 0

    def push(self, chunk: bytes) -> None:
        self._chunks.put_nowait(chunk)
        self.unread += len(chunk)

    def end(self, error: BaseException | None = None) -> None:
        """No more output: readers get what is buffered, then the end (or ``error``)."""
        self._error = error
        self._chunks.put_nowait(None)

    async def pop(self) -> bytes | None:
        chunk = await self._chunks.get()
        if chunk is None:
            self._chunks.put_nowait(None)  # later readers end at once too
            if self._error is not None:
                raise self._error
            return None
        self.unread -= len(chunk)
        return chunk


class Process:
    """A started guest process: streamed output, stdin, signals, exit code.

    Output waits for its reader (:attr:`stdout`, :attr:`stderr`) in a buffer per stream of
    at most ``max_unread_output`` bytes (default 16 MiB). The guest is never paused for a
    slow reader, as that would stall every other call on the shared channel: when a
    stream's unread output would go past the bound, the process is killed, both streams
    end with :class:`~capsa.errors.OutputLimitExceeded` after the output they hold, and
    :meth:`wait` raises it. A process that writes a lot needs both streams read."""

    def __init__(
        self,
        call: Call,
        pid: int,
        pty: bool,
        *,
        max_unread_output: int = DEFAULT_MAX_UNREAD_OUTPUT,
    ) -> None:
        self._call = call
        self.pid = pid
        self.pty = pty
        # Bytes of (stdout, stderr) lost before this attach (background processes only).
        self.dropped = (0, 0)
        self._max_unread = positive_limit("max_unread_output", max_unread_output)
        self._buffers = {1: _OutputBuffer(), 2: _OutputBuffer()}
        self._exit: asyncio.Future[tuple[int, bool]] = asyncio.get_running_loop().create_future()
        # A process nobody waits for may end with the channel: not an unretrieved error.
        self._exit.add_done_callback(_retrieve)
        self._pump = asyncio.ensure_future(self._route())

    @classmethod
    async def start(
        cls,
        channel: AgentChannel,
        spec: Header,
        pty: bool,
        *,
        max_unread_output: int = DEFAULT_MAX_UNREAD_OUTPUT,
    ) -> Process:
        """Ask the agent to start the process in ``spec``; return once it runs."""
        positive_limit("max_unread_output", max_unread_output)
        call = channel.open("start", spec)
        try:
            await call.drain()
            pid = await started_pid(call)
        except BaseException:
            call.close()
            raise
        return cls(call, pid, pty, max_unread_output=max_unread_output)

    @classmethod
    async def attach(
        cls,
        channel: AgentChannel,
        pid: int,
        *,
        max_unread_output: int = DEFAULT_MAX_UNREAD_OUTPUT,
    ) -> Process:
        """Follow the background process ``pid``: what its buffers kept, then its output
        as it comes, then its exit code."""
        positive_limit("max_unread_output", max_unread_output)
        call = channel.open("attach", {"pid": pid})
        try:
            await call.drain()
            header = await started_header(call)
        except BaseException:
            call.close()
            raise
        process = cls(call, pid_of(header), False, max_unread_output=max_unread_output)
        process.dropped = dropped_of(header)
        process.keeps_busy = False  # following a background process is not using the sandbox
        return process

    @property
    def keeps_busy(self) -> bool:
        """Whether this process counts as use of the sandbox for its idle timeout."""
        return self._call.keeps_busy

    @keeps_busy.setter
    def keeps_busy(self, value: bool) -> None:
        self._call.keeps_busy = value

    async def detach(self) -> None:
        """Stop following a background process; it runs on (``agent.attach`` again)."""
        with contextlib.suppress(AgentError, ConnectionError):
            self._call.send("detach")
            await self._call.drain()
        self._pump.cancel()
        self._call.close()

    async def _route(self) -> None:
        ended_by: BaseException | None = None
        try:
            self._exit.set_result(await self._pump_output())
        except OutputLimitExceeded as e:
            ended_by = e
            self._exit.set_exception(e)
        except BaseException as e:
            error = e if isinstance(e, Exception) else AgentDisconnected("closed")
            self._exit.set_exception(error)
        finally:
            self._call.close()
            for buffer in self._buffers.values():
                buffer.end(ended_by)

    async def _pump_output(self) -> tuple[int, bool]:
        while True:
            header, body = await self._call.next()
            if header["t"] == "out":
                self._buffer_output(_stream_of(header), body)
            elif header["t"] == "exit":
                return exit_status(header)

    def _buffer_output(self, stream: int, chunk: bytes) -> None:
        buffer = self._buffers[stream]
        if buffer.unread + len(chunk) > self._max_unread:
            _kill(self._call)
            unread = f"more than {self._max_unread} bytes of {stream_name(stream)} unread"
            raise OutputLimitExceeded(
                f"process {self.pid}: {unread}: killed", stream=stream, limit=self._max_unread
            )
        buffer.push(chunk)

    async def _iterate(self, stream: int) -> AsyncIterator[bytes]:
        buffer = self._buffers[stream]
        while (chunk := await buffer.pop()) is not None:
            yield chunk

    @property
    def stdout(self) -> AsyncIterator[bytes]:
        """Output chunks as they arrive (for a PTY: everything the terminal shows)."""
        return self._iterate(1)

    @property
    def stderr(self) -> AsyncIterator[bytes]:
        return self._iterate(2)

    async def write_stdin(self, data: bytes) -> None:
        for chunk in chunks_of(data):
            self._call.send("stdin", chunk)
            await self._call.drain()

    async def close_stdin(self) -> None:
        self._call.send("stdin_close")
        await self._call.drain()

    async def kill(self, sig: int = signal.SIGKILL) -> None:
        self._call.send("kill", sig=int(sig))
        await self._call.drain()

    async def resize(self, rows: int, cols: int) -> None:
        self._call.send("resize", rows=rows, cols=cols)
        await self._call.drain()

    async def wait(self, timeout: float | None = None) -> int:
        """The exit code (128 + signal number if it was killed); OutputLimitExceeded if it
        was killed for output left unread."""
        try:
            code, _ = await asyncio.wait_for(asyncio.shield(self._exit), timeout)
        except TimeoutError:
            raise CapsaTimeout(f"process {self.pid} still running after {timeout}s") from None
        return code

    @property
    def timed_out(self) -> bool:
        return self._exit.done() and not self._exit.exception() and self._exit.result()[1]


def _retrieve(future: asyncio.Future[tuple[int, bool]]) -> None:
    if not future.cancelled():
        future.exception()


def _how_it_ended(result: ExecResult) -> str:
    if result.timed_out:
        return "was killed at its timeout"
    tail = result.stderr[-500:].decode(errors="replace").strip()
    return f"exited with status {result.exit_code}" + (f": {tail}" if tail else "")
