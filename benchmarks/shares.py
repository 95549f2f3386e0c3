"""Shared-folder benchmark: capsa's virtio-fs server against QEMU's C virtiofsd.

    python benchmarks/shares.py [--mib 256] [--files 5000]

Same run, same guest, same host folder: one sandbox mounts the folder twice, once served
by capsa (``/mnt/ours``) and once by ``/usr/lib/qemu/virtiofsd`` (``/mnt/c``). Each
workload runs on both mounts with the guest's caches dropped first: sequential write and
read of a ``--mib`` MiB file, creating, stat-ing and reading back ``--files`` small
files, and ``ls -lR`` of a source tree (a copy of the host's Python stdlib). Prints MB/s
or seconds for each and the ratio ours/C (> 1: we are faster).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import capsa
import capsa.devices.launch as launch
from capsa.config import SharedDir

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
PY = "/usr/lib/capsa/python/bin/python3 -I"
DROP = "sync; echo 3 > /proc/sys/vm/drop_caches"
SMALL = r"""
import os, sys, time
root, n = sys.argv[1], int(sys.argv[2])
def drop():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f: f.write("3")
os.makedirs(root)
t0 = time.perf_counter()
for i in range(n):
    with open(f"{root}/f{i}", "w") as f: f.write("x" * 100)
t1 = time.perf_counter(); drop(); t1b = time.perf_counter()
for i in range(n): os.stat(f"{root}/f{i}")
t2 = time.perf_counter(); drop(); t2b = time.perf_counter()
for i in range(n):
    with open(f"{root}/f{i}") as f: f.read()
t3 = time.perf_counter()
print(t1 - t0, t2 - t1b, t3 - t2b)
"""


class Virtiofsd:
    """QEMU's C server in the place of ours, for one share."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def serve_tag_c_with_virtiofsd() -> None:
    ours = launch.start_virtio_fs_device

    async def start(vhost: Path, share: SharedDir, identity: object = None) -> object:
        if share.tag != "c":
            return await ours(vhost, share, identity)  # type: ignore[arg-type]
        proc = await asyncio.create_subprocess_exec(
            VIRTIOFSD,
            f"--socket-path={vhost}",
            "-o",
            f"source={share.host_path}",
            "-o",
            "cache=auto",
            "-o",
            "sandbox=chroot",
            "-o",
            "log_level=err",
            stdin=asyncio.subprocess.DEVNULL,
        )
        for _ in range(200):
            if vhost.exists():
                return Virtiofsd(proc)
            await asyncio.sleep(0.02)
        raise RuntimeError("virtiofsd did not create its socket")

    launch.start_virtio_fs_device = start  # type: ignore[assignment]


async def timed(run: Callable[[], Awaitable[capsa.ExecResult]]) -> float:
    start = time.perf_counter()
    result = await run()
    if result.exit_code != 0:
        raise RuntimeError(result.stderr.decode())
    return time.perf_counter() - start


async def workloads(agent: capsa.AgentClient, mount: str, mib: int, files: int) -> dict[str, float]:
    async def sh(cmd: str) -> capsa.ExecResult:
        return await agent.exec(cmd, timeout=1800)

    out: dict[str, float] = {}
    work = f"{mount}/work-{Path(mount).name}"
    await sh(f"mkdir -p {work} && {DROP}")
    write = await timed(lambda: sh(f"dd if=/dev/zero of={work}/big bs=1M count={mib} conv=fsync"))
    out["seq write (MB/s)"] = mib * 1.048576 / write
    await sh(DROP)
    read = await timed(lambda: sh(f"dd if={work}/big of=/dev/null bs=1M"))
    out["seq read (MB/s)"] = mib * 1.048576 / read
    r = await sh(f"{PY} /tmp/small.py {work}/small {files}")
    create, stat, readback = map(float, r.stdout.split())
    out[f"create {files} (s)"], out[f"stat {files} (s)"] = create, stat
    out[f"read {files} (s)"] = readback
    await sh(DROP)
    out["ls -lR tree (s)"] = await timed(lambda: sh(f"ls -lR {mount}/tree > /dev/null"))
    await sh(f"rm -rf {work}")
    return out


def stage_tree(dest: Path) -> int:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    ignore = shutil.ignore_patterns("site-packages", "__pycache__", "*.so")
    shutil.copytree(stdlib, dest, ignore=ignore, symlinks=True)
    return sum(1 for _ in dest.rglob("*"))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--files", type=int, default=5000)
    args = parser.parse_args()
    if not Path(VIRTIOFSD).exists():
        raise SystemExit(f"{VIRTIOFSD} is missing (Debian: qemu-system-common)")
    serve_tag_c_with_virtiofsd()
    with tempfile.TemporaryDirectory(prefix="capsa-bench-fs-", dir="/var/tmp") as tmp:
        folder = Path(tmp)
        entries = stage_tree(folder / "tree")
        builder = (
            capsa.sandbox()
            .image("minimal")  # mounts and tools of capsa's own userland, not a container's
            .memory_mb(1024)
            .share(folder, "/mnt/ours", capsa.MountMode.READ_WRITE, tag="ours")
            .share(folder, "/mnt/c", capsa.MountMode.READ_WRITE, tag="c")
        )
        async with await builder.build() as sb:
            agent = await sb.agent()
            await agent.write_file("/tmp/small.py", SMALL.encode())
            results = {}
            for mount in ("/mnt/c", "/mnt/ours"):
                results[mount] = await workloads(agent, mount, args.mib, args.files)
    print(f"tree for ls -lR: {entries} entries")
    print(f"{'':22}{'capsa':>10}{'virtiofsd':>11}{'ratio':>8}")
    for key, ours in results["/mnt/ours"].items():
        c = results["/mnt/c"][key]
        ratio = ours / c if "MB/s" in key else c / ours
        print(f"{key:22}{ours:10.2f}{c:11.2f}{ratio:8.2f}")
    print("ratio > 1: capsa is faster (throughput ours/C; times C/ours)")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
