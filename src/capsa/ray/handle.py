"""A cluster sandbox as its caller holds it: the node it runs on and its id there.

A :class:`ClusterSandbox` is plain data (a Ray actor handle and two strings), so it can be
passed to Ray tasks and actors and used from any node. Every call goes to the node service
that runs the sandbox; a node that is gone makes the call raise
:class:`~capsa.errors.SandboxLost` as soon as Ray knows it (never a hang), and the node's
own errors come back as the capsa errors they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Generator,
    Iterable,
    Mapping,
    Sequence,
)
from typing import Any, TypeVar

import ray
from ray.exceptions import ObjectLostError, OwnerDiedError, RayActorError, RayTaskError

from capsa.api.agent import DirEntry, FileStat
from capsa.api.code import Execution
from capsa.api.metrics import Metrics
from capsa.api.process import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_MAX_UNREAD_OUTPUT,
    CommandOptions,
    ExecResult,
    positive_limit,
)
from capsa.errors import (
    AgentProtocolError,
    CapsaError,
    CapsaTimeout,
    InvalidConfig,
    NodeLost,
    OutputLimitExceeded,
    SandboxLost,
)
from capsa.ray.node import MAX_FILE, ExecSpec

T = TypeVar("T")
LOST = (RayActorError, ObjectLostError, OwnerDiedError)


def _lost(node_id: str, error: BaseException) -> NodeLost:
    return NodeLost(f"node {node_id[:12]} is gone ({type(error).__name__})")


def _raised(node_id: str, error: RayTaskError) -> BaseException:
    """What the node raised, as the caller should see it."""
    cause = error.cause
    if isinstance(cause, CapsaError):
        return cause
    if isinstance(cause, LOST):
        return _lost(node_id, cause)
    return CapsaError(f"node {node_id[:12]}: {type(cause).__name__}: {cause}")


def _cancel(ref: Any) -> None:
    """Cancel a call on the node; one that already ended has nothing to cancel."""
    with contextlib.suppress(Exception):
        ray.cancel(ref)


async def call_node(actor: Any, node_id: str, method: str, *args: Any) -> Any:
    """``actor.method(*args)`` on the node, with Ray's failures turned into capsa's. A
    caller that gives up (cancels) cancels the call on the node too."""
    ref = getattr(actor, method).remote(*args)
    try:
        return await ref
    except asyncio.CancelledError:
        _cancel(ref)
        raise
    except RayTaskError as e:
        raise _raised(node_id, e) from None
    except LOST as e:
        raise _lost(node_id, e) from None


class ClusterSandbox:
    """A sandbox on some node of the cluster, with the local sandbox's agent API."""

    def __init__(self, node_id: str, actor: Any, sandbox_id: str) -> None:
        self.node_id = node_id
        self.id = sandbox_id
        self._actor = actor

    def __repr__(self) -> str:
        return f"<ClusterSandbox {self.id} on node {self.node_id[:12]}>"

    async def _call(self, method: str, *args: Any) -> Any:
        return await call_node(self._actor, self.node_id, method, self.id, *args)

    async def agent(self) -> ClusterAgent:
        return ClusterAgent(self)

    async def ping(self) -> None:
        """Round trip to the guest agent (SandboxLost if the sandbox or its node is gone)."""
        await self._call("ping")

    async def run_code(
        self,
        code: str,
        language: str = "python",
        *,
        context: str | None = None,
        timeout: float | None = None,
    ) -> Execution:
        """Run ``code``: in a fresh interpreter, or in the named ``context``, whose state
        lasts across calls (made on first use, at most 16 per sandbox)."""
        result = await self._call("run_code", code, language, context, timeout)
        return _checked(result, Execution)

    async def close_context(self, context: str) -> None:
        await self._call("close_context", context)

    async def metrics(self) -> Metrics:
        return _checked(await self._call("metrics"), Metrics)

    async def console_tail(self, size: int = 65536) -> str:
        return _checked(await self._call("console_tail", size), str)

    async def kill(self) -> None:
        """End the sandbox. A sandbox whose node is gone is already ended: no error."""
        with contextlib.suppress(SandboxLost):
            await call_node(self._actor, self.node_id, "kill", self.id)

    async def __aenter__(self) -> ClusterSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()


