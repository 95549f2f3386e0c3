"""What the benchmarks share: the bare QEMU command line they measure capsa against."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from capsa.backends.qemu.accel import choose_accel, host_tsc_khz
from capsa.backends.qemu.backend import find_qemu


def bare_qemu_boot(kernel: Path, initrd: Path, marker: str) -> float:
    """Seconds from spawning a hand-written QEMU command line to ``marker`` on its serial."""
    accel = choose_accel().accel.value
    append = "console=ttyS0 reboot=t panic=-1 quiet cryptomgr.notests 8250.nr_uarts=1"
    if accel == "tcg":
        append += f" tsc_early_khz={host_tsc_khz()}"
    argv = [find_qemu(), "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]
    argv += ["-accel", accel, "-m", "512M", "-machine", "microvm,acpi=on"]
    argv += ["-global", "virtio-mmio.force-legacy=false", "-serial", "stdio"]
    argv += ["-kernel", str(kernel), "-initrd", str(initrd), "-append", append]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    seen = b""
    try:
        while marker.encode() not in seen:
            chunk = proc.stdout.read1(65536)
            if not chunk:
                raise RuntimeError("bare QEMU exited before the marker")
            seen = seen[-4096:] + chunk
        return time.perf_counter() - start
    finally:
        proc.kill()
        proc.wait()
