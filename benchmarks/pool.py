"""Pool and snapshot figures, each against a baseline measured in the same run.

(Cold starts here are ``template(False)``; ``benchmarks/templates.py`` measures the
default path, a sandbox made from its template.)

1. start: cold ``sandbox().build()`` to the first ``exec`` result vs ``capsa.restore()`` of
   a snapshot of the same sandbox to the first ``exec`` result (target ratio <= 0.15);
2. ``reserve()`` latency p50/p99 from a warm pool (target p99 <= 5 ms);
3. memory: PSS of one cold sandbox's QEMU vs the PSS each further clone of one snapshot
   adds (target <= 0.2), and from that how many idle clones of a 256 MB sandbox fit in
   this machine's available memory (checked by starting ``--clones`` of them).

    python benchmarks/pool.py [--runs 5] [--clones 8]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import capsa
from capsa.backends.qemu.accel import SlowAccelWarning

warnings.simplefilter("ignore", SlowAccelWarning)
MEMORY_MB = 256


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


async def first_exec(sb: capsa.Sandbox) -> None:
    result = await (await sb.agent()).exec("true")
    assert result.exit_code == 0


async def cold_start() -> float:
    start = time.perf_counter()
    async with await capsa.sandbox().memory_mb(MEMORY_MB).template(False).build() as sb:
        await first_exec(sb)
        return time.perf_counter() - start


async def restore_start(snapshot: Path) -> float:
    start = time.perf_counter()
    sb = await capsa.restore(snapshot)
    assert isinstance(sb, capsa.Sandbox)
    async with sb:
        await first_exec(sb)
        return time.perf_counter() - start


async def reserve_latencies(runs: int) -> list[float]:
    latencies = []
    async with await capsa.sandbox().memory_mb(MEMORY_MB).pool(3) as pool:
        for _ in range(runs):
            while await pool.available_count() < 3:
                await asyncio.sleep(0.05)
            start = time.perf_counter()
            member = await pool.reserve()
            latencies.append(time.perf_counter() - start)
            await member.release()
    return latencies


async def memory(snapshot: Path, clones: int) -> tuple[int, float, int]:
    """(cold PSS KiB, PSS KiB each further clone adds, clones started).

    PSS splits every shared page between the processes mapping it, so the sum over all
    clones counts the snapshot's pages once: what one more clone adds is the growth of
    that sum beyond a single clone, divided by the number of further clones."""
    async with await capsa.sandbox().memory_mb(MEMORY_MB).template(False).build() as sb:
        await first_exec(sb)
        await asyncio.sleep(2)
        cold = pss_kib(sb.vm.pid)
    started: list[capsa.Sandbox] = []
    try:
        for i in range(max(2, clones)):
            sb = await capsa.restore(snapshot)
            assert isinstance(sb, capsa.Sandbox)
            started.append(sb)
            await first_exec(sb)
            if i == 0:
                await asyncio.sleep(2)
                alone = pss_kib(sb.vm.pid)
        await asyncio.sleep(2)
        total = sum(pss_kib(sb.vm.pid) for sb in started)
    finally:
        await asyncio.gather(*(sb.kill() for sb in started))
    return cold, (total - alone) / (len(started) - 1), len(started)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--clones", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="capsa-bench-snap-", dir="/dev/shm") as tmp:
        async with await capsa.sandbox().memory_mb(MEMORY_MB).template(False).build() as source:
            await first_exec(source)
            snap = await source.snapshot(Path(tmp) / "snap")
        colds, restores = [], []
        for _ in range(args.runs):
            colds.append(await cold_start())
            restores.append(await restore_start(snap.path))
        latencies = await reserve_latencies(args.runs * 10)
        cold_pss, clone_pss, started = await memory(snap.path, args.clones)
    cold, restore = statistics.median(colds), statistics.median(restores)
    print(f"snapshot pause: {snap.seconds * 1000:.0f} ms")
    print(f"cold start to first exec      {cold:8.3f} s (median of {args.runs})")
    print(
        f"restore to first exec         {restore:8.3f} s   ratio {restore / cold:.3f} "
        "(target <= 0.15)"
    )
    ordered = sorted(latencies)
    p50 = ordered[len(ordered) // 2] * 1000
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000
    print(f"reserve() from a warm pool    p50 {p50:.3f} ms  p99 {p99:.3f} ms (target p99 <= 5)")
    print(f"PSS cold sandbox              {cold_pss / 1024:8.1f} MiB")
    print(
        f"PSS added per clone           {clone_pss / 1024:8.1f} MiB   ratio "
        f"{clone_pss / cold_pss:.3f} (target <= 0.2)"
    )
    fit = int(available_kib() / clone_pss)
    print(
        f"idle {MEMORY_MB} MB clones that fit in {available_kib() // 1024} MiB available: "
        f"~{fit} ({started} started and measured)"
    )


if __name__ == "__main__":
    asyncio.run(main())
