"""OCI figures, each against a baseline measured in the same run.

1. pull and convert a ~100 MB image from a local registry into a bootable root file
   system vs ``skopeo copy`` of the same image to a local OCI directory, plus ``tar -x``
   of its layers and ``mke2fs -d`` of that tree;
2. cold sandbox start (to the first ``exec``) from the cached image vs the plain sandbox.

    python benchmarks/oci.py [--mib 100] [--runs 3]

Needs docker-registry and skopeo (``scripts/install.sh --dev``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import capsa
from capsa.backends.qemu.accel import SlowAccelWarning
from capsa.oci.store import Store
from tests.ocikit import Layer, busybox_layer, registry, write_layout

warnings.simplefilter("ignore", SlowAccelWarning)


def big_layers(mib: int) -> list[Layer]:
    """busybox plus ``mib`` MiB of incompressible files in three layers."""
    layers = [busybox_layer()]
    per_layer = max(1, mib // 3)
    for n in range(3):
        layer = Layer().dir(f"data{n}")
        for i in range(per_layer):
            layer.file(f"data{n}/f{i}", os.urandom(1 << 20))
        layers.append(layer)
    return layers


def baseline(reference: str, work: Path) -> float:
    """skopeo copy to an OCI dir, untar the layers, mke2fs -d the tree."""
    start = time.perf_counter()
    layout = work / "skopeo"
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            f"docker://{reference}",
            f"oci:{layout}:v1",
        ],
        check=True,
    )
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest).read_text())
    tree = work / "tree"
    tree.mkdir()
    for layer in manifest["layers"]:
        blob = layout / "blobs" / "sha256" / layer["digest"].split(":")[1]
        subprocess.run(["tar", "-xzf", str(blob), "-C", str(tree)], check=True)
    size = sum(f.stat().st_size for f in tree.rglob("*") if f.is_file()) >> 20
    image = str(work / "baseline.ext4")
    mkfs = ["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-d", str(tree), image]
    subprocess.run([*mkfs, f"{int(size * 1.2) + 32}M"], check=True, capture_output=True)
    return time.perf_counter() - start


async def first_exec(builder: capsa.SandboxBuilder) -> float:
    start = time.perf_counter()
    async with await builder.build() as sb:
        result = await (await sb.agent()).exec("true")
        assert result.exit_code == 0
        return time.perf_counter() - start


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="capsa-bench-oci-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        write_layout(work / "layout", "v1", big_layers(args.mib), {"Cmd": ["sleep", "3600"]})
        with registry(work / "reg") as reg:
            reg.push(work / "layout", "v1", "bench/big")
            reference = f"{reg.address}/bench/big:v1"
            ours, theirs = [], []
            for run in range(args.runs):
                store = Store(work / f"store{run}")
                start = time.perf_counter()
                image = await store.pull(reference, insecure=True)
                await store.rootfs(image)
                ours.append(time.perf_counter() - start)
                base = work / f"base{run}"
                base.mkdir()
                theirs.append(baseline(reference, base))
                shutil.rmtree(base)
            os.environ["CAPSA_OCI_STORE"] = str(work / "store0")
            oci_starts, plain_starts = [], []
            for _ in range(args.runs):
                oci = capsa.sandbox().oci(reference, insecure=True)
                oci_starts.append(await first_exec(oci))
                plain_starts.append(await first_exec(capsa.sandbox()))
    o, t = statistics.median(ours), statistics.median(theirs)
    print(
        f"pull + root fs of {image.size >> 20} MiB   capsa {o:.2f} s   skopeo+tar+mke2fs "
        f"{t:.2f} s   ratio {o / t:.2f} (< 1: capsa is faster)"
    )
    a, b = statistics.median(oci_starts), statistics.median(plain_starts)
    print(
        f"sandbox start to first exec   from the image {a:.2f} s   plain {b:.2f} s   "
        f"ratio {a / b:.2f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
