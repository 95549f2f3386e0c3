"""The vsock device as a helper process, and the owner-side helper that starts it.

    python -m capsa.devices.vsock_main --vhost-socket PATH --guest-cid 3 \\
        --port 1024:listen:/run/a.sock --port 2049:connect:/run/b.sock
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from capsa.devices.helper import (
    DeviceProcess,
    listen_unix,
    remove_paths,
    say_ready,
    serve_vhost_user,
    start_device_process,
    stop_event,
)
from capsa.devices.vsock import PortConfig, VsockDevice


async def serve(vhost_path: Path, guest_cid: int, ports: list[tuple[int, bool, Path]]) -> None:
    device = VsockDevice(guest_cid, [PortConfig(p, c) for p, c, _ in ports])
    paths = [vhost_path] + [path for _, _, path in ports]
    vhost_listener = listen_unix(vhost_path)
    servers = []
    try:
        for port, _, path in ports:

            def on_client(
                r: asyncio.StreamReader, w: asyncio.StreamWriter, port: int = port
            ) -> None:
                device.host_client(port, r, w)

            servers.append(await asyncio.start_unix_server(on_client, sock=listen_unix(path)))
        stop = stop_event()
        say_ready()
        await serve_vhost_user(vhost_listener, device, stop)
    finally:
        for server in servers:
            server.close()
        vhost_listener.close()
        remove_paths(paths)


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


async def start_vsock_device(
    vhost_socket: Path, ports: Sequence[tuple[int, Path, bool]], guest_cid: int = 3
) -> DeviceProcess:
    """Start the helper and return once every socket is listening."""
    args = ["--vhost-socket", str(vhost_socket), "--guest-cid", str(guest_cid)]
    for port, path, connect in ports:
        args += ["--port", f"{port}:{'connect' if connect else 'listen'}:{path}"]
    return await start_device_process("capsa.devices.vsock_main", args, "vsock device")


if __name__ == "__main__":
    sys.exit(main())
