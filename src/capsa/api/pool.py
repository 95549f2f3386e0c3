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
from types import TracebackType
from typing import Generic, TypeVar

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
    ) -> None:
        if not isinstance(size, int) or size < 1:
            raise InvalidConfig(f"pool size must be at least 1, got {size!r}")
        self.size = size
        self._create = create
        self._destroy = destroy
        self._idle: deque[T] = deque()
        self._waiters: deque[asyncio.Future[T]] = deque()
        self._building: set[asyncio.Task[None]] = set()
        self._reserved: set[int] = set()
        self._members: list[T] = []
        self._closed = False
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

    async def __aenter__(self) -> Pool[T]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def start_pool(
    size: int, create: Callable[[], Awaitable[T]], destroy: Callable[[T], Awaitable[object]]
) -> Pool[T]:
    pool = Pool(size, create, destroy)
    await pool._start()
    return pool
