"""Network benchmark: capsa's userspace stack against QEMU's built-in user networking.

    python benchmarks/network.py [--mib 64] [--conns 200]

Same run, same guest, same host server: a sandbox on ``NetworkMode.user_nat()`` and one
on ``NetworkMode.NAT`` (slirp) each download and upload ``--mib`` MiB from a loopback
server, timed inside the guest. Also: connections per second opened by the guest, and the
stack process's memory per idle connection. Prints ratios (ours / slirp; > 1 is better
for throughput).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from pathlib import Path

import capsa

GUEST = r"""
import socket, sys, time
host, port, mode, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
def conn():
    s = socket.socket(); s.connect((host, port)); return s
if mode == "down":
    s = conn(); s.sendall(b"D%d\n" % n); got = 0; t = time.perf_counter()
    while got < n:
        d = s.recv(1 << 20)
        if not d: break
        got += len(d)
    print(got / (time.perf_counter() - t) / 1e6)
elif mode == "up":
    s = conn(); s.sendall(b"U%d\n" % n); block = b"x" * (1 << 20); t = time.perf_counter()
    for _ in range(n >> 20): s.sendall(block)
    s.shutdown(socket.SHUT_WR); s.recv(16)
    print(n / (time.perf_counter() - t) / 1e6)
elif mode == "rate":
    t = time.perf_counter()
    for _ in range(n):
        s = conn(); s.sendall(b"P\n"); s.recv(16); s.close()
    print(n / (time.perf_counter() - t))
elif mode == "idle":
    keep = [conn() for _ in range(n)]
    for s in keep: s.sendall(b"I\n")
    print(len(keep)); sys.stdout.flush(); time.sleep(30)
"""
PY = "/usr/lib/capsa/python/bin/python3 -I /tmp/bench.py"


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    line = await reader.readline()
    if line.startswith(b"D"):
        block = os.urandom(1 << 20)
        for _ in range(int(line[1:]) >> 20):
            writer.write(block)
            await writer.drain()
    elif line.startswith(b"U"):
        while await reader.read(1 << 20):
            pass
        writer.write(b"ok")
    elif line.startswith(b"P"):
        writer.write(b"ok")
    elif line.startswith(b"I"):
        await reader.read()
    await writer.drain()
    writer.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def measure(mode: object, host: str, port: int, mib: int, conns: int) -> dict[str, float]:
    async with await capsa.sandbox().network(mode).memory_mb(768).build() as sb:  # type: ignore[arg-type]
        agent = await sb.agent()
        for _ in range(100):
            if b"inet " in (await agent.exec("ip -4 addr show eth0")).stdout:
                break
            await asyncio.sleep(0.1)
        await agent.write_file("/tmp/bench.py", GUEST.encode())
        n = mib << 20
        out: dict[str, float] = {}
        for what, count in (("down", n), ("up", n), ("rate", conns)):
            r = await agent.exec(f"{PY} {host} {port} {what} {count}", timeout=600)
            if r.exit_code != 0:
                raise RuntimeError(f"{what}: {r.stderr.decode()}")
            out[what] = float(r.stdout)
        attachment = getattr(sb.vm._vm, "network", None)
        if attachment is not None:
            pid = attachment.network.stack().proc.pid
            before = rss_kib(pid)
            proc = await agent.start(f"{PY} {host} {port} idle {conns}")
            async for chunk in proc.stdout:
                if chunk.strip():
                    break
            await asyncio.sleep(0.5)
            out["idle_kib_per_conn"] = (rss_kib(pid) - before) / conns
            await proc.kill()
            with contextlib.suppress(Exception):
                await proc.wait(5)
        return out


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--conns", type=int, default=200)
    args = parser.parse_args()
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ours_mode = capsa.NetworkMode.user_nat().host_alias("203.0.113.1", "127.0.0.1").build()
    ours = await measure(ours_mode, "203.0.113.1", port, args.mib, args.conns)
    slirp = await measure(capsa.NetworkMode.NAT, "10.0.2.2", port, args.mib, args.conns)
    server.close()
    print(f"{'':22}{'capsa':>12}{'qemu user':>12}{'ratio':>8}")
    for key, unit in (("down", "MB/s"), ("up", "MB/s"), ("rate", "conn/s")):
        print(f"{key + ' (' + unit + ')':22}{ours[key]:12.1f}{slirp[key]:12.1f}"
              f"{ours[key] / slirp[key]:8.2f}")  # fmt: skip
    print(f"stack memory per idle connection: {ours.get('idle_kib_per_conn', 0):.1f} KiB")


if __name__ == "__main__":
    asyncio.run(main())
