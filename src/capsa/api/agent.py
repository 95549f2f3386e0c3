"""The host side of the agent channel: a typed async client for the guest agent.

One reader task owns the channel and routes every frame to its request by id, so any
number of calls run at once. See :mod:`capsa.guest.protocol` for the wire format.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import stat as stat_module
import time
from collections.abc import AsyncIterator, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsa.errors import AgentDisconnected, AgentError, AgentProtocolError, CapsaTimeout
from capsa.guest.protocol import CHUNK, VERSION, Decoder, ProtocolError, encode

Header = dict[str, Any]
Frame = tuple[Header, bytes]
# A file read keeps at most this many chunks in flight before the channel is paused.
_READ_WINDOW = 32


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


@dataclass(frozen=True)
class FileStat:
    size: int
    mode: int
    mtime: float
    uid: int
    gid: int
    is_dir: bool
    is_symlink: bool


@dataclass(frozen=True)
class DirEntry:
    name: str
    is_dir: bool
    size: int
    mode: int
    mtime: float
    is_symlink: bool = False


@dataclass(frozen=True)
class MountInfo:
    source: str
    target: str
    fstype: str


@dataclass(frozen=True)
class SystemInfo:
    kernel_version: str
    hostname: str
    cpus: int
    memory_bytes: int
    uptime: float
    mounts: list[MountInfo] = field(default_factory=list)


class _Call:
    """Frames for one request id, in arrival order."""

    def __init__(self, bounded: bool) -> None:
        self.frames: asyncio.Queue[Frame | BaseException] = asyncio.Queue(
            _READ_WINDOW if bounded else 0
        )

    async def next(self) -> Frame:
        item = await self.frames.get()
        if isinstance(item, BaseException):
            raise item
        return item


def _raise_if_error(h: Header) -> Header:
    if h["t"] == "err":
        raise AgentError(str(h.get("msg", "agent error")), h.get("errno"))
    return h


class AgentClient:
    """Talks to one guest agent over a byte stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._calls: dict[int, _Call] = {}
        self._hello: asyncio.Future[Header] = asyncio.get_running_loop().create_future()
        self._exit_code: int | None = None
        self._exited = asyncio.Event()
        self._closed: BaseException | None = None
        self._task = asyncio.ensure_future(self._read_loop())

    @classmethod
    async def connect_socket(cls, sock: socket.socket) -> AgentClient:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer)

    # -- channel ------------------------------------------------------------------------

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
            call.frames.put_nowait(error)
        self._calls.clear()
        self._exited.set()

    async def _route(self, h: Header, body: bytes) -> None:
        kind = h["t"]
        if kind == "hello":
            if not self._hello.done():
                self._hello.set_result(h)
        elif kind == "event":
            if h.get("event") == "exit":
                self._exit_code = int(h.get("code", 0))
                self._exited.set()
            self._send({"t": "ack", "id": h["id"]})
        elif (call := self._calls.get(h["id"])) is not None:
            await call.frames.put((h, body))

    def _send(self, header: Header, body: bytes = b"") -> None:
        if self._closed is not None:
            raise self._closed
        self._writer.write(encode(header, body))

    def _open(
        self, op: str, fields: Mapping[str, Any], body: bytes = b"", bounded: bool = False
    ) -> tuple[int, _Call]:
        rid = next(self._ids)
        call = _Call(bounded)
        self._calls[rid] = call
        try:
            self._send({"t": "req", "id": rid, "op": op, **fields}, body)
        except BaseException:
            self._calls.pop(rid, None)
            raise
        return rid, call

    def _done(self, rid: int) -> None:
        self._calls.pop(rid, None)

    async def _request(self, op: str, body: bytes = b"", **fields: Any) -> Header:
        rid, call = self._open(op, fields, body)
        try:
            await self._writer.drain()
            while True:
                h, _ = await call.next()
                if h["t"] in ("res", "err"):
                    return _raise_if_error(h)
        finally:
            self._done(rid)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    # -- readiness and lifecycle ----------------------------------------------------------

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait for the agent's hello (it is sent once, when the agent starts)."""
        try:
            hello = await asyncio.wait_for(asyncio.shield(self._hello), timeout)
        except TimeoutError:
            raise CapsaTimeout(f"agent not ready after {timeout}s") from None
        if hello.get("v") != VERSION:
            raise AgentProtocolError(f"agent speaks protocol {hello.get('v')}, we speak {VERSION}")

    @property
    def exit_code(self) -> int | None:
        """The main process's exit code, once the guest reported it."""
        return self._exit_code

    async def wait_exit(self) -> int | None:
        await self._exited.wait()
        return self._exit_code

    async def resume(self, mac: str | None) -> None:
        """Tell the agent of a restored VM that it is a new machine (RNG seed, clock, MAC);
        its answer stands in for the hello it sent long ago, in the snapshot's past."""
        h = await self._request("resume", os.urandom(64), mac=mac, time_ns=time.time_ns())
        if h.get("v") != VERSION:
            raise AgentProtocolError(f"agent speaks protocol {h.get('v')}, we speak {VERSION}")
        if not self._hello.done():
            self._hello.set_result(h)

    async def container(self, spec: Mapping[str, Any]) -> None:
        """Make the OCI image's root (attached as a disk) the place where commands run."""
        await self._request("container", **spec)

    async def ping(self) -> None:
        await self._request("ping")

    async def shutdown(self) -> None:
        """Ask the guest to power off (the agent answers first)."""
        await self._request("shutdown")

    # -- processes ----------------------------------------------------------------------

    def exec(
        self,
        cmd: str,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
    ) -> ExecCommand:
        """Run a command to completion: ``await agent.exec("ls -la")`` or, as a builder,
        ``await agent.exec("uname").arg("-a").run()`` (with args no shell is involved)."""
        return ExecCommand(self, cmd, env, cwd, timeout, stdin)

    async def _exec(self, spec: Header, stdin: bytes) -> ExecResult:
        rid, call = self._open("exec", spec, stdin)
        out = {1: bytearray(), 2: bytearray()}
        try:
            await self._writer.drain()
            while True:
                h, body = await call.next()
                if h["t"] == "out":
                    out[1 if h.get("fd") == 1 else 2] += body
                elif h["t"] in ("res", "err"):
                    _raise_if_error(h)
                    return ExecResult(
                        bytes(out[1]), bytes(out[2]), int(h["code"]), bool(h.get("timed_out"))
                    )
        finally:
            self._done(rid)

    async def start(
        self,
        cmd: str | Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        pty: bool = False,
        rows: int = 24,
        cols: int = 80,
    ) -> Process:
        """Start a process whose output streams back while it runs (``pty=True``: a terminal)."""
        spec = _command_spec(cmd, env, cwd, timeout)
        spec.update(pty=pty, rows=rows, cols=cols)
        rid, call = self._open("start", spec)
        await self._writer.drain()
        try:
            h, _ = await call.next()
            _raise_if_error(h)
        except BaseException:
            self._done(rid)
            raise
        return Process(self, rid, call, int(h["pid"]), pty)

    # -- files --------------------------------------------------------------------------

    async def read_file(self, path: str) -> bytes:
        data = bytearray()
        async for chunk in self.iter_file(path):
            data += chunk
        return bytes(data)

    async def iter_file(self, path: str) -> AsyncIterator[bytes]:
        """A guest file's content in chunks, never whole in memory."""
        rid, call = self._open("read_file", {"path": path}, bounded=True)
        try:
            await self._writer.drain()
            while True:
                h, body = await call.next()
                if h["t"] == "data":
                    yield body
                elif h["t"] in ("res", "err"):
                    _raise_if_error(h)
                    return
        finally:
            self._done(rid)

    async def write_file(
        self, path: str, data: bytes, mode: int = 0o644, make_parents: bool = False
    ) -> None:
        await self._write_stream(path, _chunks_of(data), mode, make_parents)

    async def _write_stream(self, path: str, chunks: Any, mode: int, make_parents: bool) -> None:
        rid, call = self._open(
            "write_file", {"path": path, "mode": mode, "make_parents": make_parents}
        )
        try:
            for chunk in chunks:
                self._send({"t": "data", "id": rid}, chunk)
                await self._writer.drain()
            self._send({"t": "end", "id": rid})
            await self._writer.drain()
            while True:
                h, _ = await call.next()
                if h["t"] in ("res", "err"):
                    _raise_if_error(h)
                    return
        finally:
            self._done(rid)

    async def exists(self, path: str) -> bool:
        return bool((await self._request("exists", path=path))["exists"])

    async def stat(self, path: str) -> FileStat:
        h = await self._request("stat", path=path)
        return FileStat(
            h["size"], h["mode"], h["mtime"], h["uid"], h["gid"], h["is_dir"], h["is_symlink"]
        )

    async def list_dir(self, path: str) -> list[DirEntry]:
        h = await self._request("list_dir", path=path)
        return [
            DirEntry(e["name"], e["is_dir"], e["size"], e["mode"], e["mtime"], e["is_symlink"])
            for e in h["entries"]
        ]

    async def remove(self, path: str, recursive: bool = False) -> None:
        await self._request("remove", path=path, recursive=recursive)

    async def mkdir(self, path: str, parents: bool = True, mode: int = 0o755) -> None:
        await self._request("mkdir", path=path, parents=parents, mode=mode)

    async def symlink(self, target: str, path: str) -> None:
        await self._request("symlink", path=path, target=target)

    async def readlink(self, path: str) -> str:
        return str((await self._request("readlink", path=path))["target"])

    async def copy_to(self, host_path: str | Path, guest_path: str) -> None:
        """Copy a host file or directory tree into the guest (streamed)."""
        src = Path(host_path)
        if src.is_symlink():
            await self.symlink(os.readlink(src), guest_path)
        elif src.is_dir():
            await self.mkdir(guest_path, mode=stat_module.S_IMODE(src.stat().st_mode))
            for child in sorted(src.iterdir()):
                await self.copy_to(child, f"{guest_path.rstrip('/')}/{child.name}")
        else:
            mode = stat_module.S_IMODE(src.stat().st_mode)
            with open(src, "rb") as f:
                await self._write_stream(guest_path, iter(lambda: f.read(CHUNK), b""), mode, False)

    async def copy_from(self, guest_path: str, host_path: str | Path) -> None:
        """Copy a guest file or directory tree to the host (streamed)."""
        dest = Path(host_path)
        st = await self.stat(guest_path)
        if st.is_symlink:
            dest.symlink_to(await self.readlink(guest_path))
        elif st.is_dir:
            dest.mkdir(mode=stat_module.S_IMODE(st.mode) | 0o700, exist_ok=True)
            for entry in await self.list_dir(guest_path):
                await self.copy_from(f"{guest_path.rstrip('/')}/{entry.name}", dest / entry.name)
        else:
            tmp = dest.with_name(f".{dest.name}.capsa-part")
            try:
                with open(tmp, "wb") as f:
                    async for chunk in self.iter_file(guest_path):
                        f.write(chunk)
                tmp.chmod(stat_module.S_IMODE(st.mode))
                tmp.replace(dest)
            finally:
                tmp.unlink(missing_ok=True)

    async def info(self) -> SystemInfo:
        h = await self._request("info")
        return SystemInfo(
            kernel_version=h["kernel_version"],
            hostname=h["hostname"],
            cpus=h["cpus"],
            memory_bytes=h["memory_bytes"],
            uptime=h["uptime"],
            mounts=[MountInfo(m["source"], m["target"], m["fstype"]) for m in h["mounts"]],
        )


