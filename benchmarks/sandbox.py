"""Sandbox figures, each against a baseline measured in the same run.

1. boot: ``sandbox().build()`` to the first ``exec`` result vs the bare QEMU command line
   booting the same kernel to the first line of a one-line init (target ratio <= 1.5);
2. ``exec("true")`` latency p50/p99 vs the agent's ``ping`` (the channel alone);
3. file throughput host->guest and guest->host through the agent vs raw virtio-serial
   (``dd`` on a second port of the same VM; host->guest both to /dev/null and into a file
   in the guest, which is what ``write_file`` does);
4. vsock round-trip latency vs a virtio-serial round trip through the agent (``ping``).

    python benchmarks/sandbox.py [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from common import bare_qemu_boot

import capsa
from capsa.backends.qemu.accel import SlowAccelWarning, choose_accel
from capsa.images.cpio import CpioWriter
from capsa.images.kernel import default_kernel
from capsa.images.sandbox import sandbox_image
from capsa.images.shell import find_static_busybox

warnings.simplefilter("ignore", SlowAccelWarning)
FIRST_LINE = "INIT-FIRST-LINE"
BENCH_PORT = "org.capsa.bench.0"
PYTHON = "/usr/lib/capsa/python/bin/python3"
MB = 1 << 20


def one_line_initramfs(out: Path) -> Path:
    with open(out, "wb") as f:
        w = CpioWriter(f)
        for d in ("bin", "dev"):
            w.directory(d)
        w.char_device("dev/console", 5, 1)
        w.file_from("bin/busybox", find_static_busybox(), mode=0o755)
        w.file_bytes("init", f"#!/bin/busybox sh\n/bin/busybox echo {FIRST_LINE}\n".encode(), 0o755)
        w.close()
    return out


async def sandbox_boot() -> float:
    start = time.perf_counter()
    async with await capsa.sandbox().build() as sb:
        agent = await sb.agent()
        result = await agent.exec("true")
        elapsed = time.perf_counter() - start
        assert result.exit_code == 0
    return elapsed


def ms(samples: list[float]) -> str:
    return f"p50 {pct(samples, 0.5) * 1e3:.2f} ms  p99 {pct(samples, 0.99) * 1e3:.2f} ms"


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def latencies(agent: capsa.AgentClient, n: int) -> tuple[list[float], list[float]]:
    execs, pings = [], []
    for _ in range(n):
        t = time.perf_counter()
        await agent.exec("true")
        execs.append(time.perf_counter() - t)
        t = time.perf_counter()
        await agent.ping()
        pings.append(time.perf_counter() - t)
    return execs, pings


async def raw_port_throughput(
    sb: capsa.Sandbox, agent: capsa.AgentClient, size: int
) -> tuple[float, float, float]:
    """MB/s over a bare virtio-serial port: guest dd -> host socket, host socket -> guest dd
    to /dev/null, and host socket -> guest dd into a file in the guest's /tmp (the same
    work as ``write_file``: every byte lands in a file)."""
    find_port = (
        "for p in /sys/class/virtio-ports/*; do "
        f'[ "$(cat $p/name)" = {BENCH_PORT} ] && basename $p; done'
    )
    node = (await agent.exec(find_port)).stdout.decode().strip()
    sock = sb.vm.backend_vm.serial_port_socket(BENCH_PORT)
    loop = asyncio.get_running_loop()
    count = size // 65536

    start = time.perf_counter()
    writer = asyncio.ensure_future(
        agent.exec(f"dd if=/dev/zero of=/dev/{node} bs=64k count={count}")
    )
    got = 0
    while got < size:
        got += len(await loop.sock_recv(sock, 1 << 20))
    to_host = size / (time.perf_counter() - start) / MB
    await writer

    async def to_guest(target: str) -> float:
        reader = asyncio.ensure_future(
            agent.exec(f"dd if=/dev/{node} of={target} bs=64k count={count} iflag=fullblock")
        )
        await asyncio.sleep(0.2)
        start = time.perf_counter()
        chunk = b"\0" * (1 << 20)
        for _ in range(size // len(chunk)):
            await loop.sock_sendall(sock, chunk)
        result = await reader
        if result.exit_code != 0:
            raise RuntimeError(result.stderr.decode())
        return size / (time.perf_counter() - start) / MB

    to_null = statistics.median([await to_guest("/dev/null") for _ in range(3)])
    into_file = []
    for _ in range(3):
        into_file.append(await to_guest("/tmp/raw.bin"))
        await agent.exec("rm /tmp/raw.bin")
    return to_host, to_null, statistics.median(into_file)


async def agent_throughput(agent: capsa.AgentClient, size: int) -> tuple[float, float]:
    """MB/s of ``read_file`` and ``write_file`` (the median of three each)."""
    data = os.urandom(size)
    ins, outs = [], []
    for _ in range(3):
        start = time.perf_counter()
        await agent.write_file("/tmp/bench.bin", data)
        ins.append(size / (time.perf_counter() - start) / MB)
        start = time.perf_counter()
        back = await agent.read_file("/tmp/bench.bin")
        outs.append(size / (time.perf_counter() - start) / MB)
        assert back == data
        await agent.remove("/tmp/bench.bin")
    return statistics.median(outs), statistics.median(ins)


VSOCK_ECHO = r"""
import socket
s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
s.connect((2, 1234))
while d := s.recv(4096):
    s.sendall(d)
