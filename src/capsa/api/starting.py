"""What ``build()`` and ``pool()`` return: the start of a VM, sandbox or pool, usable both
ways (as asyncssh's ``connect()`` is):

    sandbox = await capsa.sandbox().build()        # the caller tears it down
    async with capsa.sandbox().build() as sandbox: # torn down when the block ends

It is a coroutine too, so ``asyncio.run()``, ``create_task()`` and ``gather()`` take it.
"""

from __future__ import annotations

from collections.abc import Coroutine, Generator
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Generic, TypeVar

T = TypeVar("T", bound=AbstractAsyncContextManager[Any])


class Starting(Coroutine[Any, Any, T], Generic[T]):
    """A started coroutine that makes a ``T``; awaiting it gives the ``T``, ``async with``
    gives it and closes it at the end of the block."""

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._coro = coro
        self._value: T | None = None

    def __await__(self) -> Generator[Any, None, T]:
        return self._coro.__await__()

    def send(self, value: Any) -> Any:
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        return self._coro.throw(typ, val, tb)

    def close(self) -> None:
        self._coro.close()

    async def __aenter__(self) -> T:
        self._value = await self._coro
        return self._value

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._value is not None:
            await self._value.__aexit__(exc_type, exc, tb)
