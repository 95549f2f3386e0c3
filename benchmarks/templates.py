"""Sandboxes made from templates, each figure against a baseline measured in the same run.

1. ``capsa.sandbox().build()`` to the first ``exec`` result with the template present:
   p50/p99 over ``--runs``, and the ratio of the p50 to a cold boot of the same sandbox
   (``template(False)``; target p50 <= 0.35 s, p99 <= 0.8 s, ratio <= 0.12). The same with
   a ``user_nat`` network and a share (on a QEMU that cannot migrate the share, that
   sandbox boots cold, and the figure says so);
2. ``capsa exec -- true``, the whole process, Python start-up included (target p50 <= 0.8 s);
3. ``--concurrent`` sandboxes built at once: all must succeed; p50/p99 per sandbox, total;
4. PSS each further sandbox made from the template adds, against a cold sandbox's PSS
   (target <= 0.2).

    python benchmarks/templates.py [--runs 30] [--cold 5] [--concurrent 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import capsa
from capsa.backends.qemu.accel import SlowAccelWarning

warnings.simplefilter("ignore", SlowAccelWarning)


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


async def to_first_exec(builder: capsa.SandboxBuilder) -> tuple[float, bool]:
    """Seconds from build() to the first exec result, and whether a template was used."""
    start = time.perf_counter()
    async with await builder.build() as sb:
        result = await (await sb.agent()).exec("true")
        elapsed = time.perf_counter() - start
        assert result.exit_code == 0
        return elapsed, sb.template is not None


async def series(make: object, runs: int) -> tuple[list[float], int]:
    assert callable(make)
    times, templated = [], 0
    for _ in range(runs):
        elapsed, used = await to_first_exec(make())
        times.append(elapsed)
        templated += used
    return times, templated


def cli_exec(runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "capsa.cli", "exec", "--", "true"], check=True)
        times.append(time.perf_counter() - start)
    return times


async def concurrent(n: int) -> tuple[list[float], float]:
    async def one() -> float:
        return (await to_first_exec(capsa.sandbox()))[0]

    start = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    total = time.perf_counter() - start
    failures = [r for r in results if not isinstance(r, float)]
    if failures:
        raise RuntimeError(f"{len(failures)} of {n} concurrent sandboxes failed: {failures[0]}")
    return [r for r in results if isinstance(r, float)], total


async def memory(clones: int) -> tuple[int, float]:
    """(cold sandbox PSS KiB, PSS KiB each further sandbox from the template adds)."""
    async with await capsa.sandbox().template(False).build() as cold:
        await (await cold.agent()).exec("true")
        await asyncio.sleep(2)
        cold_pss = pss_kib(cold.vm.pid)
    started: list[capsa.Sandbox] = []
    try:
        for _ in range(clones):
            sb = await capsa.sandbox().build()
            started.append(sb)
            await (await sb.agent()).exec("true")
        await asyncio.sleep(2)
        pss = [pss_kib(sb.vm.pid) for sb in started]
    finally:
        await asyncio.gather(*(sb.kill() for sb in started))
    return cold_pss, (sum(pss) - pss[0]) / (len(pss) - 1)


def report(name: str, times: list[float], baseline: float | None, used: int) -> None:
    p50, p99 = statistics.median(times), percentile(times, 0.99)
    ratio = f"  ratio to cold {p50 / baseline:.3f}" if baseline else ""
    print(
        f"{name:34} p50 {p50:6.3f} s  p99 {p99:6.3f} s{ratio}  "
        f"({used} of {len(times)} from a template)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--cold", type=int, default=5)
    parser.add_argument("--concurrent", type=int, default=20)
    parser.add_argument("--clones", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="capsa-bench-share-") as share:
        variants = {
            "plain": lambda: capsa.sandbox(),
            "user_nat + share": lambda: (
                capsa.sandbox()
                .network(capsa.NetworkMode.user_nat())
                .share(share, "/mnt/share", capsa.MountMode.READ_WRITE)
            ),
        }
        for name, make in variants.items():
            await to_first_exec(make())  # the template exists from here on
            colds, _ = await series(lambda m=make: m().template(False), args.cold)
            times, used = await series(make, args.runs)
            cold = statistics.median(colds)
            print(f"{name}: cold boot to first exec p50 {cold:.3f} s")
            report(f"{name}: build() to first exec", times, cold, used)
    times = cli_exec(max(5, args.runs // 3))
    report("capsa exec -- true (whole process)", times, None, len(times))
    each, total = await concurrent(args.concurrent)
    report(f"{args.concurrent} concurrent, per sandbox", each, None, len(each))
    print(f"{args.concurrent} concurrent, all done in {total:.2f} s")
    cold_pss, added = await memory(args.clones)
    print(
        f"PSS cold sandbox {cold_pss / 1024:.1f} MiB; each further sandbox from the template "
        f"adds {added / 1024:.1f} MiB: ratio {added / cold_pss:.3f} (target <= 0.2)"
    )


if __name__ == "__main__":
    asyncio.run(main())
