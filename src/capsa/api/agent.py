"""The guest agent's operations, on top of the agent channel: processes, files, system
information, power-off. Any number of calls run at once over the one channel.

    agent = await sandbox.agent()
    result = await agent.exec("uname").arg("-a").run()

Code in the sandbox runs as root and may replace the agent with its own program: every
answer is checked before use (types, ranges, names), what the guest may make the host hold
or write is bounded, and files from the guest are written only through descriptors of
directories this process created, never through a name that could lead elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import socket
import stat as stat_module
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Generator,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsa.api.agent_channel import AgentChannel, Call, Header, raise_if_error
from capsa.api.process import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_MAX_UNREAD_OUTPUT,
    ExecCommand,
    ExecResult,
    Process,
    chunks_of,
    command_spec,
    dropped_of,
    pid_of,
    positive_limit,
    started_pid,
)
from capsa.errors import (
    AgentError,
    AgentLimitExceeded,
    AgentProtocolError,
    InvalidConfig,
    ProcessError,
)
from capsa.guest.protocol import CHUNK

__all__ = [
    "AgentClient",
    "DirEntry",
    "ExecCommand",
    "ExecResult",
    "FileEvent",
    "FileStat",
    "FileWatch",
    "MountInfo",
    "Process",
    "ProcessInfo",
    "SystemInfo",
]

MAX_PROCESS_LIST = 1024
FILE_EVENTS = ("create", "modify", "delete", "move", "overflow")


@dataclass(frozen=True)
class FileEvent:
    """A change under a watched directory: ``kind`` is create, modify, delete, move
    (``dest`` is where it went) or overflow (events were lost: look again)."""

    kind: str
    path: str
    is_dir: bool = False
    dest: str | None = None


class FileWatch:
    """A watch on a guest directory (inotify in the guest), open from ``async with`` or
    the first ``async for`` until the block ends or :meth:`close`. Events wait for their
    reader in a bounded window; a reader that stalls past the channel's stall timeout
    loses the watch (:class:`~capsa.errors.AgentLimitExceeded`)."""

    def __init__(self, channel: AgentChannel, path: str, recursive: bool) -> None:
        self._channel = channel
        self._path = path
        self._recursive = recursive
        self._call: Call | None = None
        self.watches = 0  # directories the guest follows

    async def open(self) -> FileWatch:
        if self._call is None:
            call = self._channel.open(
                "watch", {"path": self._path, "recursive": self._recursive}, bounded=True
            )
            try:
                await call.drain()
                header, _ = await call.next()
                raise_if_error(header)
            except BaseException:
                call.close()
                raise
            watches = header.get("watches")
            self.watches = watches if isinstance(watches, int) else 0
            call.keeps_busy = False  # watching is not using the sandbox
            self._call = call
        return self

    async def close(self) -> None:
        if self._call is not None:
            with contextlib.suppress(AgentError, ConnectionError):
                self._call.send("detach")
                await self._call.drain()
            self._call.close()

    async def __aenter__(self) -> FileWatch:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[FileEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[FileEvent]:
        await self.open()
        assert self._call is not None
        while True:
            header, _ = await self._call.next()
            if header["t"] in ("res", "err"):
                raise_if_error(header)
                return
            if header["t"] == "data":
                yield _file_event(header)


def _file_event(header: Header) -> FileEvent:
    kind, path, dest = header.get("ev"), header.get("path"), header.get("dest")
    if kind not in FILE_EVENTS or not isinstance(path, str):
        raise AgentProtocolError(f"a malformed file event {header!r:.200}")
    if dest is not None and not isinstance(dest, str):
        raise AgentProtocolError("a file event's destination is not a path")
    return FileEvent(kind, path, header.get("dir") is True, dest)


@dataclass(frozen=True)
class ProcessInfo:
    """A background process as the agent reports it."""

    pid: int
    argv: tuple[str, ...]
    running: bool
    exit_code: int | None
    started: float  # guest clock, seconds since the epoch
    dropped: tuple[int, int]  # output bytes (stdout, stderr) its buffers no longer hold

    @classmethod
    def from_header(cls, h: object) -> ProcessInfo:
        if not isinstance(h, dict):
            raise AgentProtocolError("a process entry is not an object")
        argv, code, started = h.get("argv"), h.get("exit_code"), h.get("started")
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise AgentProtocolError("a process entry's argv is malformed")
        if code is not None and (not isinstance(code, int) or isinstance(code, bool)):
            raise AgentProtocolError("a process entry's exit code is malformed")
        if not isinstance(started, int | float) or isinstance(started, bool):
            raise AgentProtocolError("a process entry's start time is malformed")
        return cls(
            pid=pid_of(h),
            argv=tuple(argv),
            running=h.get("running") is True,
            exit_code=code,
            started=float(started),
            dropped=dropped_of(h),
        )


# read_file holds the whole file in memory: larger files want iter_file or copy_from.
DEFAULT_MAX_READ = 256 * 1024 * 1024
# What one copy_from takes from the guest at most: directory levels below the copied path,
# entries (files, directories, symlinks, the copied path itself) and file bytes.
DEFAULT_COPY_MAX_DEPTH = 64
DEFAULT_COPY_MAX_ENTRIES = 100_000
DEFAULT_COPY_MAX_BYTES = 4 * 1024 * 1024 * 1024

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in after the lstat must not block the open.
_HOST_NODE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_MODES = range(1 << 16)
_SIZES = range(1 << 63)
_IDS = range(1 << 32)


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


class AgentClient:
    """Talks to one guest agent (``await sandbox.agent()`` gives the sandbox's)."""

    def __init__(self, channel: AgentChannel) -> None:
        self.channel = channel

    @classmethod
    async def connect_socket(cls, sock: socket.socket) -> AgentClient:
        return cls(await AgentChannel.connect_socket(sock))

    # -- readiness and lifecycle ----------------------------------------------------------

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait for the agent's hello (it is sent once, when the agent starts)."""
        await self.channel.wait_ready(timeout)

    @property
    def exit_code(self) -> int | None:
        """The main process's exit code, once the guest reported it."""
        return self.channel.exit_code

    async def wait_exit(self) -> int | None:
        return await self.channel.wait_exit()

    async def ping(self) -> None:
        await self.channel.request("ping")

    async def shutdown(self) -> None:
        """Ask the guest to power off (the agent answers first)."""
        await self.channel.request("shutdown")

    async def close(self) -> None:
        await self.channel.close()

    # -- processes ----------------------------------------------------------------------

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
    ) -> ExecCommand:
        """Run a command to completion: ``await agent.exec("ls -la")`` or, as a builder,
        ``await agent.exec("uname").arg("-a").run()`` (with args no shell is involved).

        A command that writes more than ``max_output`` bytes to stdout or stderr is killed
        and :class:`~capsa.errors.OutputLimitExceeded` raised, with the output kept.
        ``check=True`` raises :class:`~capsa.errors.ProcessError` unless it exits 0;
        ``timeout`` kills its whole process group."""
        return ExecCommand(
            self.channel, cmd, env, cwd, timeout, stdin, max_output=max_output, check=check
        )

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
        max_unread_output: int = DEFAULT_MAX_UNREAD_OUTPUT,
        background: bool = False,
    ) -> Process:
        """Start a process whose output streams back while it runs (``pty=True``: a terminal).
        ``background=True``: it outlives this call and this Process (``detach()``), is
        listed by :meth:`processes` and followed again with :meth:`attach`.

        Each stream holds at most ``max_unread_output`` bytes its reader has not taken;
        past that the process is killed (see :class:`Process`)."""
        spec = command_spec(cmd, env, cwd, timeout)
        spec.update(pty=pty, rows=rows, cols=cols)
        if background:
            call = self.channel.open("start", {**spec, "background": True})
            try:
                await call.drain()
                pid = await started_pid(call)
            finally:
                call.close()
            return await self.attach(pid, max_unread_output=max_unread_output)
        return await Process.start(self.channel, spec, pty, max_unread_output=max_unread_output)

    async def attach(
        self, pid: int, *, max_unread_output: int = DEFAULT_MAX_UNREAD_OUTPUT
    ) -> Process:
        """Follow a background process again: the output its buffers kept (the last 1 MiB
        per stream; ``process.dropped`` counts what went before), then what comes, then
        its exit code. ``process.detach()`` leaves it running."""
        return await Process.attach(self.channel, pid, max_unread_output=max_unread_output)

    async def processes(self) -> list[ProcessInfo]:
        """The background processes the agent keeps (running ones, and the last that
        ended, with their exit codes)."""
        header = await self.channel.request("ps")
        procs = header.get("procs")
        if not isinstance(procs, list) or len(procs) > MAX_PROCESS_LIST:
            raise AgentProtocolError("the agent's process list is malformed")
        return [ProcessInfo.from_header(p) for p in procs]

    # -- files --------------------------------------------------------------------------

    async def read_file(self, path: str, *, max_size: int = DEFAULT_MAX_READ) -> bytes:
        """A guest file's whole content; :class:`~capsa.errors.AgentLimitExceeded` if it is
        longer than ``max_size`` bytes (the guest may make a file endless)."""
        positive_limit("max_size", max_size)
        data = bytearray()
        async for chunk in self.iter_file(path, max_size=max_size):
            data += chunk
        return bytes(data)

    async def iter_file(
        self, path: str, *, max_size: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        """A guest file's content in chunks, never whole in memory (with ``max_size``:
        :class:`~capsa.errors.AgentLimitExceeded` rather than more than that many bytes).

        Read it to the end or ``aclose()`` it: while its unread chunks fill the window,
        the channel waits for it (up to the channel's ``stall_timeout``)."""
        call = self.channel.open("read_file", {"path": path}, bounded=True)
        received = 0
        try:
            await call.drain()
            while True:
                header, body = await call.next()
                if header["t"] == "data":
                    received += len(body)
                    if max_size is not None and received > max_size:
                        raise AgentLimitExceeded(f"{path}: more than {max_size} bytes")
                    yield body
                elif header["t"] in ("res", "err"):
                    _check_read_size(raise_if_error(header), received)
                    return
        finally:
            call.close()

    def watch(self, path: str, *, recursive: bool = False) -> FileWatch:
        """File events under the guest directory ``path``: ``async with agent.watch(p) as
        events: async for event in events: ...`` (see :class:`FileWatch`)."""
        return FileWatch(self.channel, path, recursive)

    async def read_tar(self, path: str) -> AsyncGenerator[bytes, None]:
        """The guest directory ``path`` as a tar stream, in chunks as the guest makes it
        (``tar -C path -cf - .``); a failure raises :class:`~capsa.errors.ProcessError`."""
        process = await self.start(["tar", "-C", path, "-cf", "-", "."])
        ended = False
        try:
            async for chunk in process.stdout:
                yield chunk
            errors = b"".join([chunk async for chunk in process.stderr])
            code = await process.wait()
            ended = True
        finally:
            if not ended:  # the reader stopped early: so does tar
                with contextlib.suppress(AgentError, ConnectionError):
                    await process.kill()
        if code != 0:
            message = f"tar of {path} failed ({code}): {errors.decode(errors='replace')}"
            raise ProcessError(message, exit_code=code, stderr=errors)

    async def write_tar(self, path: str, chunks: AsyncIterable[bytes] | Iterable[bytes]) -> None:
        """Unpack a tar stream into the guest directory ``path`` (made if missing) as it
        arrives; a failure raises :class:`~capsa.errors.ProcessError`."""
        script = 'mkdir -p "$0" && exec tar -C "$0" -xf -'
        process = await self.start(["sh", "-c", script, path])
        try:
            if isinstance(chunks, AsyncIterable):
                async for chunk in chunks:
                    await process.write_stdin(chunk)
            else:
                for chunk in chunks:
                    await process.write_stdin(chunk)
            await process.close_stdin()
            errors = b"".join([chunk async for chunk in process.stderr])
            code = await process.wait()
        except BaseException:
            with contextlib.suppress(AgentError, ConnectionError):
                await process.kill()
            raise
        if code != 0:
            message = f"unpacking into {path} failed ({code}): {errors.decode(errors='replace')}"
            raise ProcessError(message, exit_code=code, stderr=errors)

    async def write_file(
        self, path: str, data: bytes, mode: int = 0o644, make_parents: bool = False
    ) -> None:
        await self._write_stream(path, chunks_of(data), mode, make_parents)

    async def _write_stream(
        self, path: str, chunks: Iterable[bytes], mode: int, make_parents: bool
    ) -> None:
        fields = {"path": path, "mode": mode, "make_parents": make_parents}
        call = self.channel.open("write_file", fields)
        try:
            for chunk in chunks:
                call.send("data", chunk)
                await call.drain()
            call.send("end")
            await call.drain()
            await call.result()
        finally:
            call.close()

    async def exists(self, path: str) -> bool:
        return _bool_field(await self.channel.request("exists", path=path), "exists")

    async def stat(self, path: str) -> FileStat:
        """``path`` itself (a symlink is not followed), as the agent reports it, checked."""
        return _checked_stat(await self.channel.request("stat", path=path))

    async def list_dir(self, path: str) -> list[DirEntry]:
        """The entries of a guest directory, checked: each name is one path component
        (never empty, ``.``, ``..``, nor containing ``/`` or NUL) and appears once."""
        entries = (await self.channel.request("list_dir", path=path)).get("entries")
        if not isinstance(entries, list):
            raise AgentProtocolError(f"the agent listed {type(entries).__name__} entries")
        checked = [_checked_entry(e) for e in entries]
        if len({e.name for e in checked}) != len(checked):
            raise AgentProtocolError(f"the agent listed a name twice in {path}")
        return checked

    async def remove(self, path: str, recursive: bool = False) -> None:
        await self.channel.request("remove", path=path, recursive=recursive)

    async def mkdir(self, path: str, parents: bool = True, mode: int = 0o755) -> None:
        await self.channel.request("mkdir", path=path, parents=parents, mode=mode)

    async def symlink(self, target: str, path: str) -> None:
        await self.channel.request("symlink", path=path, target=target)

    async def readlink(self, path: str) -> str:
        target = (await self.channel.request("readlink", path=path)).get("target")
        if not isinstance(target, str) or not target or "\0" in target:
            raise AgentProtocolError(f"the agent reported symlink target {target!r}")
        return target

    async def copy_to(self, host_path: str | Path, guest_path: str) -> None:
        """Copy a host file or directory tree into the guest (streamed).

        Regular files, directories and symlinks (as symlinks) are copied; FIFOs, sockets
        and devices below ``host_path`` are skipped. Nothing below ``host_path`` is
        followed: each name is opened under its directory's descriptor with
        ``O_NOFOLLOW``, so a tree that changes during the copy (a share the guest writes
        to) cannot make it read a host file outside the tree."""
        if not await self._send_node(None, str(host_path), guest_path):
            raise InvalidConfig(f"{host_path} is not a regular file, directory or symlink")

    async def _send_node(self, dir_fd: int | None, name: str, guest_path: str) -> bool:
        """Copy ``name`` (under ``dir_fd``) to ``guest_path``; False if it is of a kind
        that is not copied."""
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat_module.S_ISLNK(st.st_mode):
            await self.symlink(os.readlink(name, dir_fd=dir_fd), guest_path)
            return True
        if not (stat_module.S_ISDIR(st.st_mode) or stat_module.S_ISREG(st.st_mode)):
            return False
        fd = os.open(name, _HOST_NODE, dir_fd=dir_fd)
        try:
            opened = os.fstat(fd)
            if stat_module.S_IFMT(opened.st_mode) != stat_module.S_IFMT(st.st_mode):
                raise OSError(errno.EAGAIN, "changed while it was being copied", name)
            mode = stat_module.S_IMODE(opened.st_mode)
            if stat_module.S_ISDIR(opened.st_mode):
                await self._send_directory(fd, mode, guest_path)
            else:
                await self._write_stream(guest_path, _chunks_read(fd), mode, False)
        finally:
            os.close(fd)
        return True

    async def _send_directory(self, fd: int, mode: int, guest_path: str) -> None:
        await self.mkdir(guest_path, mode=mode)
        for name in sorted(os.listdir(fd)):
            await self._send_node(fd, name, _child(guest_path, name))

    async def copy_from(
        self,
        guest_path: str,
        host_path: str | Path,
        *,
        max_depth: int = DEFAULT_COPY_MAX_DEPTH,
        max_entries: int = DEFAULT_COPY_MAX_ENTRIES,
        max_bytes: int = DEFAULT_COPY_MAX_BYTES,
    ) -> None:
        """Copy a guest file or directory tree to the host (streamed).

        ``host_path`` must not exist (``FileExistsError`` otherwise, even for a directory
        or a symlink to one: nothing is merged into or written through it); its parent must
        be a directory. Everything is created below that parent through directory
        descriptors: directories with ``mkdir`` and then opened ``O_NOFOLLOW``, files with
        ``O_CREAT | O_EXCL | O_NOFOLLOW``, symlinks as they are (their targets may point
        anywhere, and are never followed here). Only names that are one path component are
        accepted from the guest (:meth:`list_dir`), so nothing lands outside ``host_path``.
        Only the permission bits (``mode & 0o777``) are applied, never set-uid, set-gid or
        sticky; directories also get ``u+rwx``, less the umask. FIFOs, sockets and devices
        below ``guest_path`` are skipped.

        At most ``max_depth`` directory levels below ``guest_path``, ``max_entries``
        entries and ``max_bytes`` file bytes are taken:
        :class:`~capsa.errors.AgentLimitExceeded` past any of them, and
        :class:`~capsa.errors.AgentProtocolError` for an answer that is not well-formed.
        What was copied before an error stays (a file being written is removed)."""
        budget = _CopyBudget(max_depth, max_entries, max_bytes)
        dest = Path(host_path)
        root = await self.stat(guest_path)
        if not _copied_kind(root.mode):
            raise AgentError(f"{guest_path} is not a regular file, directory or symlink")
        budget.take_entries(1)
        parent = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            await _TreeCopy(self, budget).node(guest_path, root.mode, parent, dest.name, 0)
        finally:
            os.close(parent)

    async def info(self) -> SystemInfo:
        h = await self.channel.request("info")
        mounts = h.get("mounts")
        if not isinstance(mounts, list):
            raise AgentProtocolError(f"the agent reported mounts {mounts!r}")
        return SystemInfo(
            kernel_version=_str_field(h, "kernel_version"),
            hostname=_str_field(h, "hostname"),
            cpus=_int_field(h, "cpus", _SIZES),
            memory_bytes=_int_field(h, "memory_bytes", _SIZES),
            uptime=_time_field(h, "uptime"),
            mounts=[_checked_mount(m) for m in mounts],
        )


class _CopyBudget:
    """What one copy_from may still take from the guest."""

    def __init__(self, max_depth: int, max_entries: int, max_bytes: int) -> None:
        if not isinstance(max_depth, int) or isinstance(max_depth, bool) or max_depth < 0:
            raise InvalidConfig(f"max_depth must be a number of levels, not {max_depth!r}")
        self.max_depth = max_depth
        self.max_entries = positive_limit("max_entries", max_entries)
        self.max_bytes = positive_limit("max_bytes", max_bytes)
        self.entries = 0
        self.bytes = 0

    def check_depth(self, depth: int) -> None:
        if depth > self.max_depth:
            raise AgentLimitExceeded(f"copy_from: the tree is deeper than {self.max_depth}")

    def take_entries(self, count: int) -> None:
        self.entries += count
        if self.entries > self.max_entries:
            raise AgentLimitExceeded(f"copy_from: more than {self.max_entries} entries")

    def take_bytes(self, count: int) -> None:
        self.bytes += count
        if self.bytes > self.max_bytes:
            raise AgentLimitExceeded(f"copy_from: more than {self.max_bytes} bytes")


class _TreeCopy:
    """One copy_from: guest nodes created below host directory descriptors, by names
    :meth:`AgentClient.list_dir` checked, each created anew (never opened if it exists)."""

    def __init__(self, agent: AgentClient, budget: _CopyBudget) -> None:
        self.agent = agent
        self.budget = budget

    async def node(self, guest_path: str, mode: int, parent_fd: int, name: str, depth: int) -> None:
        self.budget.check_depth(depth)
        if stat_module.S_ISLNK(mode):
            os.symlink(await self.agent.readlink(guest_path), name, dir_fd=parent_fd)
        elif stat_module.S_ISDIR(mode):
            await self._directory(guest_path, mode, parent_fd, name, depth)
        elif stat_module.S_ISREG(mode):
            await self._file(guest_path, mode, parent_fd, name)

    async def _directory(
        self, guest_path: str, mode: int, parent_fd: int, name: str, depth: int
    ) -> None:
        entries = await self.agent.list_dir(guest_path)
        self.budget.take_entries(len(entries))
        os.mkdir(name, mode=(mode & 0o777) | 0o700, dir_fd=parent_fd)
        fd = os.open(name, _DIRECTORY, dir_fd=parent_fd)
        try:
            for entry in entries:
                path = _child(guest_path, entry.name)
                await self.node(path, entry.mode, fd, entry.name, depth + 1)
        finally:
            os.close(fd)

    async def _file(self, guest_path: str, mode: int, parent_fd: int, name: str) -> None:
        fd = os.open(name, _NEW_FILE, 0o600, dir_fd=parent_fd)
        try:
            # Closed at once on any error: an abandoned stream would pause the channel.
            async with contextlib.aclosing(self.agent.iter_file(guest_path)) as chunks:
                async for chunk in chunks:
                    self.budget.take_bytes(len(chunk))
                    _write_all(fd, chunk)
            # The permission bits only: a guest's set-uid file must not become the host's.
            os.fchmod(fd, mode & 0o777)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=parent_fd)  # half a file must not pass for the guest's
            raise
        finally:
            os.close(fd)


