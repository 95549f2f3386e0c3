"""The network stack as a helper process attached to QEMU's ``-netdev stream``.

    python -m capsa.net.stack_main --socket PATH --subnet 10.0.2.0/24

Framing (QEMU 7.2): each Ethernet frame is preceded by its length as a 4-byte big-endian
integer, in both directions. The socket is listening before ``READY`` is printed (QEMU
does not reconnect); the process exits when its owner's pipe closes or QEMU goes away.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import struct
import sys
from collections.abc import Sequence
from ipaddress import IPv4Address
from pathlib import Path

from capsa._util.reaper import REAPER
from capsa.errors import StartFailed
from capsa.net.dns import host_resolver
from capsa.net.gateway import Gateway
from capsa.net.policy import NetworkPolicy

READY = b"READY\n"
LENGTH = struct.Struct("!I")
MAX_FRAME = 65535 + 14


async def serve_guest(
    gateway: Gateway, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    def emit(frame: bytes) -> None:
        writer.write(LENGTH.pack(len(frame)) + frame)

    gateway.emit = emit
    try:
        while True:
            (length,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
            if length > MAX_FRAME:
                return  # a framing error cannot be recovered from: drop the link
            frame = await reader.readexactly(length)
            for reply in gateway.handle(frame):
                writer.write(LENGTH.pack(len(reply)) + reply)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        return
    finally:
        writer.close()


async def serve(
    path: Path,
    subnet: str,
    mtu: int,
    aliases: dict[IPv4Address, str],
    dns_upstream: tuple[str, int] | None,
    policy: NetworkPolicy | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    gateway = Gateway.for_subnet(
        subnet, mtu=mtu, aliases=aliases, dns_upstream=dns_upstream, policy=policy
    )
    done = asyncio.Event()

    async def on_qemu(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_guest(gateway, reader, writer)
        done.set()  # QEMU went away: so does the VM's network

    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    server = await asyncio.start_unix_server(on_qemu, path=str(path))
    try:
        loop.add_signal_handler(signal.SIGTERM, done.set)

        def on_lifeline() -> None:
            if not os.read(sys.stdin.fileno(), 4096):
                done.set()

        loop.add_reader(sys.stdin.fileno(), on_lifeline)
        os.write(sys.stdout.fileno(), READY)
        await done.wait()
    finally:
        server.close()
        with contextlib.suppress(OSError):
            path.unlink()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="capsa userspace network stack")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--subnet", default="10.0.2.0/24")
    parser.add_argument("--mtu", type=int, default=65520)
    parser.add_argument("--alias", action="append", default=[], help="GUEST_IP=HOST_IP")
    parser.add_argument("--dns", default=None, help="upstream resolver HOST:PORT")
    parser.add_argument("--policy", default=None, help="NetworkPolicy as JSON")
    args = parser.parse_args(argv)
    policy = NetworkPolicy.from_json(json.loads(args.policy)) if args.policy else None
    aliases = {IPv4Address(g): h for g, _, h in (a.partition("=") for a in args.alias)}
    upstream = host_resolver()
    if args.dns:
        host, _, port = args.dns.rpartition(":")
        upstream = (host, int(port))
    asyncio.run(serve(args.socket, args.subnet, args.mtu, aliases, upstream, policy))
    return 0


class StackProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def stop(self) -> None:
        if self.proc.returncode is None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        REAPER.unwatch_pid(self.proc.pid)


async def start_stack(
    socket_path: Path,
    subnet: str,
    mtu: int,
    aliases: Sequence[tuple[str, str]] = (),
    dns_upstream: str | None = None,
    policy: NetworkPolicy | None = None,
) -> StackProcess:
    alias_args = [arg for g, h in aliases for arg in ("--alias", f"{g}={h}")]
    if dns_upstream:
        alias_args += ["--dns", dns_upstream]
    if policy is not None:
        alias_args += ["--policy", json.dumps(policy.to_json())]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "capsa.net.stack_main", "--socket", str(socket_path),
        "--subnet", subnet, "--mtu", str(mtu), *alias_args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    REAPER.watch_pid(proc.pid)
    stack = StackProcess(proc)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
    except TimeoutError:
        line = b""
    if line != READY:
        await stack.stop()
        err = (await proc.stderr.read()).decode(errors="replace").strip()
        raise StartFailed(f"network stack failed to start: {err or 'no READY'}")
    return stack


if __name__ == "__main__":
    sys.exit(main())
