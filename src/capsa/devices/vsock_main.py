"""The vsock device as a helper process (started by :mod:`capsa.devices.launch`).

    python -m capsa.devices.vsock_main --vhost-socket PATH --guest-cid 3 \\
        --port 1024:listen:/run/a.sock --port 2049:connect:/run/b.sock
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from capsa._util.helper import run_helper, say_ready, stop_event
from capsa.devices.vhost_server import listen_unix, remove_paths, serve_vhost_user
from capsa.devices.vsock import PortConfig, VsockDevice


async def serve(
    vhost_path: Path, guest_cid: int, ports: list[tuple[int, bool, Path]], identity: str | None
) -> None:
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
        # Every socket is bound: from here on the helper needs no file access at all.
        say_ready(identity)
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
    parser.add_argument("--identity", default=None, help="uid:gid:groups:caps to run as")
    args = parser.parse_args(argv)
    return run_helper(serve(args.vhost_socket, args.guest_cid, args.port, args.identity))


if __name__ == "__main__":
    sys.exit(main())
