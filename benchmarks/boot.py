"""Boot latency: capsa's ``build()`` to a console marker vs the bare QEMU command line.

Both boot the same kernel and the same busybox initramfs to the same marker, alternating
A/B in one run so machine noise hits both alike. Prints min/median and the ratio.

    python benchmarks/boot.py [--runs 7]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from common import bare_qemu_boot

import capsa
from capsa.backends.qemu.accel import SlowAccelWarning, choose_accel
from capsa.images.kernel import default_kernel
from capsa.images.shell import MARKER, shell_initramfs

warnings.simplefilter("ignore", SlowAccelWarning)


async def capsa_boot(kernel: Path, initrd: Path) -> float:
    start = time.perf_counter()
    vm = await capsa.vm(capsa.LinuxDirectBoot(kernel, initrd)).console_enabled().build()
    try:
        console = await vm.console()
        await console.wait_for(MARKER, timeout=60)
        return time.perf_counter() - start
    finally:
        await vm.kill()


def summary(name: str, samples: list[float]) -> str:
    return f"{name:>10}: min {min(samples):.3f}s  median {statistics.median(samples):.3f}s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    kernel = default_kernel()
    with tempfile.TemporaryDirectory() as tmp:
        initrd = shell_initramfs(kernel, Path(tmp) / "shell.cpio")
        bare_qemu_boot(kernel.path, initrd, MARKER)  # warm the page cache for both sides
        bare: list[float] = []
        ours: list[float] = []
        for _ in range(args.runs):
            bare.append(bare_qemu_boot(kernel.path, initrd, MARKER))
            ours.append(asyncio.run(capsa_boot(kernel.path, initrd)))
    print(f"boot to console marker, {args.runs} runs each, accel={choose_accel().accel.value}")
    print(summary("bare qemu", bare))
    print(summary("capsa", ours))
    print(
        f"ratio capsa/bare: min {min(ours) / min(bare):.3f}  "
        f"median {statistics.median(ours) / statistics.median(bare):.3f}  (target <= 1.10)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
