"""Network benchmark: capsa's userspace stack against QEMU's built-in user networking.

    python benchmarks/network.py [--mib 64] [--conns 200] [--no-tap]

Same run, same guest, same host server: a sandbox on ``NetworkMode.user_nat()`` and one
on ``NetworkMode.NAT`` (slirp) each download and upload ``--mib`` MiB from a loopback
server, timed inside the guest. Also: connections per second opened by the guest, and the
stack process's memory per idle connection. Prints ratios (ours / slirp; > 1 is better
for throughput).

Then the stack's own capacity, without a VM in the way: a network namespace with a tap
device stands in for the guest (the kernel's TCP is the peer), wired by
``tapbridge.py`` first to our stack and then to Debian's ``passt`` in the same role.
Needs root, ``ip`` and ``passt``; skipped otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import capsa
from capsa.net.spec import GatewaySpec, NetworkSpec
from capsa.net.stack import start_stack

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
    # The minimal image: the measuring scripts run capsa's own Python, outside a container.
    sandbox = capsa.sandbox().image("minimal").network(mode)  # type: ignore[arg-type]
    async with await sandbox.memory_mb(768).build() as sb:
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


TAP_MAC = "52:54:00:12:34:56"
BENCH_DIR = Path(__file__).resolve().parent


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextlib.asynccontextmanager
async def tap_guest(socket_path: Path) -> AsyncIterator[str]:
    """A namespace whose tap0 is wired to ``socket_path``; yields the namespace's name."""
    ns = f"capsa-bench-{os.getpid()}"
    ip("netns", "add", ns)
    bridge = None
    try:
        bridge = await asyncio.create_subprocess_exec(
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            str(BENCH_DIR / "tapbridge.py"),
            str(socket_path),
            "tap0",
            stdout=asyncio.subprocess.PIPE,
        )
        assert bridge.stdout is not None
        if await asyncio.wait_for(bridge.stdout.readline(), 10) != b"ready\n":
            raise RuntimeError("tap bridge did not start")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "link", "set", "tap0", "address", TAP_MAC, "mtu", "65520", "up")
        ip("-n", ns, "addr", "add", "10.0.2.15/24", "dev", "tap0")
        ip("-n", ns, "route", "add", "default", "via", "10.0.2.2")
        yield ns
    finally:
        if bridge is not None and bridge.returncode is None:
            bridge.kill()
            await bridge.wait()
        ip("netns", "del", ns)


async def run_in(ns: str, script: Path, *args: object) -> float:
    proc = await asyncio.create_subprocess_exec(
        "ip",
        "netns",
        "exec",
        ns,
        sys.executable,
        str(script),
        *map(str, args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 600)
    if proc.returncode != 0:
        raise RuntimeError(f"{args}: {err.decode()}")
    return float(out)


async def tap_measure(kind: str, port: int, mib: int, conns: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="capsa-bench-") as tmp:
        os.chmod(tmp, 0o777)  # passt drops to nobody before it binds
        sock, script = Path(tmp) / "net.sock", Path(tmp) / "client.py"
        script.write_text(GUEST)
        async with contextlib.AsyncExitStack() as stack:
            if kind == "capsa":
                gateway = GatewaySpec(host_aliases=(("203.0.113.1", "127.0.0.1"),))
                net = await start_stack(NetworkSpec(gateway=gateway))
                stack.push_async_callback(net.stop)
                await net.add_port(sock, TAP_MAC, "10.0.2.15")
                host = "203.0.113.1"
            else:
                # The guest's side of slirp's defaults, no forwards, like our stack.
                options = ["-a", "10.0.2.15", "-n", "24", "-g", "10.0.2.2", "-m", "65520"]
                options += ["-t", "none", "-u", "none"]
                passt = subprocess.Popen(
                    ["passt", "-f", "-1", "-q", "-s", str(sock), *options],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                stack.callback(passt.wait)
                stack.callback(passt.kill)
                for _ in range(100):
                    if sock.exists() or passt.poll() is not None:
                        break
                    await asyncio.sleep(0.05)
                if not sock.exists():
                    err = passt.stderr.read().decode() if passt.stderr else ""
                    raise RuntimeError(f"passt did not start: {err}")
                host = "10.0.2.2"  # passt maps its gateway address to the host's loopback
            ns = await stack.enter_async_context(tap_guest(sock))
            n = mib << 20
            return {
                what: await run_in(ns, script, host, port, what, count)
                for what, count in (("down", n), ("up", n), ("rate", conns))
            }
    raise AssertionError("unreachable")


def print_table(title: str, ours: dict[str, float], other: dict[str, float], name: str) -> None:
    print(f"{title:22}{'capsa':>12}{name:>12}{'ratio':>8}")
    for key, unit in (("down", "MB/s"), ("up", "MB/s"), ("rate", "conn/s")):
        print(
            f"{key + ' (' + unit + ')':22}{ours[key]:12.1f}{other[key]:12.1f}"
            f"{ours[key] / other[key]:8.2f}"
        )


def tap_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    missing = [tool for tool in ("ip", "passt") if shutil.which(tool) is None]
    return f"needs {', '.join(missing)}" if missing else None


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--conns", type=int, default=200)
    parser.add_argument("--no-tap", action="store_true", help="skip the tap/passt part")
    args = parser.parse_args()
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ours_mode = capsa.NetworkMode.user_nat().host_alias("203.0.113.1", "127.0.0.1").build()
    ours = await measure(ours_mode, "203.0.113.1", port, args.mib, args.conns)
    slirp = await measure(capsa.NetworkMode.NAT, "10.0.2.2", port, args.mib, args.conns)
    print_table("guest (TCG sandbox)", ours, slirp, "qemu user")
    print(f"stack memory per idle connection: {ours.get('idle_kib_per_conn', 0):.1f} KiB")
    skip = "--no-tap given" if args.no_tap else tap_skip_reason()
    if skip is None:
        tap_ours = await tap_measure("capsa", port, args.mib * 4, args.conns * 5)
        tap_passt = await tap_measure("passt", port, args.mib * 4, args.conns * 5)
        print_table("netns + tap (kernel)", tap_ours, tap_passt, "passt")
    else:
        print(f"netns + tap vs passt: skipped ({skip})")
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