class ClusterAgent:
    """The agent of a cluster sandbox: commands and files, as ``AgentClient`` offers them."""

    def __init__(self, sandbox: ClusterSandbox) -> None:
        self._sandbox = sandbox

    def exec(
        self,
        cmd: str,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
        *,
        max_output: int = DEFAULT_MAX_OUTPUT,
        check: bool = False,
    ) -> ClusterExec:
        return ClusterExec(self._sandbox, cmd, env, cwd, timeout, stdin, check, max_output)

    async def start(
        self,
        cmd: str | Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        pty: bool = False,
        rows: int = 24,
        cols: int = 80,
        *,
        stdin: bytes = b"",
        max_unread_output: int = DEFAULT_MAX_UNREAD_OUTPUT,
    ) -> ClusterProcess:
        """Start a process whose output streams back while it runs (``pty=True``: a
        terminal)."""
        argv = [cmd] if isinstance(cmd, str) else list(cmd)
        if not argv:
            raise InvalidConfig("start() needs a command")
        spec = ExecSpec(
            shell=isinstance(cmd, str),
            cmd=argv[0],
            args=tuple(argv[1:]),
            env=tuple(sorted((env or {}).items())),
            cwd=cwd,
            timeout=timeout,
            stdin=stdin,
            pty=pty,
            rows=rows,
            cols=cols,
        )
        process = ClusterProcess(self._sandbox, spec, max_unread_output)
        await process._started()
        return process

    async def ping(self) -> None:
        await self._sandbox.ping()

    async def read_file(self, path: str, *, max_size: int = MAX_FILE) -> bytes:
        positive_limit("max_size", max_size)
        return _checked(await self._sandbox._call("read_file", path, max_size), bytes)

    async def iter_file(self, path: str, *, max_size: int = MAX_FILE) -> AsyncIterator[bytes]:
        """A guest file's content (in one piece: it crosses the cluster as one object)."""
        yield await self.read_file(path, max_size=max_size)

    async def write_file(
        self, path: str, data: bytes, mode: int = 0o644, make_parents: bool = False
    ) -> None:
        await self._sandbox._call("write_file", path, bytes(data), mode, make_parents)

    async def read_tar(self, path: str) -> AsyncIterator[bytes]:
        """The guest directory ``path`` as a tar stream, in chunks as the guest makes it."""
        sandbox = self._sandbox
        chunks = sandbox._actor.read_tar.remote(sandbox.id, path)
        finished = False
        try:
            async for ref in chunks:
                yield _checked(await ref, bytes)
            finished = True
        except RayTaskError as e:
            raise _raised(sandbox.node_id, e) from None
        except LOST as e:
            raise _lost(sandbox.node_id, e) from None
        finally:
            if not finished:  # the reader stopped early: so does the tar on the node
                _cancel(chunks)

    async def write_tar(self, path: str, chunks: AsyncIterable[bytes] | Iterable[bytes]) -> None:
        """Unpack a tar stream into the guest directory ``path`` (made if missing); through a
        cluster the stream crosses as one object of at most 256 MiB."""
        data = bytearray()
        if isinstance(chunks, AsyncIterable):
            async for chunk in chunks:
                data += _within(data, chunk)
        else:
            for chunk in chunks:
                data += _within(data, chunk)
        await self._sandbox._call("write_tar", path, bytes(data))

    async def _file_op(self, op: str, *args: Any) -> Any:
        return await self._sandbox._call("file_op", op, args)

    async def stat(self, path: str) -> FileStat:
        return _checked(await self._file_op("stat", path), FileStat)

    async def list_dir(self, path: str) -> list[DirEntry]:
        entries = _checked(await self._file_op("list_dir", path), list)
        return [_checked(entry, DirEntry) for entry in entries]

    async def exists(self, path: str) -> bool:
        return _checked(await self._file_op("exists", path), bool)

    async def remove(self, path: str, recursive: bool = False) -> None:
        await self._file_op("remove", path, recursive)

    async def mkdir(self, path: str, parents: bool = True, mode: int = 0o755) -> None:
        await self._file_op("mkdir", path, parents, mode)

    async def symlink(self, target: str, path: str) -> None:
        await self._file_op("symlink", target, path)

    async def readlink(self, path: str) -> str:
        return _checked(await self._file_op("readlink", path), str)