def _chunks_of(data: bytes) -> Generator[bytes, None, None]:
    view = memoryview(data)
    for i in range(0, len(data), CHUNK):
        yield bytes(view[i : i + CHUNK])


def _command_spec(
    cmd: str | Sequence[str],
    env: Mapping[str, str] | None,
    cwd: str | None,
    timeout: float | None,
) -> Header:
    spec: Header = {"cmd": cmd} if isinstance(cmd, str) else {"argv": list(cmd)}
    if env:
        spec["env"] = dict(env)
    if cwd is not None:
        spec["cwd"] = cwd
    if timeout is not None:
        spec["timeout"] = timeout
    return spec


class ExecCommand:
    """A command to run: awaitable as is, or refined with ``arg``/``env``/``cwd`` first."""

    def __init__(
        self,
        client: AgentClient,
        cmd: str,
        env: Mapping[str, str] | None,
        cwd: str | None,
        timeout: float | None,
        stdin: bytes | None,
    ) -> None:
        self._client = client
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
        spec = _command_spec(cmd, self._env, self._cwd, self._timeout)
        return await self._client._exec(spec, self._stdin)

    def __await__(self) -> Generator[Any, None, ExecResult]:
        return self.run().__await__()


class Process:
    """A started guest process: streamed output, stdin, signals, exit code."""

    def __init__(self, client: AgentClient, rid: int, call: _Call, pid: int, pty: bool) -> None:
        self._client = client
        self._rid = rid
        self.pid = pid
        self.pty = pty
        self._streams: dict[int, asyncio.Queue[bytes | None]] = {
            1: asyncio.Queue(),
            2: asyncio.Queue(),
        }
        self._exit: asyncio.Future[tuple[int, bool]] = asyncio.get_running_loop().create_future()
        self._pump = asyncio.ensure_future(self._route(call))

    async def _route(self, call: _Call) -> None:
        try:
            while True:
                h, body = await call.next()
                if h["t"] == "out":
                    self._streams[1 if h.get("fd") == 1 else 2].put_nowait(body)
                elif h["t"] == "exit":
                    self._exit.set_result((int(h["code"]), bool(h.get("timed_out"))))
                    return
        except BaseException as e:
            if not self._exit.done():
                self._exit.set_exception(
                    e if isinstance(e, Exception) else AgentDisconnected("closed")
                )
        finally:
            self._client._done(self._rid)
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
        for chunk in _chunks_of(data):
            self._client._send({"t": "stdin", "id": self._rid}, chunk)
            await self._client._writer.drain()

    async def close_stdin(self) -> None:
        self._client._send({"t": "stdin_close", "id": self._rid})
        await self._client._writer.drain()

    async def kill(self, sig: int = signal.SIGKILL) -> None:
        self._client._send({"t": "kill", "id": self._rid, "sig": int(sig)})
        await self._client._writer.drain()

    async def resize(self, rows: int, cols: int) -> None:
        self._client._send({"t": "resize", "id": self._rid, "rows": rows, "cols": cols})
        await self._client._writer.drain()

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
