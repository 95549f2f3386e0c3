"""The node service: one per Ray node, owning that node's sandboxes.

It runs capsa's ordinary async API on its node (so templates, the image cache and the
watchdog are the node's own) and is reached only through its Ray actor. Sandboxes are
known by an id it makes; every one belongs to an *owner*, the lease of the
:class:`~capsa.ray.cluster.Cluster` that asked for it. A lease is a small actor that Ray
ends with whoever created it (driver, task or actor), so when an owner dies, even by
SIGKILL, the service sees its lease gone and kills what it owned.

What callers send is bounded here like any guest input: sandboxes per node (slots),
started processes per sandbox, code contexts per sandbox, bytes per file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
import warnings
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import ray
from ray.exceptions import ActorDiedError

from capsa.api.code import CodeContext, Execution
from capsa.api.metrics import Metrics
from capsa.api.process import DEFAULT_MAX_OUTPUT, ExecResult, Process, positive_limit
from capsa.api.sandbox_handle import Sandbox, ready_or_killed
from capsa.backends.qemu.accel import SlowAccelWarning
from capsa.errors import CapsaError, InvalidConfig, NoCapacity, SandboxLost
from capsa.ray.recipe import Recipe

log = logging.getLogger("capsa.ray")

MEMORY_PER_SLOT_MB = 256  # an idle restored sandbox's share of the node's memory
MEMORY_RESERVE_MB = 1024  # left to the node itself
MAX_STREAMS = 64  # started processes followed at once, per sandbox
MAX_CONTEXTS = 16  # code contexts, per sandbox
MAX_FILE = 256 << 20  # one read_file / write_file through the cluster
LEASE_CHECK = 2.0  # seconds between looks at the owners' leases
FORGOTTEN = 4096  # ended sandboxes remembered, to say "lost" rather than "unknown"
MAX_OWNERS = 1024  # cluster connections followed at once
STREAM_AHEAD = 16  # stream items a slow reader may leave waiting in the object store


@dataclass(frozen=True)
class NodeInfo:
    """What a node offers: the placement reads it."""

    node_id: str
    hostname: str
    usable: bool
    why_not: str  # empty when usable
    accelerator: str  # "kvm", "tcg"...
    slots: int
    used: int
    memory_available_mb: int

    @property
    def free_slots(self) -> int:
        return max(0, self.slots - self.used) if self.usable else 0

    def has_room(self, memory_mb: int) -> bool:
        return self.free_slots > 0 and self.memory_available_mb >= memory_mb + MEMORY_RESERVE_MB


@dataclass(frozen=True)
class ExecSpec:
    """A command as the caller refined it: a shell line, or an argv (no shell)."""

    cmd: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None
    timeout: float | None = None
    stdin: bytes = b""
    max_output: int = DEFAULT_MAX_OUTPUT
    pty: bool = False
    rows: int = 24
    cols: int = 80
    shell: bool = True  # for start(): a shell line, or an argv (even of one word)

    def command(self) -> str | list[str]:
        return self.cmd if self.shell and not self.args else [self.cmd, *self.args]

    def checked(self) -> ExecSpec:
        """The spec within this node's bounds (the caller is not trusted with them)."""
        positive_limit("max_output", self.max_output)
        if len(self.stdin) > MAX_FILE:
            raise InvalidConfig(f"stdin through a cluster is at most {MAX_FILE} bytes")
        return replace(self, max_output=min(self.max_output, DEFAULT_MAX_OUTPUT))


