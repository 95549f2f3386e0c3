"""Pools of pre-warmed VMs or sandboxes.

A pool keeps ``size`` members booting or idle. ``reserve()`` hands one out; releasing it
destroys it (a used VM is never handed out twice) and a replacement boots in the
background. Replacement failures are logged, kept in ``failures`` and retried with
back-off: the pool does not shrink silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Generic, TypeVar

from capsa.api.snapshot import snapshot_scratch
from capsa.backends.base import BackendVm
from capsa.errors import InvalidConfig, PoolEmpty, PoolShutdown

log = logging.getLogger("capsa.pool")
T = TypeVar("T")
MAX_BACKOFF = 30.0


class Pooled(Generic[T]):
    """A reserved member: use ``.member``; leaving the context (or ``release()``) destroys it."""

    def __init__(self, pool: Pool[T], member: T) -> None:
        self._pool = pool
        self.member = member
        self._released = False

    def __getattr__(self, name: str) -> object:
        # A reserved member behaves like the VM or sandbox it wraps (console(), agent()...).
        if name in ("member", "_pool", "_released"):
            raise AttributeError(name)
        return getattr(self.member, name)

    async def release(self) -> None:
        if not self._released:
            self._released = True
            await self._pool._destroy_and_refill(self.member)

    async def __aenter__(self) -> T:
        return self.member

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.release()


class Pool(Generic[T]):
    def __init__(
        self,
        size: int,
        create: Callable[[], Awaitable[T]],
        destroy: Callable[[T], Awaitable[object]],
        on_close: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        if not isinstance(size, int) or size < 1:
            raise InvalidConfig(f"pool size must be at least 1, got {size!r}")
        self.size = size
        self._create = create
        self._destroy = destroy
        self._on_close = on_close
        self._idle: deque[T] = deque()
        self._waiters: deque[asyncio.Future[T]] = deque()
        self._building: set[asyncio.Task[None]] = set()
        self._reserved: set[int] = set()
        self._members: list[T] = []
        self._closed = False
        self._changed = asyncio.Event()
        self.failures: list[BaseException] = []

    async def _start(self) -> None:
        for _ in range(self.size):
            self._spawn_builder()

    def _spawn_builder(self, delay: float = 0.0) -> None:
        task = asyncio.ensure_future(self._build_one(delay))
        self._building.add(task)
        task.add_done_callback(self._building.discard)

    async def _build_one(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._closed:
            return
        try:
            member = await self._create()
        except Exception as e:
            self.failures.append(e)
            self._changed.set()
            backoff = min(MAX_BACKOFF, max(1.0, delay * 2))
            log.warning("pool member failed to start (retrying in %.0fs): %s", backoff, e)
            if not self._closed:
                self._spawn_builder(backoff)
            return
        if self._closed:
            await self._destroy(member)
            return
        self._members.append(member)
        self._hand_out_or_keep(member)

    def _hand_out_or_keep(self, member: T) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._reserved.add(id(member))
                waiter.set_result(member)
                return
        self._idle.append(member)
        self._changed.set()

    async def _fill(self) -> None:
        """Wait until all ``size`` members are idle. A member that fails to start closes
        the pool and its error is raised: ``build`` fails loudly, not half-full."""
        while len(self._idle) < self.size:
            if self.failures:
                await self.close()
                raise self.failures[0]
            self._changed.clear()
            await self._changed.wait()

    async def available_count(self) -> int:
        return len(self._idle)

    def try_reserve(self) -> Pooled[T]:
        """An idle member now, or ``PoolEmpty``."""
        if self._closed:
            raise PoolShutdown("pool is shutting down")
        if not self._idle:
            raise PoolEmpty("no idle member in the pool")
        member = self._idle.popleft()
        self._reserved.add(id(member))
        return Pooled(self, member)

    async def reserve(self, timeout: float | None = None) -> Pooled[T]:
        """Wait for a member (booting ones included)."""
        with contextlib.suppress(PoolEmpty):
            return self.try_reserve()
        waiter: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            member = await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise PoolEmpty(f"no pool member became available within {timeout}s") from None
        return Pooled(self, member)

    def idle_members(self) -> list[T]:
        return list(self._idle)

    def hand_over(self, member: T) -> None:
        """A reserved member leaves the pool for good (its caller ends it): a replacement
        starts."""
        if id(member) in self._reserved:
            self._forget(member)

    def discard(self, member: T) -> None:
        """An idle member that ended by itself (its host went away) is dropped, not handed
        out, and a replacement starts."""
        if member in self._idle:
            self._idle.remove(member)
            self._forget(member)
            self._changed.set()

    def _forget(self, member: T) -> None:
        self._reserved.discard(id(member))
        with contextlib.suppress(ValueError):
            self._members.remove(member)
        if not self._closed:
            self._spawn_builder()

    async def _destroy_and_refill(self, member: T) -> None:
        self._reserved.discard(id(member))
        with contextlib.suppress(ValueError):
            self._members.remove(member)
        if not self._closed:
            self._spawn_builder()
        await self._destroy(member)

    async def close(self) -> None:
        """Stop refilling, fail waiters with PoolShutdown, destroy every member."""
        if self._closed:
            return
        self._closed = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(PoolShutdown("pool is shutting down"))
        self._waiters.clear()
        for task in list(self._building):
            task.cancel()
        for task in list(self._building):
            with contextlib.suppress(BaseException):
                await task
        members, self._members = self._members, []
        self._idle.clear()
        await asyncio.gather(*(self._destroy(m) for m in members), return_exceptions=True)
        if self._on_close is not None:
            await self._on_close()

    async def __aenter__(self) -> Pool[T]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


VmPool = Pool  # the seeds' name for a pool of plain VMs


async def start_pool(
    size: int,
    create: Callable[[], Awaitable[T]],
    destroy: Callable[[T], Awaitable[object]],
    on_close: Callable[[], Awaitable[object]] | None = None,
    *,
    wait: bool = True,
) -> Pool[T]:
    """A pool of ``size`` members; ``wait``: return once all are idle (else at once)."""
    pool = Pool(size, create, destroy, on_close)
    await pool._start()
    if wait:
        try:
            await pool._fill()
        except BaseException:
            await pool.close()
            raise
    return pool


class SnapshotTemplate(Generic[T]):
    """Where a pool's members come from: the first boots cold and is snapshotted once it is
    ready; every later one is restored from that snapshot. Members boot cold again only
    when the VM cannot be snapshotted (vsock ports, shares, no room for its RAM file)."""

    def __init__(
        self,
        cold: Callable[[], Awaitable[T]],
        snapshot: Callable[[T, Path], Awaitable[Path]],
        restore: Callable[[Path], Awaitable[T]],
        backend_vm: Callable[[T], BackendVm],
        memory_mb: int,
    ) -> None:
        self._cold, self._snapshot, self._restore = cold, snapshot, restore
        self._backend_vm = backend_vm
        self._memory_mb = memory_mb
        self.snapshot: Path | None = None
        self.cold_only: str | None = None  # why members boot cold
        self._lock = asyncio.Lock()
        self._scratch = contextlib.ExitStack()

    async def new_member(self) -> T:
        async with self._lock:
            if self.snapshot is None and self.cold_only is None:
                return await self._first_member()
        if self.snapshot is None:
            return await self._cold()
        return await self._restore(self.snapshot)

    async def _first_member(self) -> T:
        member = await self._cold()
        reason = self._backend_vm(member).snapshot_blocker()
        if reason is not None:
            self.cold_only = reason
            return member
        try:
            directory = self._scratch.enter_context(snapshot_scratch(self._memory_mb))
            self.snapshot = await self._snapshot(member, directory / "snap")
        except Exception as e:
            self._scratch.close()
            self.cold_only = f"the snapshot failed: {e}"
            log.warning("pool falls back to cold boots: %s", e)
        return member

    async def close(self) -> None:
        self._scratch.close()
