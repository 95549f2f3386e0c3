"""Host-side handle for a vsock port: a Unix socket path that host programs connect to."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from pathlib import Path

from capsa.errors import CapsaError


@dataclass(frozen=True)
class VsockSocket:
    port: int
    path: Path
    connect_mode: bool

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a stream to this port (listen mode: the next guest connection)."""
        try:
            return await asyncio.open_unix_connection(str(self.path))
        except FileNotFoundError:
            raise CapsaError(
                f"vsock socket {self.path} does not exist: is the VM running?"
            ) from None
        except ConnectionRefusedError:
            raise CapsaError(f"vsock socket {self.path} refused the connection") from None

    def connect_blocking(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.path))
        return s
