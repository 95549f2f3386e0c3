"""The host's agent client against a hostile guest: code in a sandbox runs as root and can
replace the agent with its own program, so every answer is untrusted input handled in the
user's process.

Component tests: ``AgentClient.connect_socket()`` on one end of a socketpair and, on the
other, a fake agent that answers requests with frames the test crafts (or the real agent run
locally, as in tests/unit/test_agent_local.py). Black-box tests: the real agent in a real
sandbox, where the guest acts through commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import struct
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import capsa
from capsa.api.agent import (
    DEFAULT_COPY_MAX_DEPTH,
    DEFAULT_COPY_MAX_ENTRIES,
    DEFAULT_MAX_READ,
    AgentClient,
)
from capsa.api.agent_channel import CLOSE_TIMEOUT, MAX_BACKLOG, READ_WINDOW
from capsa.api.process import DEFAULT_MAX_OUTPUT, DEFAULT_MAX_UNREAD_OUTPUT
from capsa.guest.protocol import CHUNK, MAX_FRAME, VERSION, Decoder, encode
from tests.framework.factory import VmFactory

Header = dict[str, Any]
Handler = Callable[["FakeAgent", Header], Awaitable[None]]
MiB = 1024 * 1024
# The most body one frame can carry with a small header.
BIG_BODY = MAX_FRAME - 1024


class FakeAgent:
    """The guest's end of the channel, played by a program that replaced the agent: it says
    hello, records every frame the host sends, and answers each request with the test's
    handler for its ``op`` (requests without one are left unanswered)."""

    def __init__(self, sock: socket.socket, handlers: dict[str, Handler]) -> None:
        self._sock = sock
        self._handlers = handlers
        self._tasks: set[asyncio.Future[None]] = set()
        self.received: list[Header] = []
        self._writer: asyncio.StreamWriter | None = None

    async def serve(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(sock=self._sock)
        self.send({"t": "hello", "id": 0, "v": VERSION, "pid": 1})
        decoder = Decoder()
        while data := await reader.read(1 << 16):
            for header, _ in decoder.feed(data):
                self.received.append(header)
                handler = self._handlers.get(str(header.get("op")))
                if header["t"] == "req" and handler is not None:
                    self._tasks.add(asyncio.ensure_future(handler(self, header)))

    def send(self, header: Header, body: bytes = b"") -> None:
        self.send_raw(encode(header, body))

    def send_raw(self, frame: bytes) -> None:
        assert self._writer is not None
        self._writer.write(frame)

    async def drain(self) -> None:
        assert self._writer is not None
        await self._writer.drain()

    async def flood(self, header: Header, total: int, body_size: int = CHUNK) -> None:
        """``total`` bytes of zeros as frames like ``header``."""
        body = bytes(body_size)
        for _ in range(0, total, body_size):
            self.send(header, body)
            await self.drain()

    def saw(self, kind: str, rid: int) -> bool:
        return any(h["t"] == kind and h.get("id") == rid for h in self.received)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._writer is not None:
            self._writer.close()


@contextlib.asynccontextmanager
async def hostile(handlers: dict[str, Handler]) -> AsyncIterator[tuple[AgentClient, FakeAgent]]:
    host, guest = socket.socketpair()
    fake = FakeAgent(guest, {"ping": answer(), **handlers})
    serving = asyncio.ensure_future(fake.serve())
    client = await AgentClient.connect_socket(host)
    try:
        await client.wait_ready(5)
        yield client, fake
    finally:
        await fake.close()
        await client.close()
        serving.cancel()
        with contextlib.suppress(BaseException):
            await serving


def answer(**fields: Any) -> Handler:
    async def reply(fake: FakeAgent, request: Header) -> None:
        fake.send({"t": "res", "id": request["id"], **fields})

    return reply


async def never_answer(fake: FakeAgent, request: Header) -> None:
    return None


@pytest.fixture
async def agent() -> AsyncIterator[AgentClient]:
    """The real agent, run on this machine as a subprocess."""
    host, guest = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-m", "capsa.guest.agent", "--fd", str(guest.fileno())],
        pass_fds=[guest.fileno()],
    )
    guest.close()
    client = await AgentClient.connect_socket(host)
    await client.wait_ready(10)
    yield client
    await client.close()
    proc.kill()
    proc.wait()


async def within(seconds: float, awaitable: Awaitable[Any]) -> Any:
    """``awaitable``'s result; a hang fails the test instead of stalling it."""
    return await asyncio.wait_for(awaitable, seconds)