def _child(guest_path: str, name: str) -> str:
    return f"{guest_path.rstrip('/')}/{name}"


def _copied_kind(mode: int) -> bool:
    return stat_module.S_ISREG(mode) or stat_module.S_ISDIR(mode) or stat_module.S_ISLNK(mode)


def _chunks_read(fd: int) -> Generator[bytes, None, None]:
    while chunk := os.read(fd, CHUNK):
        yield chunk


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# -- the agent's answers, checked ------------------------------------------------------------


def _int_field(h: Mapping[str, Any], key: str, valid: range) -> int:
    value = h.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value not in valid:
        raise AgentProtocolError(f"the agent reported {key} {value!r}")
    return value


def _bool_field(h: Mapping[str, Any], key: str) -> bool:
    value = h.get(key)
    if not isinstance(value, bool):
        raise AgentProtocolError(f"the agent reported {key} {value!r}")
    return value


def _str_field(h: Mapping[str, Any], key: str) -> str:
    value = h.get(key)
    if not isinstance(value, str):
        raise AgentProtocolError(f"the agent reported {key} {value!r}")
    return value


def _time_field(h: Mapping[str, Any], key: str) -> float:
    value = h.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise AgentProtocolError(f"the agent reported {key} {value!r}")
    return float(value)


def _checked_kind(h: Mapping[str, Any]) -> tuple[int, bool, bool]:
    """(mode, is_dir, is_symlink), the two flags agreeing with the mode's file type."""
    mode = _int_field(h, "mode", _MODES)
    is_dir, is_symlink = _bool_field(h, "is_dir"), _bool_field(h, "is_symlink")
    if is_dir != stat_module.S_ISDIR(mode) or is_symlink != stat_module.S_ISLNK(mode):
        raise AgentProtocolError(
            f"the agent reported mode {mode:o} with is_dir={is_dir}, is_symlink={is_symlink}"
        )
    return mode, is_dir, is_symlink


