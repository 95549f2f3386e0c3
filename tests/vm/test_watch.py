"""File events from the guest (inotify) and folders streamed as tar, both ways."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tarfile
from collections.abc import AsyncIterator

import pytest

import capsa

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
async def agent() -> AsyncIterator[capsa.AgentClient]:
    async with await capsa.sandbox().build() as sb:
        yield await sb.agent()


async def _collect(events: capsa.FileWatch, last: str, into: list[capsa.FileEvent]) -> None:
    async for event in events:
        into.append(event)
        if event.kind == "delete" and event.path == last:
            return


async def test_watch_reports_create_modify_move_delete_recursively(
    agent: capsa.AgentClient,
) -> None:
    await agent.exec("mkdir -p /tmp/w/sub", check=True)
    seen: list[capsa.FileEvent] = []
    async with agent.watch("/tmp/w", recursive=True) as events:
        assert events.watches == 2
        collecting = asyncio.ensure_future(_collect(events, "/tmp/w/new/g", seen))
        await agent.exec(
            "echo a > /tmp/w/sub/f && mkdir /tmp/w/new && echo b > /tmp/w/new/g "
            "&& mv /tmp/w/sub/f /tmp/w/moved && rm /tmp/w/new/g",
            check=True,
        )
        await asyncio.wait_for(collecting, 30)
    summary = [(e.kind, e.path, e.dest) for e in seen]
    assert ("create", "/tmp/w/sub/f", None) in summary
    assert ("modify", "/tmp/w/sub/f", None) in summary
    assert ("create", "/tmp/w/new", None) in summary
    assert ("create", "/tmp/w/new/g", None) in summary  # a directory made after the start
    assert ("move", "/tmp/w/sub/f", "/tmp/w/moved") in summary
    assert next(e for e in seen if e.path == "/tmp/w/new").is_dir
    # Once closed, the guest stops watching: later changes go nowhere, the agent is fine.
    await agent.exec("touch /tmp/w/after", check=True)
    assert (await agent.exec("true")).exit_code == 0


async def test_watch_of_a_missing_directory_is_an_error(agent: capsa.AgentClient) -> None:
    with pytest.raises(capsa.AgentError):
        async with agent.watch("/no/such/dir"):
            pass


async def test_folders_stream_as_tar_both_ways(agent: capsa.AgentClient) -> None:
    payload = os.urandom(5 << 20)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in (("a/big.bin", payload), ("a/b/small.txt", b"small\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob = buffer.getvalue()
    chunks = [blob[i : i + 65536] for i in range(0, len(blob), 65536)]
    await agent.write_tar("/tmp/unpacked", chunks)
    r = await agent.exec("sha256sum /tmp/unpacked/a/big.bin && cat /tmp/unpacked/a/b/small.txt")
    assert r.stdout.split()[0].decode() == hashlib.sha256(payload).hexdigest()
    assert r.stdout.endswith(b"small\n")

    received = b"".join([chunk async for chunk in agent.read_tar("/tmp/unpacked")])
    with tarfile.open(fileobj=io.BytesIO(received)) as tar:
        member = tar.extractfile("./a/big.bin")
        assert member is not None and member.read() == payload
    with pytest.raises(capsa.ProcessError, match="tar of /no/such failed"):
        async for _ in agent.read_tar("/no/such"):
            pass
    with pytest.raises(capsa.ProcessError, match="unpacking into /tmp/bad failed"):
        await agent.write_tar("/tmp/bad", [b"this is not a tar stream" * 100])