async def drain(stream: AsyncIterator[bytes]) -> int:
    """Read ``stream`` to its end: how many chunks it gave."""
    count = 0
    async for _ in stream:
        count += 1
    return count


# -- a guest tree, as a hostile agent describes it ---------------------------------------------


@dataclass
class Node:
    mode: int
    data: bytes = b""
    target: str = ""
    children: list[tuple[str, Node]] = field(default_factory=list)


def directory(*children: tuple[str, Node], mode: int = 0o755) -> Node:
    return Node(stat.S_IFDIR | mode, children=list(children))


def file(data: bytes = b"guest data", mode: int = 0o644) -> Node:
    return Node(stat.S_IFREG | mode, data=data)


def link(target: str) -> Node:
    return Node(stat.S_IFLNK | 0o777, target=target)


def stat_fields(node: Node) -> Header:
    return {
        "size": len(node.data),
        "mode": node.mode,
        "mtime": 0.0,
        "uid": 0,
        "gid": 0,
        "is_dir": stat.S_ISDIR(node.mode),
        "is_symlink": stat.S_ISLNK(node.mode),
    }


class FakeTree:
    """Answers stat, list_dir, read_file and readlink from nodes; a listed child is found
    again at the path the client makes of its name, whatever that name is."""

    def __init__(self, root: Node, path: str = "/t") -> None:
        self.nodes = {path: root}

    def handlers(self) -> dict[str, Handler]:
        return {
            "stat": self._stat,
            "list_dir": self._list_dir,
            "read_file": self._read_file,
            "readlink": self._readlink,
        }

    async def _stat(self, fake: FakeAgent, request: Header) -> None:
        fake.send({"t": "res", "id": request["id"], **stat_fields(self.nodes[request["path"]])})

    async def _list_dir(self, fake: FakeAgent, request: Header) -> None:
        path = request["path"]
        entries = []
        for name, child in self.nodes[path].children:
            self.nodes[f"{path.rstrip('/')}/{name}"] = child
            entries.append({"name": name, **stat_fields(child)})
        fake.send({"t": "res", "id": request["id"], "entries": entries})

    async def _read_file(self, fake: FakeAgent, request: Header) -> None:
        data = self.nodes[request["path"]].data
        fake.send({"t": "data", "id": request["id"]}, data)
        fake.send({"t": "res", "id": request["id"], "size": len(data)})

    async def _readlink(self, fake: FakeAgent, request: Header) -> None:
        target = self.nodes[request["path"]].target
        fake.send({"t": "res", "id": request["id"], "target": target})