@dataclass
class _Held:
    sandbox: Sandbox
    owner: str
    created: float
    processes: dict[int, Process] = field(default_factory=dict)
    streams: int = 0  # processes being followed, counted before they start
    ended_pids: deque[int] = field(default_factory=lambda: deque(maxlen=MAX_STREAMS))
    contexts: dict[str, CodeContext] = field(default_factory=dict)
    contexts_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in MiB."""
    values: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                values[name] = int(parts[0]) // 1024
    return values


class NodeService:
    """The body of the per-node actor (see :func:`capsa.ray.cluster.node_actor`)."""

    def __init__(self, node_id: str, slots: int | None = None) -> None:
        # The node's accelerator is in its info(); not a warning per VM in the driver's log.
        warnings.simplefilter("ignore", SlowAccelWarning)
        self.node_id = node_id
        self._slots = slots if slots is not None else self._default_slots()
        self._held: dict[str, _Held] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()  # id -> why
        self._starting: dict[str, set[asyncio.Future[Sandbox]]] = {}  # owner -> starts
        self._leases: dict[str, Any] = {}  # owner -> lease actor handle
        self._released: OrderedDict[str, None] = OrderedDict()
        self._watch: asyncio.Task[None] | None = None
        self._backend: tuple[bool, str, str] | None = None

    @staticmethod
    def _default_slots() -> int:
        return max(1, _meminfo().get("MemTotal", 0) // MEMORY_PER_SLOT_MB)

    # -- capacity ---------------------------------------------------------------------------

    async def info(self) -> NodeInfo:
        usable, why_not, accelerator = await self._backend_state()
        return NodeInfo(
            node_id=self.node_id,
            hostname=socket.gethostname(),
            usable=usable,
            why_not=why_not,
            accelerator=accelerator,
            slots=self._slots,
            used=self._used(),
            memory_available_mb=_meminfo().get("MemAvailable", 0),
        )

    async def _backend_state(self) -> tuple[bool, str, str]:
        if self._backend is None:
            self._backend = await asyncio.to_thread(_probe_backend)
        return self._backend

    def _used(self) -> int:
        running = sum(1 for h in self._held.values() if not h.sandbox.status().is_finished)
        return running + sum(len(tasks) for tasks in self._starting.values())

    async def _check_room(self, recipe: Recipe) -> None:
        info = await self.info()
        if not info.usable:
            raise NoCapacity(f"node {self.node_id[:12]} cannot run sandboxes: {info.why_not}")
        if not info.has_room(recipe.memory_mb):
            raise NoCapacity(
                f"node {self.node_id[:12]} is full ({info.used}/{info.slots} sandboxes, "
                f"{info.memory_available_mb} MiB available)"
            )

    # -- sandboxes --------------------------------------------------------------------------

    async def create(self, recipe: Recipe, owner: str, lease: Any) -> str:
        """Start a sandbox for ``owner`` and return its id once its agent is ready."""
        if owner in self._released:
            raise SandboxLost("this cluster connection was closed")
        await self._check_room(recipe)
        self._follow(owner, lease)
        # A task of its own, so that releasing the owner can stop it half-way.
        starting = asyncio.ensure_future(_start(recipe))
        self._starting.setdefault(owner, set()).add(starting)
        try:
            sandbox = await asyncio.shield(starting)
        except asyncio.CancelledError:
            if starting.cancelled():
                raise SandboxLost(
                    "this cluster connection was closed while the sandbox started"
                ) from None
            starting.cancel()
            raise
        finally:
            self._starting[owner].discard(starting)
            if not self._starting[owner]:
                del self._starting[owner]
        sid = secrets.token_hex(8)
        self._held[sid] = _Held(sandbox, owner, time.time())
        return sid

    def _get(self, sid: str) -> _Held:
        held = self._held.get(sid)
        if held is None:
            why = self._ended.get(sid, "its node service does not know it")
            raise SandboxLost(f"sandbox {sid} on node {self.node_id[:12]} is gone: {why}")
        return held

    async def kill(self, sid: str) -> None:
        held = self._held.pop(sid, None)
        if held is None:
            return
        self._remember(sid, "it was killed")
        await _end(held)

    async def release_owner(self, owner: str) -> int:
        """Kill everything ``owner`` holds; later creates for it are refused."""
        self._released[owner] = None
        while len(self._released) > FORGOTTEN:
            self._released.popitem(last=False)
        self._leases.pop(owner, None)
        return await self._kill_owned(owner, "its owner closed the cluster connection")

    async def _stop_starting(self, owner: str) -> None:
        starting = self._starting.get(owner, set())
        for task in starting:
            task.cancel()
        await asyncio.gather(*starting, return_exceptions=True)

    async def _kill_owned(self, owner: str, why: str) -> int:
        await self._stop_starting(owner)
        ids = [sid for sid, held in self._held.items() if held.owner == owner]
        ended = [self._held.pop(sid) for sid in ids]
        for sid in ids:
            self._remember(sid, why)
        await asyncio.gather(*(_end(held) for held in ended), return_exceptions=True)
        return len(ids)

    def _remember(self, sid: str, why: str) -> None:
        self._ended[sid] = why
        while len(self._ended) > FORGOTTEN:
            self._ended.popitem(last=False)

    async def list(self) -> list[tuple[str, str, float, bool]]:
        """(id, owner, created, running) of every sandbox held."""
        return [
            (sid, h.owner, h.created, not h.sandbox.status().is_finished)
            for sid, h in self._held.items()
        ]

    async def shutdown(self) -> int:
        """Kill every sandbox on this node (the actor is then ended by the caller)."""
        owners = {held.owner for held in self._held.values()}
        counts = [await self._kill_owned(owner, "its node service was stopped") for owner in owners]
        return sum(counts)

    # -- owners -----------------------------------------------------------------------------

    def _follow(self, owner: str, lease: Any) -> None:
        if owner not in self._leases and len(self._leases) >= MAX_OWNERS:
            raise NoCapacity(f"node {self.node_id[:12]} serves {MAX_OWNERS} connections")
        self._leases.setdefault(owner, lease)
        if self._watch is None or self._watch.done():
            self._watch = asyncio.ensure_future(self._look_after())

    async def _look_after(self) -> None:
        """Every few seconds: end what dead owners held, and forget sandboxes that ended
        by themselves (their lifetime or idle timeout)."""
        while self._leases or self._held:
            await asyncio.sleep(LEASE_CHECK)
            try:
                await self._reap_dead_owners()
                await self._forget_ended()
            except Exception:
                log.exception("node service housekeeping failed; going on")

    async def _reap_dead_owners(self) -> None:
        owners = list(self._leases.items())
        alive = await asyncio.gather(*(_lease_alive(lease) for _, lease in owners))
        for (owner, _), is_alive in zip(owners, alive, strict=True):
            if not is_alive:
                log.warning("owner %s is gone: killing its sandboxes", owner)
                self._leases.pop(owner, None)
                await self._kill_owned(owner, "its owner (driver, task or actor) died")

    async def _forget_ended(self) -> None:
        ended = [sid for sid, held in self._held.items() if held.sandbox.status().is_finished]
        for sid in ended:
            held = self._held.pop(sid)
            why = held.sandbox.expired or held.sandbox.status()
            self._remember(sid, f"it ended ({why})")
            await _end(held)

    # -- the agent ----------------------------------------------------------------------------

    async def ping(self, sid: str) -> None:
        await (await self._get(sid).sandbox.agent()).ping()

    async def exec(self, sid: str, spec: ExecSpec) -> ExecResult:
        spec = spec.checked()
        agent = await self._get(sid).sandbox.agent()
        command = agent.exec(
            spec.cmd,
            env=dict(spec.env),
            cwd=spec.cwd,
            timeout=spec.timeout,
            stdin=spec.stdin,
            max_output=spec.max_output,
        )
        return await command.args(spec.args).run()

    @ray.method(num_returns="streaming", _generator_backpressure_num_objects=STREAM_AHEAD)
    async def stream(self, sid: str, spec: ExecSpec) -> AsyncIterator[tuple[str, Any]]:
        """A started process's life as events: ("pid", pid), then ("stdout"|"stderr",
        bytes) as it writes, then ("exit", (code, timed_out))."""
        spec = spec.checked()
        held = self._get(sid)
        if held.streams >= MAX_STREAMS:
            raise NoCapacity(f"sandbox {sid} already streams {MAX_STREAMS} processes")
        held.streams += 1
        try:
            agent = await held.sandbox.agent()
            process = await agent.start(
                spec.command(),
                env=dict(spec.env),
                cwd=spec.cwd,
                timeout=spec.timeout,
                pty=spec.pty,
                rows=spec.rows,
                cols=spec.cols,
            )
        except BaseException:
            held.streams -= 1
            raise
        held.processes[process.pid] = process
        exited = False
        try:
            if spec.stdin:
                await process.write_stdin(spec.stdin)
            yield ("pid", process.pid)
            async for event in _merged_output(process):
                yield event
            code = await process.wait()
            exited = True
            yield ("exit", (code, process.timed_out))
        finally:
            held.streams -= 1
            held.processes.pop(process.pid, None)
            held.ended_pids.append(process.pid)
            if not exited:  # the caller stopped following it
                with contextlib.suppress(CapsaError):
                    await process.kill()

    def _process(self, sid: str, pid: int) -> Process | None:
        """The process ``pid`` streams from; None once it ended (a late call on it does
        nothing, as writing to a pipe whose reader is gone loses the data)."""
        held = self._get(sid)
        process = held.processes.get(pid)
        if process is None and pid not in held.ended_pids:
            raise InvalidConfig(f"no process {pid} is streaming from sandbox {sid}")
        return process

    async def signal(self, sid: str, pid: int, sig: int) -> None:
        if process := self._process(sid, pid):
            await process.kill(sig)

    async def write_stdin(self, sid: str, pid: int, data: bytes) -> None:
        if len(data) > MAX_FILE:
            raise InvalidConfig(f"stdin through a cluster is at most {MAX_FILE} bytes a call")
        if process := self._process(sid, pid):
            await process.write_stdin(data)

    async def close_stdin(self, sid: str, pid: int) -> None:
        if process := self._process(sid, pid):
            await process.close_stdin()

    async def resize(self, sid: str, pid: int, rows: int, cols: int) -> None:
        if process := self._process(sid, pid):
            await process.resize(rows, cols)

    async def read_file(self, sid: str, path: str, max_size: int) -> bytes:
        agent = await self._get(sid).sandbox.agent()
        return await agent.read_file(path, max_size=min(max_size, MAX_FILE))

    async def write_file(
        self, sid: str, path: str, data: bytes, mode: int, make_parents: bool
    ) -> None:
        if len(data) > MAX_FILE:
            raise InvalidConfig(f"write_file through a cluster takes at most {MAX_FILE} bytes")
        agent = await self._get(sid).sandbox.agent()
        await agent.write_file(path, data, mode=mode, make_parents=make_parents)

    @ray.method(num_returns="streaming", _generator_backpressure_num_objects=STREAM_AHEAD)
    async def read_tar(self, sid: str, path: str) -> AsyncIterator[bytes]:
        agent = await self._get(sid).sandbox.agent()
        async for chunk in agent.read_tar(path):
            yield chunk

    async def write_tar(self, sid: str, path: str, data: bytes) -> None:
        if len(data) > MAX_FILE:
            raise InvalidConfig(f"write_tar through a cluster takes at most {MAX_FILE} bytes")
        agent = await self._get(sid).sandbox.agent()
        await agent.write_tar(path, [data])

    async def file_op(self, sid: str, op: str, args: Sequence[Any]) -> Any:
        """The agent's small file operations, by name."""
        if op not in FILE_OPS:
            raise InvalidConfig(f"unknown file operation {op!r}")
        agent = await self._get(sid).sandbox.agent()
        return await getattr(agent, op)(*args)

    async def run_code(
        self, sid: str, code: str, language: str, context: str | None, timeout: float | None
    ) -> Execution:
        held = self._get(sid)
        if context is None:
            return await held.sandbox.run_code(code, language, timeout=timeout)
        async with held.contexts_lock:  # one creation at a time: the bound holds
            ctx = held.contexts.get(context)
            if ctx is None or not ctx.alive:
                if ctx is None and len(held.contexts) >= MAX_CONTEXTS:
                    raise NoCapacity(f"sandbox {sid} already has {MAX_CONTEXTS} code contexts")
                ctx = await held.sandbox.code_context(language)
                held.contexts[context] = ctx
        if ctx.language != language:
            raise InvalidConfig(f"context {context!r} runs {ctx.language}, not {language}")
        return await ctx.run(code, timeout=timeout)

    async def close_context(self, sid: str, context: str) -> None:
        ctx = self._get(sid).contexts.pop(context, None)
        if ctx is not None:
            await ctx.close()

    async def metrics(self, sid: str) -> Metrics:
        return await self._get(sid).sandbox.metrics()

    async def console_tail(self, sid: str, size: int) -> str:
        return self._get(sid).sandbox.vm.console_tail(min(size, 1 << 20))


