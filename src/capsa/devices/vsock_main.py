"""The vsock device as a helper process, and the owner-side helper that starts it.

    python -m capsa.devices.vsock_main --vhost-socket PATH --guest-cid 3 \\
        --port 1024:listen:/run/a.sock --port 2049:connect:/run/b.sock

Every socket is listening before the process prints ``READY``, because QEMU refuses to
start when its vhost-user back end is not there yet. The process exits when its owner's
pipe (stdin) closes, when QEMU disconnects, or on SIGTERM, and removes its socket files.
"""

from __future__ import annotations

import argparse
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
from capsa.devices.vhost_user import VhostUserBackend, recv_message
from capsa.devices.vsock import PortConfig, VsockDevice
from capsa.errors import StartFailed

log = logging.getLogger("capsa.vsock")
READY = b"READY\n"
START_TIMEOUT = 15.0


def _listen_unix(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(64)
    sock.setblocking(False)
    return sock


async def serve(vhost_path: Path, guest_cid: int, ports: list[tuple[int, bool, Path]]) -> None:
    loop = asyncio.get_running_loop()
    device = VsockDevice(guest_cid, [PortConfig(p, c) for p, c, _ in ports])
    stop = asyncio.Event()
    paths = [vhost_path] + [path for _, _, path in ports]
    vhost_listener = _listen_unix(vhost_path)
    servers = []
    try:
        for port, _, path in ports:

            def on_client(
                r: asyncio.StreamReader, w: asyncio.StreamWriter, port: int = port
            ) -> None:
                device.host_client(port, r, w)

            servers.append(await asyncio.start_unix_server(on_client, sock=_listen_unix(path)))
        loop.add_signal_handler(signal.SIGTERM, stop.set)

        def on_lifeline() -> None:
            if not os.read(sys.stdin.fileno(), 4096):
                stop.set()  # the owner is gone

        loop.add_reader(sys.stdin.fileno(), on_lifeline)
        os.write(sys.stdout.fileno(), READY)

        accept = asyncio.ensure_future(loop.sock_accept(vhost_listener))
        stopping = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({accept, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if accept in done:
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
            await stop.wait()
            loop.remove_reader(qemu.fileno())
            backend.close()
            qemu.close()
        else:
            accept.cancel()
    finally:
        for server in servers:
            server.close()
        vhost_listener.close()
        for path in paths:
            with contextlib.suppress(OSError):
                path.unlink()


def parse_port(spec: str) -> tuple[int, bool, Path]:
    port, mode, path = spec.split(":", 2)
    if mode not in ("listen", "connect"):
        raise argparse.ArgumentTypeError(f"mode must be listen or connect: {spec}")
    return int(port), mode == "connect", Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="capsa vhost-user vsock device")
    parser.add_argument("--vhost-socket", type=Path, required=True)
    parser.add_argument("--guest-cid", type=int, default=3)
    parser.add_argument("--port", type=parse_port, action="append", default=[])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="capsa-vsock: %(message)s")
    asyncio.run(serve(args.vhost_socket, args.guest_cid, args.port))
    return 0


class DeviceProcess:
    """A running device helper, owned by the caller (and by the watchdog if it crashes)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

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
        REAPER.unwatch_pid(self.proc.pid)

    async def wait(self) -> int:
        return await self.proc.wait()


async def start_vsock_device(
    vhost_socket: Path, ports: Sequence[tuple[int, Path, bool]], guest_cid: int = 3
) -> DeviceProcess:
    """Start the helper and return once every socket is listening."""
    argv = [sys.executable, "-m", "capsa.devices.vsock_main", "--vhost-socket", str(vhost_socket),
            "--guest-cid", str(guest_cid)]  # fmt: skip
    for port, path, connect in ports:
        argv += ["--port", f"{port}:{'connect' if connect else 'listen'}:{path}"]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    REAPER.watch_pid(proc.pid)
    device = DeviceProcess(proc)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
    except TimeoutError:
        line = b""
    if line != READY:
        await device.stop()
        err = (await proc.stderr.read()).decode(errors="replace").strip()
        raise StartFailed(f"vsock device failed to start: {err or 'no READY from the helper'}")
    return device


if __name__ == "__main__":
    sys.exit(main())
