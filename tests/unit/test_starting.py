"""``build()``'s result: awaitable, an async context manager, and a coroutine for asyncio."""

from __future__ import annotations

import asyncio
from types import TracebackType

import pytest

from capsa.api.starting import Starting


class Thing:
    def __init__(self) -> None:
        self.closed_with: type[BaseException] | str | None = "open"

    async def __aenter__(self) -> Thing:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.closed_with = exc_type


async def make(thing: Thing) -> Thing:
    await asyncio.sleep(0)
    return thing


async def test_awaiting_gives_the_thing_and_leaves_it_open() -> None:
    thing = Thing()
    assert await Starting(make(thing)) is thing
    assert thing.closed_with == "open"


async def test_async_with_closes_it_also_on_error() -> None:
    thing = Thing()
    async with Starting(make(thing)) as got:
        assert got is thing and thing.closed_with == "open"
    assert thing.closed_with is None
    failing = Thing()
    with pytest.raises(KeyError):
        async with Starting(make(failing)):
            raise KeyError("x")
    assert failing.closed_with is KeyError


def test_asyncio_takes_it_as_a_coroutine() -> None:
    thing = Thing()
    starting = Starting(make(thing))
    assert asyncio.iscoroutine(starting)
    assert asyncio.run(starting) is thing


async def test_tasks_and_gather_take_it() -> None:
    things = [Thing(), Thing()]
    got = await asyncio.gather(*(Starting(make(t)) for t in things))
    assert got == things
    assert await asyncio.create_task(Starting(make(things[0]))) is things[0]
