"""Where ``capsa serve`` listens: a Unix socket (mode 0600, in a 0700 folder) by default,
or 127.0.0.1:PORT behind a bearer token."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

import uvicorn

from capsa.server.app import ServerOptions, create_app
from capsa.server.paths import default_socket, runtime_folder

__all__ = ["default_socket", "runtime_folder", "serve", "tcp_listener", "unix_listener"]


def unix_listener(path: Path) -> socket.socket:
    """A listening socket only its owner may connect to (mode 0600 from its creation; a
    folder that exists keeps its own mode)."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)  # a folder of our own: private
    if path.is_socket():
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # left by a server that died
        else:
            raise SystemExit(f"capsa: a server already listens on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(128)
    return sock


def tcp_listener(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def new_token() -> str:
    return secrets.token_urlsafe(32)


async def serve(sock: socket.socket, options: ServerOptions) -> None:
    """Serve the API on ``sock`` until cancelled or signalled; every sandbox ends with it."""
    app = create_app(options)
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    try:
        await server.serve(sockets=[sock])
    finally:
        sock.close()
