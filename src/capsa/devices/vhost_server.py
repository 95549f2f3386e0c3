"""The vhost-user side of a device helper: listen for QEMU, serve one device until QEMU
leaves or the owner stops the helper, and remove the helper's socket files afterwards.
(Starting and stopping helpers follows :mod:`capsa._util.helper`.)"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Sequence
from pathlib import Path

from capsa.devices.guest_memory import DeviceError
from capsa.devices.vhost_user import Device, VhostUserBackend, recv_message

log = logging.getLogger("capsa.devices")


def listen_unix(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(64)
    sock.setblocking(False)
    return sock


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