def outside(root: Path, dest: Path) -> dict[str, tuple[int, bytes]]:
    """Everything under ``root`` but ``dest``: each path's mode and content (or target)."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            if path == dest or dest in path.parents:
                continue
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                content = os.readlink(path).encode()
            elif stat.S_ISREG(st.st_mode):
                content = path.read_bytes()
            else:
                content = b""
            seen[str(path.relative_to(root))] = (st.st_mode, content)
    return seen


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    """A directory next to the destination, with a file in it: copies must not touch it."""
    folder = tmp_path / "sentinel"
    folder.mkdir()
    (folder / "keep").write_bytes(b"original")
    return folder


# -- row 1: copy_from writes only below its destination ----------------------------------------


ESCAPES: dict[str, Callable[[Path], Node]] = {
    "dotdot-file": lambda s: directory(("../escape", file())),
    "absolute": lambda s: directory((str(s / "abs"), file())),
    "below-own-symlink": lambda s: directory(("a", link(str(s))), ("a/b", file())),
    "symlink-then-dir": lambda s: directory(("a", link(str(s))), ("a", directory(("b", file())))),
    "symlink-then-file": lambda s: directory(("keep", link(str(s / "keep"))), ("keep", file())),
    "dotdot-dir": lambda s: directory(("..", directory(("escape", file())))),
    "dot-dir": lambda s: directory((".", directory(("x", file())))),
    "empty": lambda s: directory(("", file())),
    "nul": lambda s: directory(("x\0y", file())),
}


@pytest.mark.parametrize("scenario", ESCAPES)
async def test_copy_from_refuses_names_that_leave_the_destination(
    tmp_path: Path, sentinel: Path, scenario: str
) -> None:
    dest = tmp_path / "back"
    before = outside(tmp_path, dest)
    async with hostile(FakeTree(ESCAPES[scenario](sentinel)).handlers()) as (client, _):
        with pytest.raises(capsa.AgentProtocolError):
            await within(10, client.copy_from("/t", dest))
    assert outside(tmp_path, dest) == before


async def test_copy_from_never_writes_through_a_symlink_it_created(
    tmp_path: Path, sentinel: Path
) -> None:
    # The old copy wrote each file to ".<name>.capsa-part" first: a guest symlink of that
    # name, listed before the file, sent the write and the chmod to the link's target.
    target = str(sentinel / "keep")
    tree = directory((".f.capsa-part", link(target)), ("f", file(b"pwned", 0o6755)))
    dest = tmp_path / "back"
    before = outside(tmp_path, dest)
    async with hostile(FakeTree(tree).handlers()) as (client, _):
        await within(10, client.copy_from("/t", dest))
    assert outside(tmp_path, dest) == before
    assert os.readlink(dest / ".f.capsa-part") == target
    assert (dest / "f").read_bytes() == b"pwned"
    assert stat.S_ISREG((dest / "f").lstat().st_mode)


async def test_copy_from_drops_set_id_and_sticky_bits(tmp_path: Path) -> None:
    tree = directory(
        ("setuid", file(mode=0o6755)),
        ("all", file(mode=0o7777)),
        ("shared", directory(("inner", file(mode=0o4700)), mode=0o3777)),
        mode=0o1777,
    )
    dest = tmp_path / "back"
    async with hostile(FakeTree(tree).handlers()) as (client, _):
        await within(10, client.copy_from("/t", dest))
    modes = {
        path: stat.S_IMODE((dest / path).stat().st_mode)
        for path in ("", "setuid", "all", "shared", "shared/inner")
    }
    assert all(mode & 0o7000 == 0 for mode in modes.values()), modes
    assert (modes["setuid"], modes["all"], modes["shared/inner"]) == (0o755, 0o777, 0o700)


EXISTING: dict[str, Callable[[Path, Path], object]] = {
    "symlink-to-dir": lambda dest, s: dest.symlink_to(s),
    "empty-dir": lambda dest, s: dest.mkdir(),
    "file": lambda dest, s: dest.write_bytes(b"mine"),
}


EXISTING_CASES = [
    ("dir", "symlink-to-dir"),
    ("dir", "empty-dir"),
    ("file", "symlink-to-dir"),
    ("file", "empty-dir"),
    ("file", "file"),
]


@pytest.mark.parametrize(("root", "existing"), EXISTING_CASES)
async def test_copy_from_refuses_an_existing_destination(
    tmp_path: Path, sentinel: Path, existing: str, root: str
) -> None:
    tree = directory(("keep", file(b"pwned"))) if root == "dir" else file(b"pwned")
    dest = tmp_path / "back"
    EXISTING[existing](dest, sentinel)
    before = outside(tmp_path, tmp_path / "nothing")
    async with hostile(FakeTree(tree).handlers()) as (client, _):
        with pytest.raises(FileExistsError):
            await within(10, client.copy_from("/t", dest))
    assert outside(tmp_path, tmp_path / "nothing") == before


def endless_tree(width: int) -> dict[str, Handler]:
    """A guest where every path is a directory of ``width`` directories."""
    fields = stat_fields(directory())
    entries = [{"name": f"d{i:04}", **fields} for i in range(width)]

    async def list_dir(fake: FakeAgent, request: Header) -> None:
        fake.send({"t": "res", "id": request["id"], "entries": entries})

    return {"stat": answer(**fields), "list_dir": list_dir}


def depth_below(path: Path) -> int:
    depth = 0
    while children := sorted(path.iterdir()):
        path, depth = children[0], depth + 1
    return depth


async def test_copy_from_bounds_the_depth(tmp_path: Path) -> None:
    dest = tmp_path / "back"
    async with hostile(endless_tree(1)) as (client, _):
        with pytest.raises(capsa.AgentLimitExceeded):
            await within(60, client.copy_from("/t", dest))
    assert depth_below(dest) == DEFAULT_COPY_MAX_DEPTH


async def test_copy_from_bounds_the_entries(tmp_path: Path) -> None:
    dest = tmp_path / "back"
    async with hostile(endless_tree(5000)) as (client, _):
        with pytest.raises(capsa.AgentLimitExceeded):
            await within(60, client.copy_from("/t", dest))
    # Each level lists 5000: the listing at depth 19 goes past the bound (1 + 20 * 5000
    # entries) and is refused before its directory is made.
    assert depth_below(dest) == DEFAULT_COPY_MAX_ENTRIES // 5000 - 2


async def test_copy_from_bounds_the_bytes(tmp_path: Path) -> None:
    tree = FakeTree(directory(("small", file(b"x" * 1000)), ("big", file())))
    handlers = tree.handlers()

    async def big_is_endless(fake: FakeAgent, request: Header) -> None:
        if request["path"] != "/t/big":
            return await handlers["read_file"](fake, request)
        await fake.flood({"t": "data", "id": request["id"]}, 1 << 40)

    dest = tmp_path / "back"
    async with hostile({**handlers, "read_file": big_is_endless}) as (client, _):
        with pytest.raises(capsa.AgentLimitExceeded):
            await within(30, client.copy_from("/t", dest, max_bytes=8 * MiB))
        await within(10, client.ping())
    # What was copied stays; half a file does not.
    assert [p.name for p in dest.iterdir()] == ["small"]
    assert (dest / "small").read_bytes() == b"x" * 1000


BAD_ANSWERS: list[tuple[str, Header]] = [
    ("stat", {**stat_fields(file()), "size": "big"}),
    ("stat", {**stat_fields(file()), "size": -1}),
    ("stat", {**stat_fields(file()), "mode": 1 << 40}),
    ("stat", {**stat_fields(file()), "mtime": float("nan")}),
    ("stat", {**stat_fields(file()), "uid": None}),
    ("stat", {**stat_fields(file()), "is_dir": "yes"}),
    ("stat", {**stat_fields(file()), "is_dir": True}),
    ("stat", {k: v for k, v in stat_fields(file()).items() if k != "gid"}),
    ("list_dir", {"entries": "a b"}),
    ("list_dir", {"entries": [5]}),
    ("list_dir", {"entries": [{**stat_fields(file()), "name": 5}]}),
    ("list_dir", {"entries": [{**stat_fields(file()), "name": "a", "mode": "x"}]}),
    ("list_dir", {"entries": [{**stat_fields(file()), "name": "a"}] * 2}),
    ("readlink", {"target": 5}),
    ("readlink", {"target": ""}),
    ("exists", {"exists": "yes"}),
]


@pytest.mark.parametrize(("op", "fields"), BAD_ANSWERS)
async def test_malformed_file_answers_are_protocol_errors(op: str, fields: Header) -> None:
    async with hostile({op: answer(**fields)}) as (client, _):
        with pytest.raises(capsa.AgentProtocolError):
            await within(5, getattr(client, op)("/t"))


async def test_read_file_refuses_a_file_past_max_size() -> None:
    total = DEFAULT_MAX_READ + 16 * MiB

    async def long_file(fake: FakeAgent, request: Header) -> None:
        await fake.flood({"t": "data", "id": request["id"]}, total, BIG_BODY)
        fake.send({"t": "res", "id": request["id"], "size": total})

    async with hostile({"read_file": long_file}) as (client, _):
        with pytest.raises(capsa.AgentLimitExceeded):
            await within(60, client.read_file("/t"))
        await within(30, client.ping())


async def test_copy_to_skips_a_fifo_instead_of_reading_it(
    agent: AgentClient, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"alpha")
    os.mkfifo(src / "fifo")
    stop = threading.Event()

    def feed_any_reader() -> None:
        # Whoever opens the FIFO to read gets this (the old copy_to did, and copied it).
        while not stop.wait(0.02):
            try:
                fd = os.open(src / "fifo", os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                continue
            os.write(fd, b"read from a fifo")
            os.close(fd)

    feeder = threading.Thread(target=feed_any_reader, daemon=True)
    feeder.start()
    try:
        await within(30, agent.copy_to(src, str(tmp_path / "guest")))
    finally:
        stop.set()
        feeder.join()
    assert sorted(os.listdir(tmp_path / "guest")) == ["a.txt"]


# -- row 11: what a command writes is bounded in the user's process ----------------------------


def flooding_command(total: int, stream: int = 1) -> dict[str, Handler]:
    """A guest whose commands write ``total`` bytes, whether run by ``exec`` or ``start``."""

    async def run_exec(fake: FakeAgent, request: Header) -> None:
        await fake.flood({"t": "out", "id": request["id"], "fd": stream}, total)
        fake.send({"t": "res", "id": request["id"], "code": 0, "timed_out": False})

    async def start(fake: FakeAgent, request: Header) -> None:
        fake.send({"t": "res", "id": request["id"], "pid": 4242})
        await fake.flood({"t": "out", "id": request["id"], "fd": stream}, total)
        fake.send({"t": "exit", "id": request["id"], "code": 0, "timed_out": False})

    return {"exec": run_exec, "start": start}


async def wait_until(condition: Callable[[], bool], seconds: float) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.05)

    await within(seconds, poll())


@contextlib.contextmanager
def traced_peak() -> Iterator[list[int]]:
    """The peak of Python allocations while the block runs, in bytes (set on exit)."""
    peak: list[int] = []
    tracemalloc.start()
    try:
        yield peak
    finally:
        peak.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


@pytest.mark.parametrize("stream", [1, 2])
async def test_exec_output_flood_from_a_hostile_agent_is_refused_at_the_cap(stream: int) -> None:
    async with hostile(flooding_command(600 * MiB, stream)) as (client, fake):
        with traced_peak() as peak, pytest.raises(capsa.OutputLimitExceeded) as refused:
            await within(120, client.exec("yes"))
        kept = (refused.value.stdout, refused.value.stderr)[stream - 1]
        assert kept == bytes(DEFAULT_MAX_OUTPUT) and refused.value.stream == stream
        assert peak[0] < 3 * DEFAULT_MAX_OUTPUT, f"{peak[0] / MiB:.0f} MiB held"
        rid = max(h["id"] for h in fake.received if h["t"] == "req")
        await wait_until(lambda: fake.saw("kill", rid), 10)
        await within(60, client.ping())  # the rest of the flood is dropped


async def test_exec_output_flood_from_the_real_agent_kills_the_command(
    agent: AgentClient, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    command = f"echo $$ > {pid_file}; exec head -c $((600 << 20)) /dev/zero"
    with traced_peak() as peak, pytest.raises(capsa.OutputLimitExceeded) as refused:
        await within(120, agent.exec(command))
    assert refused.value.stdout == bytes(DEFAULT_MAX_OUTPUT) and refused.value.stderr == b""
    assert peak[0] < 3 * DEFAULT_MAX_OUTPUT, f"{peak[0] / MiB:.0f} MiB held"
    pid = int(pid_file.read_text())
    await wait_until(lambda: not Path(f"/proc/{pid}").exists(), 20)
    assert (await within(30, agent.exec("printf ok"))).stdout == b"ok"


async def test_started_process_unread_output_is_bounded(agent: AgentClient) -> None:
    proc = await agent.start("head -c $((100 << 20)) /dev/zero")
    await within(10, agent.ping())  # the unread stream does not stall the channel
    with pytest.raises(capsa.OutputLimitExceeded) as killed:
        await within(60, proc.wait())
    assert killed.value.stream == 1 and killed.value.limit == DEFAULT_MAX_UNREAD_OUTPUT
    buffered = 0
    with pytest.raises(capsa.OutputLimitExceeded):
        async for chunk in proc.stdout:
            buffered += len(chunk)
    assert 0 < buffered <= DEFAULT_MAX_UNREAD_OUTPUT
    with pytest.raises(capsa.OutputLimitExceeded):
        await within(5, drain(proc.stderr))  # cut short too: the process was killed


# -- row 12: whatever the agent sends, no call is left hanging ---------------------------------


def raw_frame(header: bytes, body: bytes = b"") -> bytes:
    return struct.pack(">II", 4 + len(header) + len(body), len(header)) + header + body


async def assert_channel_failed(client: AgentClient, pending: asyncio.Future[Any]) -> None:
    with pytest.raises(capsa.AgentProtocolError):
        await within(5, pending)
    with pytest.raises(capsa.AgentProtocolError):
        await within(5, client.ping())


async def fail_pending_calls_with(frame: bytes) -> None:
    async with hostile({"wait": never_answer}) as (client, fake):
        pending = asyncio.ensure_future(client.channel.request("wait"))
        await wait_until(lambda: any(h.get("op") == "wait" for h in fake.received), 5)
        fake.send_raw(frame)
        await assert_channel_failed(client, pending)


async def test_deeply_nested_header_fails_pending_calls() -> None:
    await fail_pending_calls_with(raw_frame(b'{"t":"res","id":1,"x":' + b"[" * 200_000))


BAD_EVENTS: list[Header] = [
    {"t": "event", "id": 9, "event": "exit", "code": "x"},
    {"t": "event", "id": 9, "event": "exit", "code": True},
    {"t": "event", "id": 9, "event": "exit", "code": 1 << 40},
    {"t": "event", "id": 9, "event": "exit"},
    {"t": "event", "id": 9, "event": 5},
]


@pytest.mark.parametrize("event", BAD_EVENTS)
async def test_bad_event_fails_pending_calls(event: Header) -> None:
    await fail_pending_calls_with(encode(event))


async def test_frame_without_id_fails_every_call_even_one_with_a_full_window() -> None:
    async def fill_the_window(fake: FakeAgent, request: Header) -> None:
        for _ in range(READ_WINDOW + 1):
            fake.send({"t": "data", "id": request["id"]}, b"chunk")
        fake.send({"t": "res"})

    async with hostile({"read_file": fill_the_window, "wait": never_answer}) as (client, _):
        pending = asyncio.ensure_future(client.channel.request("wait"))
        stream = client.iter_file("/t")
        assert await within(5, stream.__anext__()) == b"chunk"
        await assert_channel_failed(client, pending)
        with pytest.raises(capsa.AgentProtocolError):
            await within(5, drain(stream))


async def stream_forever(fake: FakeAgent, request: Header) -> None:
    await fake.flood({"t": "data", "id": request["id"]}, 1 << 40, 4096)


async def test_closing_a_stalled_stream_frees_the_channel() -> None:
    async with hostile({"read_file": stream_forever}) as (client, _):
        stream = client.iter_file("/t")
        await within(5, stream.__anext__())
        await asyncio.sleep(0.2)  # the window fills and the channel pauses
        await within(5, stream.aclose())
        await within(5, client.ping())


async def test_an_abandoned_stream_is_dropped_after_the_stall_timeout() -> None:
    async with hostile({"read_file": stream_forever}) as (client, _):
        client.channel.stall_timeout = 0.5
        stream = client.iter_file("/t")
        await within(5, stream.__anext__())
        await within(5, client.ping())  # paused only until the stall timeout
        chunks: list[bytes] = []

        async def read_what_is_left() -> None:
            async for chunk in stream:
                chunks.append(chunk)

        with pytest.raises(capsa.CapsaTimeout):
            await within(5, read_what_is_left())
        assert len(chunks) <= READ_WINDOW


async def test_a_call_left_unread_cannot_hold_unbounded_answers() -> None:
    sent = asyncio.Event()

    async def flood(fake: FakeAgent, request: Header) -> None:
        await fake.flood({"t": "data", "id": request["id"]}, 2 * MAX_BACKLOG, BIG_BODY)
        sent.set()

    async with hostile({"flood": flood}) as (client, _):
        call = client.channel.open("flood")
        await within(60, sent.wait())
        await within(10, client.ping())  # everything sent has been routed by now
        held = 0
        with pytest.raises(capsa.AgentLimitExceeded):
            while True:
                held += len((await within(5, call.next()))[1])
        assert held <= MAX_BACKLOG


# -- black box: the real agent in a real sandbox -----------------------------------------------


@pytest.mark.vm
async def test_sandbox_exec_output_past_the_cap_kills_the_command(vm_factory: VmFactory) -> None:
    sandbox = await vm_factory.sandbox()
    agent = await sandbox.agent()
    command = "echo $$ > /tmp/flood.pid; exec head -c $((200 << 20)) /dev/zero"
    with pytest.raises(capsa.OutputLimitExceeded) as refused:
        await within(240, agent.exec(command, max_output=16 * MiB))
    assert refused.value.stdout == bytes(16 * MiB) and refused.value.stream == 1
    pid = int(await agent.read_file("/tmp/flood.pid"))

    async def gone() -> None:
        while await agent.exists(f"/proc/{pid}"):
            await asyncio.sleep(0.2)

    await within(60, gone())
    result = await within(120, agent.exec("printf ok; exit 3"))
    assert (result.stdout, result.exit_code) == (b"ok", 3)


@pytest.mark.vm
async def test_sandbox_copy_from_of_a_guest_made_tree(
    vm_factory: VmFactory, tmp_path: Path, sentinel: Path
) -> None:
    sandbox = await vm_factory.sandbox()
    agent = await sandbox.agent()
    # Built by the guest: a set-uid file, a set-gid sticky directory, and a symlink named
    # like the old copy's temporary file for "f", pointing at a host file.
    made = await agent.exec(
        "set -e; mkdir -p /root/evil/shared; cd /root/evil; printf run > suid; chmod 6755 suid;"
        " chmod 3777 shared; printf pwned > f; chmod 4755 f;"
        f" ln -s {sentinel / 'keep'} .f.capsa-part"
    )
    assert made.ok, made.stderr_text
    dest = tmp_path / "back"
    before = outside(tmp_path, dest)
    await within(120, agent.copy_from("/root/evil", dest))
    assert outside(tmp_path, dest) == before
    assert stat.S_IMODE((dest / "suid").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "f").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "shared").stat().st_mode) & 0o7000 == 0
    assert (dest / "suid").read_bytes() == b"run" and (dest / "f").read_bytes() == b"pwned"
    assert os.readlink(dest / ".f.capsa-part") == str(sentinel / "keep")


async def test_events_whose_acks_go_unread_do_not_grow_the_host_buffer() -> None:
    host, guest = socket.socketpair()
    client = await AgentClient.connect_socket(host)
    try:
        noise = [encode({"t": "event", "id": i, "event": "noise"}) for i in range(1, 200_001)]
        guest.settimeout(1)

        def send_until_refused() -> None:
            with contextlib.suppress(TimeoutError):
                guest.sendall(b"".join(noise))

        await asyncio.to_thread(send_until_refused)
        buffered = client.channel._writer.transport.get_write_buffer_size()
        assert buffered <= MiB, f"{buffered} bytes of acks held"
    finally:
        guest.close()
        await client.close()


async def test_close_does_not_wait_for_a_guest_that_stopped_reading() -> None:
    host, guest = socket.socketpair()
    client = await AgentClient.connect_socket(host)
    try:
        for _ in range(8):  # far more than the socket buffers take
            client.channel.send({"t": "req", "id": 1, "op": "x"}, bytes(BIG_BODY))
        started = asyncio.get_running_loop().time()
        await within(10, client.close())
        assert asyncio.get_running_loop().time() - started < CLOSE_TIMEOUT + 1
    finally:
        guest.close()
