"""Code contexts and the default image, each figure against a baseline in the same run.

1. ``ctx.run("1+1")`` round trip, p50/p99 over ``--runs``, against ``agent.exec("true")``
   in the same sandbox (target ratio <= 1.0: a live interpreter beats a new process);
2. ``build()`` to the first exec result of the default Debian image against the minimal
   busybox one, templates present (target ratio <= 1.2);
3. with ``--build``: the Debian image built from nothing (a private cache), in seconds.

    python benchmarks/code.py [--runs 50] [--boots 10] [--build]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import warnings

import capsa
from capsa.backends.qemu.accel import SlowAccelWarning

warnings.simplefilter("ignore", SlowAccelWarning)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def line(name: str, times: list[float], baseline: list[float] | None = None) -> None:
    p50, p99 = statistics.median(times), percentile(times, 0.99)
    ratio = f"  ratio {p50 / statistics.median(baseline):.3f}" if baseline else ""
    print(f"{name:40} p50 {p50 * 1000:8.1f} ms  p99 {p99 * 1000:8.1f} ms{ratio}")


async def round_trips(runs: int) -> None:
    async with await capsa.sandbox().image("debian").build() as sb:
        agent = await sb.agent()
        async with await sb.code_context() as ctx:
            await ctx.run("1+1")
            await agent.exec("true")
            execs, cells = [], []
            for _ in range(runs):
                start = time.perf_counter()
                await agent.exec("true")
                execs.append(time.perf_counter() - start)
                start = time.perf_counter()
                run = await ctx.run("1+1")
                cells.append(time.perf_counter() - start)
                assert run.text == "2"
    line('agent.exec("true")', execs)
    line('ctx.run("1+1")', cells, execs)


async def first_exec(image: str) -> float:
    start = time.perf_counter()
    async with await capsa.sandbox().image(image).build() as sb:
        result = await (await sb.agent()).exec("true")
        assert result.exit_code == 0
        return time.perf_counter() - start


async def boots(n: int) -> None:
    times: dict[str, list[float]] = {"minimal": [], "debian": []}
    for image in times:
        await first_exec(image)  # its template exists from here on
    for _ in range(n):
        for image, kept in times.items():
            kept.append(await first_exec(image))
    line("minimal image: build() to first exec", times["minimal"])
    line("debian image: build() to first exec", times["debian"], times["minimal"])


def build_from_nothing() -> None:
    from capsa.images.debian import debian_image

    with tempfile.TemporaryDirectory(prefix="capsa-bench-cache-") as cache:
        os.environ["XDG_CACHE_HOME"] = cache
        start = time.perf_counter()
        image = debian_image()
        seconds = time.perf_counter() - start
        size = image.path.stat().st_size >> 20
        print(f"Debian image built from nothing: {seconds:.1f} s ({size} MiB)")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--boots", type=int, default=10)
    parser.add_argument("--build", action="store_true")
    args = parser.parse_args()
    await round_trips(args.runs)
    await boots(args.boots)
    if args.build:
        build_from_nothing()


if __name__ == "__main__":
    asyncio.run(main())
