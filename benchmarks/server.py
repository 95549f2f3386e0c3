"""``capsa serve`` against the in-process API, in the same run.

1. exec round trip (``true``) p50/p99: in process, through the server's Unix socket, and
   through TCP with a token (target: server <= 1.5 x in-process + 1 ms);
2. ``--clients`` concurrent clients each running one exec on one shared sandbox.

    python benchmarks/server.py [--runs 50] [--clients 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import httpx

import capsa
from capsa.backends.qemu.accel import SlowAccelWarning

warnings.simplefilter("ignore", SlowAccelWarning)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def line(name: str, times: list[float], baseline: list[float] | None = None) -> None:
    p50, p99 = statistics.median(times), percentile(times, 0.99)
    extra = ""
    if baseline:
        base = statistics.median(baseline)
        extra = f"  ratio {p50 / base:.2f}  bound {1.5 * base * 1000 + 1:.1f} ms"
    print(f"{name:34} p50 {p50 * 1000:8.1f} ms  p99 {p99 * 1000:8.1f} ms{extra}")


def start(runtime: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "capsa.cli", "serve", *args],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    return proc, proc.stderr.readline()


async def exec_once(client: httpx.AsyncClient, name: str) -> float:
    begin = time.perf_counter()
    response = await client.post(f"/sandboxes/{name}/exec", json={"cmd": "true"})
    assert response.status_code == 200 and '"exit_code": 0' in response.text
    return time.perf_counter() - begin


async def through(client: httpx.AsyncClient, runs: int) -> list[float]:
    assert (await client.post("/sandboxes", json={"name": "bench"})).status_code == 201
    await exec_once(client, "bench")
    return [await exec_once(client, "bench") for _ in range(runs)]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--clients", type=int, default=50)
    args = parser.parse_args()
    async with await capsa.sandbox().build() as sb:
        agent = await sb.agent()
        await agent.exec("true")
        local = []
        for _ in range(args.runs):
            begin = time.perf_counter()
            await agent.exec("true")
            local.append(time.perf_counter() - begin)
    line("in process", local)
    with tempfile.TemporaryDirectory(prefix="capsa-bench-") as runtime:
        proc, said = start(Path(runtime))
        sock = said.rsplit(" ", 1)[1].strip()
        try:
            transport = httpx.AsyncHTTPTransport(uds=sock)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://capsa", timeout=300
            ) as client:
                line("server, Unix socket", await through(client, args.runs), local)

                async def one_client() -> float:
                    async with httpx.AsyncClient(
                        transport=httpx.AsyncHTTPTransport(uds=sock),
                        base_url="http://capsa",
                        timeout=300,
                    ) as own:
                        return await exec_once(own, "bench")

                begin = time.perf_counter()
                each = await asyncio.gather(*(one_client() for _ in range(args.clients)))
                total = time.perf_counter() - begin
                line(f"{args.clients} clients at once, each", list(each))
                print(f"{args.clients} clients at once, total {total:.2f} s, all succeeded")
        finally:
            proc.terminate()
            proc.wait(60)
        proc, said = start(Path(runtime), "--port", "0")
        url, token = said.split()[3], said.split("Bearer ")[1].rstrip(")\n")
        try:
            headers = {"Authorization": f"Bearer {token}"}
            async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:
                line("server, TCP + token", await through(client, args.runs), local)
        finally:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    asyncio.run(main())