def _checked_stat(h: Header) -> FileStat:
    mode, is_dir, is_symlink = _checked_kind(h)
    return FileStat(
        size=_int_field(h, "size", _SIZES),
        mode=mode,
        mtime=_time_field(h, "mtime"),
        uid=_int_field(h, "uid", _IDS),
        gid=_int_field(h, "gid", _IDS),
        is_dir=is_dir,
        is_symlink=is_symlink,
    )


def _checked_entry(entry: object) -> DirEntry:
    if not isinstance(entry, dict):
        raise AgentProtocolError(f"the agent listed {type(entry).__name__} as an entry")
    mode, is_dir, is_symlink = _checked_kind(entry)
    return DirEntry(
        name=_checked_name(entry.get("name")),
        is_dir=is_dir,
        size=_int_field(entry, "size", _SIZES),
        mode=mode,
        mtime=_time_field(entry, "mtime"),
        is_symlink=is_symlink,
    )


def _checked_name(name: object) -> str:
    """``name`` if it is one path component, so that joining it stays in its directory."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
        raise AgentProtocolError(f"the agent listed an entry named {name!r}")
    return name


def _checked_mount(mount: object) -> MountInfo:
    if not isinstance(mount, dict):
        raise AgentProtocolError(f"the agent reported {type(mount).__name__} as a mount")
    return MountInfo(
        source=_str_field(mount, "source"),
        target=_str_field(mount, "target"),
        fstype=_str_field(mount, "fstype"),
    )


def _check_read_size(header: Header, received: int) -> None:
    """A read's final answer must count what arrived: anything else is a lost stream."""
    size = header.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size != received:
        raise AgentProtocolError(f"the agent sent {received} bytes but reported {size!r}")