"""


async def vsock_rtt(sb: capsa.Sandbox, agent: capsa.AgentClient, n: int) -> list[float]:
    await agent.write_file("/tmp/echo.py", VSOCK_ECHO.encode())
    proc = await agent.start([PYTHON, "-I", "/tmp/echo.py"])
    vs = sb.vsock_socket(1234)
    # Listen mode: the host client waits for the guest's connection.
    assert vs is not None
    reader, writer = await vs.connect()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        writer.write(b"x")
        await writer.drain()
        await reader.readexactly(1)
        samples.append(time.perf_counter() - t)
    writer.close()
    await proc.wait(30)
    return samples


async def steady_state(size: int, n: int) -> None:
    # The minimal image: its commands are not chrooted into a container (the Debian
    # image's are; see the exec line below), and the vsock echo runs capsa's own Python.
    builder = capsa.sandbox().image("minimal").memory_mb(1024)
    builder = builder.vsock_listen(1234).serial_port(BENCH_PORT)
    async with builder.build() as sb:
        agent = await sb.agent()
        execs, pings = await latencies(agent, n)
        print(f"exec('true'): {ms(execs)}   | agent ping: {ms(pings)}")
        raw_out, raw_in, raw_file = await raw_port_throughput(sb, agent, size)
        ag_out, ag_in = await agent_throughput(agent, size)
        print(
            f"guest->host: read_file {ag_out:.0f} MB/s vs raw virtio-serial {raw_out:.0f} MB/s"
            f"  ratio {ag_out / raw_out:.2f} (target >= 0.9)"
        )
        print(
            f"host->guest: write_file {ag_in:.0f} MB/s vs raw virtio-serial to /dev/null"
            f" {raw_in:.0f} MB/s  ratio {ag_in / raw_in:.2f} (target >= 0.8)"
        )
        print(
            f"             vs raw virtio-serial into a guest file {raw_file:.0f} MB/s"
            f"  ratio {ag_in / raw_file:.2f} (the same work: every byte in a file)"
        )
        rtts = await vsock_rtt(sb, agent, n)
        print(f"vsock round trip: {ms(rtts)}   | agent ping (virtio-serial): {ms(pings)}")
    async with capsa.sandbox().image("debian").build() as sb:
        execs, pings = await latencies(await sb.agent(), n)
        print(f"Debian image: exec('true'): {ms(execs)}   | agent ping: {ms(pings)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args()
    if min(args.runs, args.size_mb, args.samples) < 1:
        parser.error("--runs, --size-mb and --samples must be at least 1")
    kernel = default_kernel()
    sandbox_image(kernel)  # build outside the timed region
    print(f"accel={choose_accel().accel.value}")
    with tempfile.TemporaryDirectory() as tmp:
        initrd = one_line_initramfs(Path(tmp) / "oneline.cpio")
        bare_qemu_boot(kernel.path, initrd, FIRST_LINE)
        bare, ours = [], []
        for _ in range(args.runs):
            bare.append(bare_qemu_boot(kernel.path, initrd, FIRST_LINE))
            ours.append(asyncio.run(sandbox_boot()))
    med_bare, med_ours = statistics.median(bare), statistics.median(ours)
    print(f"boot: bare qemu to init's first line: min {min(bare):.3f}s median {med_bare:.3f}s")
    print(f"      sandbox build() to first exec:  min {min(ours):.3f}s median {med_ours:.3f}s")
    print(
        f"boot ratio: min {min(ours) / min(bare):.2f}  median {med_ours / med_bare:.2f}"
        "  (target <= 1.5)"
    )
    asyncio.run(steady_state(args.size_mb * MB, args.samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