class ClusterExec(CommandOptions):
    """A command run to completion on the sandbox's node: one round trip."""

    def __init__(
        self,
        sandbox: ClusterSandbox,
        cmd: str,
        env: Mapping[str, str] | None,
        cwd: str | None,
        timeout: float | None,
        stdin: bytes | None,
        check: bool,
        max_output: int,
    ) -> None:
        super().__init__(cmd, env, cwd, timeout, stdin, check)
        self._sandbox = sandbox
        self._max_output = positive_limit("max_output", max_output)

    def max_output(self, limit: int) -> ClusterExec:
        self._max_output = positive_limit("max_output", limit)
        return self

    def _spec(self) -> ExecSpec:
        return ExecSpec(
            cmd=self._cmd,
            args=tuple(self._args),
            env=tuple(sorted(self._env.items())),
            cwd=self._cwd,
            timeout=self._timeout,
            stdin=self._stdin,
            max_output=self._max_output,
        )

    async def run(self) -> ExecResult:
        result = _checked(await self._sandbox._call("exec", self._spec()), ExecResult)
        failure = self._failure(result)
        if failure is not None:
            raise failure
        return result

    def __await__(self) -> Generator[Any, None, ExecResult]:
        return self.run().__await__()


class _Stream:
    """One output stream of a started process, held for its reader (bounded)."""

    def __init__(self, limit: int) -> None:
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._limit = limit
        self._changed = asyncio.Event()
        self._end: BaseException | None = None
        self._ended = False

    def push(self, chunk: bytes) -> bool:
        """Keep ``chunk``; False once the reader is too far behind."""
        self._chunks.append(chunk)
        self._size += len(chunk)
        self._changed.set()
        return self._size <= self._limit

    def end(self, error: BaseException | None = None) -> None:
        if not self._ended:
            self._ended, self._end = True, error
            self._changed.set()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._size -= len(chunk)
                yield chunk
                continue
            if self._ended:
                if self._end is not None:
                    raise self._end
                return
            self._changed.clear()
            await self._changed.wait()