FILE_OPS = frozenset({"stat", "list_dir", "exists", "remove", "mkdir", "symlink", "readlink"})


async def _merged_output(process: Process) -> AsyncIterator[tuple[str, bytes]]:
    queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue(maxsize=64)

    async def pump(name: str, chunks: AsyncIterator[bytes]) -> None:
        try:
            async for chunk in chunks:
                await queue.put((name, chunk))
        finally:
            await queue.put(None)

    pumps = [
        asyncio.ensure_future(pump("stdout", process.stdout)),
        asyncio.ensure_future(pump("stderr", process.stderr)),
    ]
    try:
        open_streams = 2
        while open_streams:
            item = await queue.get()
            if item is None:
                open_streams -= 1
            else:
                yield item
    finally:
        for task in pumps:
            task.cancel()
        for task in pumps:
            with contextlib.suppress(BaseException):
                await task


async def _start(recipe: Recipe) -> Sandbox:
    return await ready_or_killed(await recipe.builder().build())


async def _end(held: _Held) -> None:
    for ctx in held.contexts.values():
        with contextlib.suppress(Exception):
            await ctx.close()
    await held.sandbox.kill()


async def _lease_alive(lease: Any) -> bool:
    """False only once Ray says the lease died: unreachable for a while is not dead."""
    try:
        await asyncio.wait_for(lease.ping.remote(), 30)
    except ActorDiedError:
        return False
    except Exception:
        return True
    return True


def _probe_backend() -> tuple[bool, str, str]:
    from capsa.backends.registry import select_backend

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            caps = select_backend().capabilities()
        except CapsaError as e:
            return False, str(e), ""
    return caps.available, "" if caps.available else caps.reason, caps.accelerator


class Lease:
    """The body of an owner's lease actor: alive exactly as long as its owner."""

    def ping(self) -> int:
        return os.getpid()
