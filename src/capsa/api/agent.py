"""The guest agent's operations, on top of the agent channel: processes, files, system
information, power-off. Any number of calls run at once over the one channel.

    agent = await sandbox.agent()
    result = await agent.exec("uname").arg("-a").run()
"""

from __future__ import annotations

import os
import socket
import stat as stat_module
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from capsa.api.agent_channel import AgentChannel, raise_if_error
from capsa.api.process import ExecCommand, ExecResult, Process, chunks_of, command_spec
from capsa.guest.protocol import CHUNK

__all__ = [
    "AgentClient",
    "DirEntry",
    "ExecCommand",
    "ExecResult",
    "FileStat",
    "MountInfo",
    "Process",
    "SystemInfo",
]


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
    ) -> ExecCommand:
        """Run a command to completion: ``await agent.exec("ls -la")`` or, as a builder,
        ``await agent.exec("uname").arg("-a").run()`` (with args no shell is involved)."""
        return ExecCommand(self.channel, cmd, env, cwd, timeout, stdin)

    async def start(
        self,
        cmd: str | Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        pty: bool = False,
        rows: int = 24,
        cols: int = 80,
    ) -> Process:
        """Start a process whose output streams back while it runs (``pty=True``: a terminal)."""
        spec = command_spec(cmd, env, cwd, timeout)
        spec.update(pty=pty, rows=rows, cols=cols)
        return await Process.start(self.channel, spec, pty)

    # -- files --------------------------------------------------------------------------

    async def read_file(self, path: str) -> bytes:
        data = bytearray()
        async for chunk in self.iter_file(path):
            data += chunk
        return bytes(data)

    async def iter_file(self, path: str) -> AsyncIterator[bytes]:
        """A guest file's content in chunks, never whole in memory."""
        call = self.channel.open("read_file", {"path": path}, bounded=True)
        try:
            await call.drain()
            while True:
                header, body = await call.next()
                if header["t"] == "data":
                    yield body
                elif header["t"] in ("res", "err"):
                    raise_if_error(header)
                    return
        finally:
            call.close()

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
        return bool((await self.channel.request("exists", path=path))["exists"])

    async def stat(self, path: str) -> FileStat:
        h = await self.channel.request("stat", path=path)
        return FileStat(
            h["size"], h["mode"], h["mtime"], h["uid"], h["gid"], h["is_dir"], h["is_symlink"]
        )

    async def list_dir(self, path: str) -> list[DirEntry]:
        h = await self.channel.request("list_dir", path=path)
        return [
            DirEntry(e["name"], e["is_dir"], e["size"], e["mode"], e["mtime"], e["is_symlink"])
            for e in h["entries"]
        ]

    async def remove(self, path: str, recursive: bool = False) -> None:
        await self.channel.request("remove", path=path, recursive=recursive)

    async def mkdir(self, path: str, parents: bool = True, mode: int = 0o755) -> None:
        await self.channel.request("mkdir", path=path, parents=parents, mode=mode)

    async def symlink(self, target: str, path: str) -> None:
        await self.channel.request("symlink", path=path, target=target)

    async def readlink(self, path: str) -> str:
        return str((await self.channel.request("readlink", path=path))["target"])

    async def copy_to(self, host_path: str | Path, guest_path: str) -> None:
        """Copy a host file or directory tree into the guest (streamed)."""
        src = Path(host_path)
        if src.is_symlink():
            await self.symlink(os.readlink(src), guest_path)
        elif src.is_dir():
            await self.mkdir(guest_path, mode=stat_module.S_IMODE(src.stat().st_mode))
            for child in sorted(src.iterdir()):
                await self.copy_to(child, f"{guest_path.rstrip('/')}/{child.name}")
        else:
            mode = stat_module.S_IMODE(src.stat().st_mode)
            with open(src, "rb") as f:
                await self._write_stream(guest_path, iter(lambda: f.read(CHUNK), b""), mode, False)

    async def copy_from(self, guest_path: str, host_path: str | Path) -> None:
        """Copy a guest file or directory tree to the host (streamed)."""
        dest = Path(host_path)
        st = await self.stat(guest_path)
        if st.is_symlink:
            dest.symlink_to(await self.readlink(guest_path))
        elif st.is_dir:
            dest.mkdir(mode=stat_module.S_IMODE(st.mode) | 0o700, exist_ok=True)
            for entry in await self.list_dir(guest_path):
                await self.copy_from(f"{guest_path.rstrip('/')}/{entry.name}", dest / entry.name)
        else:
            tmp = dest.with_name(f".{dest.name}.capsa-part")
            try:
                with open(tmp, "wb") as f:
                    async for chunk in self.iter_file(guest_path):
                        f.write(chunk)
                tmp.chmod(stat_module.S_IMODE(st.mode))
                tmp.replace(dest)
            finally:
                tmp.unlink(missing_ok=True)

    async def info(self) -> SystemInfo:
        h = await self.channel.request("info")
        return SystemInfo(
            kernel_version=h["kernel_version"],
            hostname=h["hostname"],
            cpus=h["cpus"],
            memory_bytes=h["memory_bytes"],
            uptime=h["uptime"],
            mounts=[MountInfo(m["source"], m["target"], m["fstype"]) for m in h["mounts"]],
        )
