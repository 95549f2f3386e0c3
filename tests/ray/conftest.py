"""A Ray cluster on this machine: a head and two worker nodes, each its own processes, every
address on loopback.

Ray's cluster utilities otherwise advertise the machine's outward address; with clusters
"disabled" for this platform (the variable below, read when Ray loads) Ray resolves
"localhost" to 127.0.0.1 instead, and every node is given 127.0.0.1 as its address.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import RUNTIME_DIR

if TYPE_CHECKING:
    import capsa.ray

# Read when Ray loads. Ray itself is imported by the tests (they skip without it) and by
# the fixtures: a conftest cannot skip.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

LOOPBACK = "127.0.0.1"
SLOTS = 2  # sandboxes per node: small, so that "full" is reachable with few VMs
# Node deaths noticed within seconds, not Ray's default half-minute.
FAST_HEALTH_CHECKS = {
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}


@dataclass
class LocalRay:
    cluster: Any  # ray.cluster_utils.Cluster
    workers: list[Any]  # the two nodes that run sandboxes (custom resource "capsa")

    @property
    def worker_ids(self) -> set[str]:
        return {node.node_id for node in self.workers}


def our_qemus() -> list[int]:
    """QEMU processes of this test worker's capsa, whoever started them (node services are
    not our children): QEMU is handed its files open, and its stderr is a file in our
    runtime dir."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"qemu-system" not in (entry / "cmdline").read_bytes():
                continue
            targets = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:
            continue
        if any(target.startswith(f"{RUNTIME_DIR}/") for target in targets):
            found.append(int(entry.name))
    return found


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[LocalRay]:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "node_ip_address": LOOPBACK,
            "include_dashboard": False,
            "_system_config": FAST_HEALTH_CHECKS,
        },
    )
    try:
        workers = [
            cluster.add_node(num_cpus=1, resources={"capsa": 1}, node_ip_address=LOOPBACK)
            for _ in range(2)
        ]
        ray.init(address=cluster.address, _node_ip_address=LOOPBACK, log_to_driver=False)
        cluster.wait_for_nodes()
        yield LocalRay(cluster, workers)
    finally:
        ray.shutdown()
        cluster.shutdown()
        # The node services died with their nodes; their watchdogs end the VMs and remove
        # their files.
        wait_until(lambda: not our_qemus(), 30, f"QEMU left after the cluster: {our_qemus()}")
        wait_until(lambda: not any(RUNTIME_DIR.iterdir()), 30, "the VMs' run directories to go")


@pytest.fixture(scope="module")
async def cluster(local_ray: LocalRay) -> AsyncIterator[capsa.ray.Cluster]:
    import capsa.ray

    connection = await capsa.ray.connect(resource="capsa", slots=SLOTS)
    try:
        yield connection
    finally:
        await connection.close()
