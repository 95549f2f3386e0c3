"""capsa on Ray against capsa in process, in the same run, on a Ray cluster on this machine.

1. exec round trip (``true``) p50/p99: a local sandbox, then a cluster sandbox through its
   handle (driver -> node service -> agent); the overhead in ms is the difference of p50s;
2. create throughput: ``--count`` sandboxes started at once (at most ``--concurrency`` in
   flight) with one node running sandboxes, then with two; the scaling ratio is
   two-node / one-node sandboxes per second (both nodes share this machine's cores, so it
   shows where placement stops helping, not what two machines would do).

    python benchmarks/cluster.py [--runs 50] [--count 8] [--concurrency 1,2,4,8]

(Not ``benchmarks/ray.py``: run as a script, that name would be imported as Ray itself.)
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every address on loopback

import argparse
import asyncio
import statistics
import time
import warnings
from typing import Any

import ray
from ray.cluster_utils import Cluster

import capsa
import capsa.ray
from capsa.backends.qemu.accel import SlowAccelWarning

warnings.simplefilter("ignore", SlowAccelWarning)
LOOPBACK = "127.0.0.1"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def line(name: str, times: list[float]) -> float:
    p50 = statistics.median(times)
    print(f"{name:34} p50 {p50 * 1000:8.2f} ms  p99 {percentile(times, 0.99) * 1000:8.2f} ms")
    return p50


async def timed_execs(agent: Any, runs: int) -> list[float]:
    await agent.exec("true")
    times = []
    for _ in range(runs):
        begin = time.perf_counter()
        result = await agent.exec("true")
        times.append(time.perf_counter() - begin)
        assert result.exit_code == 0
    return times


async def create_rate(cluster: capsa.ray.Cluster, count: int, concurrency: int) -> float:
    """Sandboxes per second, ``count`` started with ``concurrency`` in flight."""
    gate = asyncio.Semaphore(concurrency)

    async def one() -> capsa.ray.ClusterSandbox:
        async with gate:
            return await cluster.sandbox().build()

    begin = time.perf_counter()
    made = await asyncio.gather(*(one() for _ in range(count)))
    elapsed = time.perf_counter() - begin
    await asyncio.gather(*(sb.kill() for sb in made))
    return count / elapsed


async def rates(cluster: capsa.ray.Cluster, count: int, levels: list[int]) -> dict[int, float]:
    await create_rate(cluster, len(await cluster.nodes()), 2)  # templates made on each node
    return {c: await create_rate(cluster, count, c) for c in levels}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--concurrency", default="1,2,4,8")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    local_ray = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "node_ip_address": LOOPBACK, "include_dashboard": False},
    )
    try:
        local_ray.add_node(num_cpus=1, resources={"capsa": 1}, node_ip_address=LOOPBACK)
        ray.init(address=local_ray.address, _node_ip_address=LOOPBACK, log_to_driver=False)
        local_ray.wait_for_nodes()

        async with await capsa.sandbox().build() as sb:
            local = line("exec, local sandbox", await timed_execs(await sb.agent(), args.runs))
        cluster = await capsa.ray.connect(resource="capsa")
        async with await cluster.sandbox().build() as csb:
            remote = line("exec, cluster handle", await timed_execs(await csb.agent(), args.runs))
        print(f"cluster overhead per exec: {(remote - local) * 1000:.2f} ms")

        one_node = await rates(cluster, args.count, levels)
        local_ray.add_node(num_cpus=1, resources={"capsa": 1}, node_ip_address=LOOPBACK)
        local_ray.wait_for_nodes()
        two_nodes = await rates(cluster, args.count, levels)
        print(f"create throughput, {args.count} sandboxes (sandboxes/s):")
        for c in levels:
            ratio = two_nodes[c] / one_node[c]
            print(
                f"  {c:2} in flight: 1 node {one_node[c]:6.2f}  2 nodes {two_nodes[c]:6.2f}"
                f"  scaling {ratio:.2f}"
            )
        await cluster.close()
    finally:
        ray.shutdown()
        local_ray.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
