"""What every device helper process shares: its sockets, its lifeline, the vhost-user
loop, and the owner-side handle that starts and stops it.

A helper is listening on every socket before it prints ``READY`` (QEMU refuses to start
when its vhost-user back end is not there yet). It exits when its owner's pipe (stdin)
closes, when QEMU disconnects, or on SIGTERM, and removes its socket files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from capsa._util.reaper import REAPER
from capsa.devices.guest_memory import DeviceError
from capsa.devices.vhost_user import Device, VhostUserBackend, recv_message
from capsa.errors import StartFailed

log = logging.getLogger("capsa.devices")
READY = b"READY\n"
START_TIMEOUT = 15.0


def listen_unix(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(64)
    sock.setblocking(False)
    return sock


def stop_event() -> asyncio.Event:
    """Set on SIGTERM or when the owner's end of stdin closes."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def on_lifeline() -> None:
        if not os.read(sys.stdin.fileno(), 4096):
            stop.set()  # the owner is gone

    loop.add_reader(sys.stdin.fileno(), on_lifeline)
    return stop


def say_ready() -> None:
    os.write(sys.stdout.fileno(), READY)


async def serve_vhost_user(listener: socket.socket, device: Device, stop: asyncio.Event) -> None:
    """Accept QEMU on ``listener`` and drive ``device`` until QEMU leaves or ``stop``."""
    loop = asyncio.get_running_loop()
    accept = asyncio.ensure_future(loop.sock_accept(listener))
    stopping = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({accept, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if accept not in done:
        accept.cancel()
        return
    stopping.cancel()
    qemu, _ = accept.result()
    qemu.setblocking(True)
    backend = VhostUserBackend(device, qemu)
    backend.on_kick_fd = lambda fd, q: loop.add_reader(fd, backend.kicked, q)
    backend.on_kick_fd_removed = loop.remove_reader

    def on_message() -> None:
        try:
            msg = recv_message(qemu)
            if msg is None:
                stop.set()
                return
            backend.handle(msg)
        except (DeviceError, OSError) as e:
            log.error("vhost-user connection failed: %s", e)
            stop.set()

    loop.add_reader(qemu.fileno(), on_message)
    try:
        await stop.wait()
    finally:
        loop.remove_reader(qemu.fileno())
        backend.close()
        qemu.close()


def remove_paths(paths: Sequence[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


class DeviceProcess:
    """A running device helper, owned by the caller (and by the watchdog if it crashes)."""

    def __init__(self, proc: asyncio.subprocess.Process, what: str) -> None:
        self.proc = proc
        self.what = what
        self.stderr_tail: list[str] = []
        self._logs: asyncio.Task[None] | None = None

    def pump_logs(self) -> None:
        """Keep reading the helper's stderr (a full pipe would stall it) into our logging."""
        self._logs = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            self.stderr_tail = [*self.stderr_tail[-19:], text]
            log.warning("%s: %s", self.what, text)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def stop(self) -> None:
        if self.proc.returncode is None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # the lifeline: the helper exits on EOF
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._logs is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._logs, 2)
        REAPER.unwatch_pid(self.proc.pid)

    async def wait(self) -> int:
        return await self.proc.wait()


async def start_device_process(module: str, args: Sequence[str], what: str) -> DeviceProcess:
    """Start ``python -m module args`` and return once it says it is listening."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    REAPER.watch_pid(proc.pid)
    device = DeviceProcess(proc, what)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
    except TimeoutError:
        line = b""
    if line != READY:
        await device.stop()
        err = (await proc.stderr.read()).decode(errors="replace").strip()
        raise StartFailed(f"{what} failed to start: {err or 'no READY from the helper'}")
    device.pump_logs()
    return device
