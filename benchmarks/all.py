"""Every data-path figure in one command: the agent's file transfer and exec latency
(``sandbox.py``), shared folders against QEMU's C virtiofsd (``shares.py``) and the
network against QEMU's user networking and passt (``network.py``). Each part measures its
baseline in the same run, as it does alone; this prints their lines under one heading
each, in the order of the data-path table.

    python benchmarks/all.py [--quick]

``--quick`` makes every part smaller (fewer samples, smaller files): for a first look,
not for figures.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

PARTS: list[tuple[str, str, list[str], list[str]]] = [
    # title, script, arguments, quick arguments
    (
        "files and exec: agent vs raw virtio-serial, exec vs ping",
        "sandbox.py",
        [],
        ["--runs", "1", "--size-mb", "16", "--samples", "60"],
    ),
    (
        "shared folders: ours vs C virtiofsd",
        "shares.py",
        [],
        ["--mib", "64", "--files", "1000"],
    ),
    ("network: ours vs QEMU user net, and vs passt", "network.py", [], ["--mib", "16"]),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    failed = 0
    for title, script, full, quick in PARTS:
        print(f"== {title} ({script})", flush=True)
        begin = time.monotonic()
        argv = [sys.executable, str(HERE / script), *(quick if args.quick else full)]
        code = subprocess.run(argv, check=False).returncode
        print(f"== {script}: {time.monotonic() - begin:.0f} s, exit {code}\n", flush=True)
        failed += code != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
