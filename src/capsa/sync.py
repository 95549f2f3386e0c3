"""The synchronous face of capsa: the same API name for name, without ``await``.

    import capsa.sync as capsa

    with capsa.sandbox().build() as sb:
        result = sb.agent().exec("ls").arg("-la").run()
        for chunk in sb.agent().start("yes | head -3").stdout:
            ...

Nothing here re-implements capsa: every call is forwarded to the async API, which runs on
one event loop in a private daemon thread (it must keep running between calls: agent,
console and network readers live there). Results come back as they are (dataclasses,
bytes, exceptions); capsa objects come back wrapped, so their coroutine methods become
blocking calls, async iterators plain iterators and async context managers plain ones.
Any number of threads may call in at once. What is not closed dies with the process, as
every VM does with its owner.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import enum
import functools
import inspect
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from types import TracebackType
from typing import Any

import capsa as _capsa
from capsa.api.starting import Starting

_PLAIN = (str, bytes, bytearray, int, float, bool, type(None), enum.Enum, BaseException)


class _Portal:
    """The event loop thread every sync call runs on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                ready = threading.Event()
                loop = asyncio.new_event_loop()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    ready.set()
                    loop.run_forever()

                threading.Thread(target=run, name="capsa-sync", daemon=True).start()
                ready.wait()
                self._loop = loop
            return self._loop

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on the loop thread, awaited if it gives an awaitable."""
        loop = self.loop
        if _on_loop_thread(loop):
            raise RuntimeError("capsa.sync cannot be called from capsa's own event loop")

        async def run() -> Any:
            result = fn(*args, **kwargs)
            # Coroutines run to their result, and so does build() (a Starting, which sync
            # code enters with the Sandbox's own context manager). Other awaitables are
            # builders (ExecCommand): they stay objects until their run().
            if inspect.iscoroutine(result) or isinstance(result, Starting):
                result = await result
            return result

        future: Future[Any] = asyncio.run_coroutine_threadsafe(run(), loop)
        return future.result()

    def close(self) -> None:
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


PORTAL = _Portal()
atexit.register(PORTAL.close)


def _wrap(value: Any) -> Any:
    """A result as the sync caller sees it."""
    if isinstance(value, _PLAIN) or dataclasses.is_dataclass(value) or isinstance(value, type):
        return value
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    if isinstance(value, dict):
        return {k: _wrap(v) for k, v in value.items()}
    if type(value).__module__.startswith("capsa.") or hasattr(value, "__aiter__"):
        return Sync(value)
    return value


def _unwrap(value: Any) -> Any:
    """An argument as the async API expects it (sync wrappers give back what they hold)."""
    if isinstance(value, Sync):
        return value._target
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_unwrap(v) for v in value)
    return value


class Sync:
    """A capsa object behind the sync API: each method call runs on the loop thread."""

    __slots__ = ("_target",)

    def __init__(self, target: Any) -> None:
        object.__setattr__(self, "_target", target)

    def __getattr__(self, name: str) -> Any:
        attribute = PORTAL.call(getattr, self._target, name)
        if callable(attribute) and not isinstance(attribute, type):
            return functools.partial(_call, attribute)
        return _wrap(attribute)

    def __setattr__(self, name: str, value: Any) -> None:
        PORTAL.call(setattr, self._target, name, _unwrap(value))

    def __repr__(self) -> str:
        return f"<sync {self._target!r}>"

    def __enter__(self) -> Any:
        entered = PORTAL.call(_awaited, self._target.__aenter__)
        return _wrap(entered)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        PORTAL.call(_awaited, lambda: self._target.__aexit__(exc_type, exc, tb))

    def __iter__(self) -> Iterator[Any]:
        iterator = PORTAL.call(self._target.__aiter__)
        return _iterate(iterator)


def _call(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    args = tuple(_unwrap(a) for a in args)
    kwargs = {k: _unwrap(v) for k, v in kwargs.items()}
    return _wrap(PORTAL.call(method, *args, **kwargs))


async def _awaited(make: Callable[[], Any]) -> Any:
    return await make()


def _iterate(iterator: AsyncIterator[Any]) -> Iterator[Any]:
    try:
        while True:
            try:
                item = PORTAL.call(_awaited, iterator.__anext__)
            except StopAsyncIteration:
                return
            yield _wrap(item)
    finally:
        close = getattr(iterator, "aclose", None)
        if close is not None:
            PORTAL.call(_awaited, close)


def _forward(name: str) -> Callable[..., Any]:
    target = getattr(_capsa, name)

    @functools.wraps(target)
    def call(*args: Any, **kwargs: Any) -> Any:
        return _call(target, *args, **kwargs)

    return call


# The entry points, forwarded; every other public name (types, errors, enums) is capsa's own.
sandbox = _forward("sandbox")
vm = _forward("vm")
pool = _forward("pool")
restore = _forward("restore")
resume = _forward("resume")


def remote_connect(*args: Any, **kwargs: Any) -> Any:
    """:func:`capsa.remote.connect`, without ``await``."""
    from capsa.remote import connect

    return _call(connect, *args, **kwargs)


def ray_connect(*args: Any, **kwargs: Any) -> Any:
    """:func:`capsa.ray.connect`, without ``await``."""
    from capsa.ray import connect

    return _call(connect, *args, **kwargs)


def wrap(value: Any) -> Any:
    """A capsa object made elsewhere behind this API, e.g. a cluster sandbox handle a Ray
    task received: ``sb = capsa.sync.wrap(sb); sb.agent().exec("ls").run()``."""
    return _wrap(_unwrap(value))


def __getattr__(name: str) -> Any:
    return getattr(_capsa, name)