class ClusterProcess:
    """A process started in a cluster sandbox: its output as it comes, its exit code.

    Output waits for its reader in a buffer per stream of at most ``max_unread_output``
    bytes; past that the process is killed and the streams end with
    :class:`~capsa.errors.OutputLimitExceeded`, as for a local process."""

    def __init__(self, sandbox: ClusterSandbox, spec: ExecSpec, max_unread_output: int) -> None:
        self._sandbox = sandbox
        self._spec = spec
        self._limit = positive_limit("max_unread_output", max_unread_output)
        self._streams = {"stdout": _Stream(self._limit), "stderr": _Stream(self._limit)}
        self._pid: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._exit: asyncio.Future[tuple[int, bool]] = asyncio.get_running_loop().create_future()
        self._exit.add_done_callback(_retrieve)
        self._pump: asyncio.Task[None] | None = None
        self.pid = 0  # the guest's, once started

    async def _started(self) -> None:
        self._pump = asyncio.ensure_future(self._follow())
        started: set[asyncio.Future[Any]] = {self._pid, self._pump}
        await asyncio.wait(started, return_when=asyncio.FIRST_COMPLETED)
        if not self._pid.done():
            self._fail(AgentProtocolError("the node ended the process stream before it started"))
        self.pid = self._pid.result()  # or why it did not start

    async def _follow(self) -> None:
        sandbox = self._sandbox
        events = sandbox._actor.stream.remote(sandbox.id, self._spec)
        try:
            async for ref in events:
                overflow = self._route(await ref)
                if overflow is not None:
                    await self.kill()
                    self._fail(self._overflow(overflow))
                    return
            if not self._exit.done():
                self._fail(AgentProtocolError("the process stream ended without an exit status"))
        except RayTaskError as e:
            self._fail(_raised(sandbox.node_id, e))
        except LOST as e:
            self._fail(_lost(sandbox.node_id, e))
        except CapsaError as e:
            self._fail(e)
        except asyncio.CancelledError:
            _cancel(events)  # and the process with it
            self._fail(CapsaError("the process stream was cancelled"))
            raise

    def _route(self, event: Any) -> str | None:
        """Take one event; the name of a stream whose reader fell too far behind."""
        if not isinstance(event, tuple) or len(event) != 2:
            raise AgentProtocolError(f"the node sent process event {event!r:.80}")
        kind, value = event
        if kind == "pid" and isinstance(value, int) and not self._pid.done():
            self._pid.set_result(value)
            return None
        if kind in self._streams and isinstance(value, bytes):
            return None if self._streams[kind].push(value) else kind
        if kind == "exit" and isinstance(value, tuple) and len(value) == 2:
            code, timed_out = value
            for stream in self._streams.values():
                stream.end()
            if not self._exit.done():
                self._exit.set_result((int(code), bool(timed_out)))
            return None
        raise AgentProtocolError(f"the node sent process event {kind!r}")

    def _overflow(self, stream: str) -> OutputLimitExceeded:
        return OutputLimitExceeded(
            f"process {self.pid}: more than {self._limit} bytes of {stream} unread; killed",
            stream=1 if stream == "stdout" else 2,
            limit=self._limit,
        )

    def _fail(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.end(error)
        if not self._pid.done():
            self._pid.set_exception(error)
        if not self._exit.done():
            self._exit.set_exception(error)

    @property
    def stdout(self) -> AsyncIterator[bytes]:
        return self._streams["stdout"].__aiter__()

    @property
    def stderr(self) -> AsyncIterator[bytes]:
        return self._streams["stderr"].__aiter__()

    async def wait(self, timeout: float | None = None) -> int:
        """The exit code (128 + signal when killed); CapsaTimeout if it runs on."""
        try:
            code, _ = await asyncio.wait_for(asyncio.shield(self._exit), timeout)
        except TimeoutError:
            raise CapsaTimeout(f"process {self.pid} still runs after {timeout}s") from None
        return code

    @property
    def timed_out(self) -> bool:
        return self._exit.done() and not self._exit.exception() and self._exit.result()[1]

    async def write_stdin(self, data: bytes) -> None:
        await self._sandbox._call("write_stdin", self.pid, bytes(data))

    async def close_stdin(self) -> None:
        await self._sandbox._call("close_stdin", self.pid)

    async def resize(self, rows: int, cols: int) -> None:
        await self._sandbox._call("resize", self.pid, rows, cols)

    async def kill(self, sig: int = signal.SIGKILL) -> None:
        if not self._exit.done():
            with contextlib.suppress(CapsaError):
                await self._sandbox._call("signal", self.pid, int(sig))


def _within(data: bytearray, chunk: bytes) -> bytes:
    if len(data) + len(chunk) > MAX_FILE:
        raise InvalidConfig(f"a tar stream through a cluster is at most {MAX_FILE} bytes")
    return chunk


def _retrieve(future: asyncio.Future[tuple[int, bool]]) -> None:
    if not future.cancelled():
        future.exception()


def _checked(value: object, kind: type[T]) -> T:
    """A node's answer, checked to be what was asked for."""
    if not isinstance(value, kind):
        raise AgentProtocolError(f"the node answered {type(value).__name__}, not {kind.__name__}")
    return value
