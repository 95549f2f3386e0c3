"""Guest processes: a command run to completion (:class:`ExecCommand` -> :class:`ExecResult`)
and a started process with streamed output, stdin, signals and a terminal
(:class:`Process`). Both are written on one :class:`~capsa.api.agent_channel.Call` each."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from capsa.api.agent_channel import AgentChannel, Call, Header, raise_if_error
from capsa.errors import AgentDisconnected, AgentProtocolError, CapsaTimeout
from capsa.guest.protocol import CHUNK


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


def exit_status(header: Header) -> tuple[int, bool]:
    """(exit code, timed out) from a ``res`` or ``exit`` frame, checked."""
    code = header.get("code")
    if not isinstance(code, int) or isinstance(code, bool):
        raise AgentProtocolError(f"the agent reported exit code {code!r}")
    return code, bool(header.get("timed_out"))


class ExecCommand:
    """A command to run: awaitable as is, or refined with ``arg``/``env``/``cwd`` first."""

    def __init__(
        self,
        channel: AgentChannel,
        cmd: str,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
    ) -> None:
        self._channel = channel
        self._cmd = cmd
        self._args: list[str] = []
        self._env = dict(env or {})
        self._cwd = cwd
        self._timeout = timeout
        self._stdin = stdin or b""

    def arg(self, value: str) -> ExecCommand:
        self._args.append(value)
        return self

    def args(self, values: Sequence[str]) -> ExecCommand:
        self._args.extend(values)
        return self

    def env(self, key: str, value: str) -> ExecCommand:
        self._env[key] = value
        return self

    def cwd(self, path: str) -> ExecCommand:
        self._cwd = path
        return self

    def timeout(self, seconds: float) -> ExecCommand:
        self._timeout = seconds
        return self

    def stdin(self, data: bytes) -> ExecCommand:
        self._stdin = data
        return self

    async def run(self) -> ExecResult:
        cmd: str | list[str] = [self._cmd, *self._args] if self._args else self._cmd
        spec = command_spec(cmd, self._env, self._cwd, self._timeout)
        call = self._channel.open("exec", spec, self._stdin)
        out = {1: bytearray(), 2: bytearray()}
        try:
            await call.drain()
            while True:
                header, body = await call.next()
                if header["t"] == "out":
                    out[1 if header.get("fd") == 1 else 2] += body
                elif header["t"] in ("res", "err"):
                    code, timed_out = exit_status(raise_if_error(header))
                    return ExecResult(bytes(out[1]), bytes(out[2]), code, timed_out)
        finally:
            call.close()

    def __await__(self) -> Generator[Any, None, ExecResult]:
        return self.run().__await__()


class Process:
    """A started guest process: streamed output, stdin, signals, exit code."""

    def __init__(self, call: Call, pid: int, pty: bool) -> None:
        self._call = call
        self.pid = pid
        self.pty = pty
        self._streams: dict[int, asyncio.Queue[bytes | None]] = {
            1: asyncio.Queue(),
            2: asyncio.Queue(),
        }
        self._exit: asyncio.Future[tuple[int, bool]] = asyncio.get_running_loop().create_future()
        self._pump = asyncio.ensure_future(self._route())

    @classmethod
    async def start(cls, channel: AgentChannel, spec: Header, pty: bool) -> Process:
        """Ask the agent to start the process in ``spec``; return once it runs."""
        call = channel.open("start", spec)
        try:
            await call.drain()
            header, _ = await call.next()
            raise_if_error(header)
            pid = header.get("pid")
            if not isinstance(pid, int) or isinstance(pid, bool):
                raise AgentProtocolError(f"the agent reported pid {pid!r}")
        except BaseException:
            call.close()
            raise
        return cls(call, pid, pty)

    async def _route(self) -> None:
        try:
            while True:
                header, body = await self._call.next()
                if header["t"] == "out":
                    self._streams[1 if header.get("fd") == 1 else 2].put_nowait(body)
                elif header["t"] == "exit":
                    self._exit.set_result(exit_status(header))
                    return
        except BaseException as e:
            if not self._exit.done():
                error = e if isinstance(e, Exception) else AgentDisconnected("closed")
                self._exit.set_exception(error)
        finally:
            self._call.close()
            for q in self._streams.values():
                q.put_nowait(None)

    async def _iterate(self, fd: int) -> AsyncIterator[bytes]:
        while (chunk := await self._streams[fd].get()) is not None:
            yield chunk
        self._streams[fd].put_nowait(None)  # later iterations end at once too

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
        """The exit code (128 + signal number if it was killed)."""
        try:
            code, _ = await asyncio.wait_for(asyncio.shield(self._exit), timeout)
        except TimeoutError:
            raise CapsaTimeout(f"process {self.pid} still running after {timeout}s") from None
        return code

    @property
    def timed_out(self) -> bool:
        return self._exit.done() and not self._exit.exception() and self._exit.result()[1]
