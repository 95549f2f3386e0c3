"""Sandboxes over a Ray cluster of three nodes on this machine (two run sandboxes).

The tests share one cluster and run in this order; the last removes a node."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="capsa[ray] is not installed")
psutil = pytest.importorskip("psutil")

import capsa  # noqa: E402
import capsa.ray  # noqa: E402
import capsa.remote  # noqa: E402
from tests.conftest import RUNTIME_DIR  # noqa: E402
from tests.ray.conftest import SLOTS, LocalRay, our_qemus, wait_until  # noqa: E402
from tests.vm.test_server import start_server, stop  # noqa: E402

pytestmark = [pytest.mark.vm, pytest.mark.ray]


async def sha256_in(sb: capsa.ray.ClusterSandbox, path: str) -> str:
    result = await (await sb.agent()).exec("sha256sum").arg(path).run()
    assert result.exit_code == 0, result.stderr
    return result.stdout.split()[0].decode()


async def used_on(cluster: capsa.ray.Cluster) -> dict[str, int]:
    return {info.node_id: info.used for info in await cluster.nodes()}


async def test_nodes_advertise_their_capacity(
    local_ray: LocalRay, cluster: capsa.ray.Cluster
) -> None:
    nodes = await cluster.nodes()
    # Only the nodes with the "capsa" resource run sandboxes; the head does not.
    assert {n.node_id for n in nodes} == local_ray.worker_ids
    for node in nodes:
        assert node.usable, node.why_not
        assert node.slots == SLOTS and node.used == 0
        assert node.accelerator in ("kvm", "tcg")
        assert node.memory_available_mb > 1024


async def test_sandboxes_spread_over_both_nodes_with_exec_files_and_streams(
    local_ray: LocalRay, cluster: capsa.ray.Cluster
) -> None:
    first = await cluster.sandbox().build()
    second = await cluster.sandbox().build()
    async with first, second:
        assert {first.node_id, second.node_id} == local_ray.worker_ids
        assert await used_on(cluster) == dict.fromkeys(local_ray.worker_ids, 1)
        for sb in (first, second):
            agent = await sb.agent()
            result = await agent.exec("echo -n oops >&2; exit 7")
            assert (result.exit_code, result.stderr) == (7, b"oops")

            data = os.urandom(300_000)
            await agent.write_file("/tmp/in", data)
            assert await sha256_in(sb, "/tmp/in") == hashlib.sha256(data).hexdigest()
            made = await agent.exec("head -c 200000 /dev/urandom > /tmp/out")
            assert made.exit_code == 0
            back = await agent.read_file("/tmp/out")
            assert len(back) == 200_000
            assert hashlib.sha256(back).hexdigest() == await sha256_in(sb, "/tmp/out")
            assert (await agent.stat("/tmp/out")).size == 200_000

            process = await agent.start(
                ["sh", "-c", "for i in 1 2 3; do head -c 5000 /dev/zero; sleep 0.2; done; exit 4"]
            )
            received = [chunk async for chunk in process.stdout]
            assert b"".join(received) == bytes(15_000)
            assert await process.wait() == 4
        _nothing_listens_beyond_loopback()
    assert await used_on(cluster) == dict.fromkeys(local_ray.worker_ids, 0)


def _nothing_listens_beyond_loopback() -> None:
    """Every socket Ray, capsa or QEMU listens on (this process and all it started) is on
    127.0.0.0/8."""
    me = psutil.Process()
    ours = {me.pid, *(p.pid for p in me.children(recursive=True))}
    assert len(ours) > 5  # the head, the nodes, their workers, the VMs
    wide = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status != psutil.CONN_LISTEN or conn.pid not in ours:
            continue
        address = ipaddress.ip_address(conn.laddr.ip)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if not address.is_loopback:
            wide.append((conn.laddr, psutil.Process(conn.pid).name()))
    assert wide == []


async def test_argv_is_never_a_shell_line_and_a_cancelled_call_ends_on_the_node(
    cluster: capsa.ray.Cluster,
) -> None:
    async with await cluster.sandbox().build() as sb:
        agent = await sb.agent()
        shell = await agent.start("exit 3")
        assert await shell.wait() == 3
        try:
            not_a_shell = await agent.start(["exit 3"])
            assert await not_a_shell.wait() != 3
        except capsa.AgentError:
            pass  # no program named "exit 3": refused at start, as locally
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(agent.exec("sleep 73"), 1.5)
        deadline = time.monotonic() + 20
        while (await agent.exec("ps | grep -c '[s]leep 73'")).stdout.strip() != b"0":
            assert time.monotonic() < deadline, "the cancelled command still runs"
            await asyncio.sleep(0.5)


async def test_a_handle_works_inside_a_ray_task(cluster: capsa.ray.Cluster) -> None:
    @ray.remote(num_cpus=1)
    def write_through(sb: capsa.ray.ClusterSandbox, data: bytes) -> tuple[str, str]:
        import capsa.sync

        agent = capsa.sync.wrap(sb).agent()  # a plain function: the sync face
        agent.write_file("/tmp/from-task", data)
        digest = agent.exec("sha256sum /tmp/from-task").run().stdout.split()[0].decode()
        return ray.get_runtime_context().get_node_id(), digest

    data = os.urandom(50_000)
    async with await cluster.sandbox().build() as sb:
        task_node, digest = await write_through.remote(sb, data)
        assert digest == hashlib.sha256(data).hexdigest()
        assert await (await sb.agent()).read_file("/tmp/from-task") == data
        assert task_node  # the task ran in its own worker, wherever Ray put it


async def test_pack_fills_one_node_then_it_is_full(cluster: capsa.ray.Cluster) -> None:
    packed = cluster.sandbox().placement(capsa.ray.Placement.PACK)
    first = await packed.build()
    async with first:
        second = await cluster.sandbox().placement(capsa.ray.Placement.PACK).build()
        async with second:
            assert first.node_id == second.node_id, await used_on(cluster)
            with pytest.raises(capsa.NoCapacity, match="full"):
                await cluster.sandbox().on_node(first.node_id).build()


async def test_errors_cross_the_cluster_as_capsa_errors(cluster: capsa.ray.Cluster) -> None:
    # Checked where the sandbox would start, before anything starts, as locally.
    with pytest.raises(capsa.InvalidConfig, match="cpus"):
        await cluster.sandbox().cpus(0).build()
    with pytest.raises(capsa.InvalidConfig, match="socket on the node"):
        cluster.sandbox().vsock_listen(5000)
    async with await cluster.sandbox().build() as sb:
        agent = await sb.agent()
        with pytest.raises(capsa.AgentError) as missing:
            await agent.read_file("/no/such/file")
        assert missing.value.errno == 2
        with pytest.raises(capsa.OutputLimitExceeded) as flood:
            await agent.exec("head -c 100000 /dev/zero", max_output=1000)
        assert (flood.value.stream, flood.value.limit) == (1, 1000)
        assert len(flood.value.stdout) <= 1000
        with pytest.raises(capsa.ProcessError) as failed:
            await agent.exec("exit 3", check=True)
        assert failed.value.exit_code == 3
        # State lasts across cells of a named context, held by the node.
        run = await sb.run_code("x=$((6 * 7))", "bash", context="c")
        assert run.exit_code == 0
        again = await sb.run_code("echo $((x + 1))", "bash", context="c")
        assert again.stdout == "43\n"


async def test_closing_a_connection_ends_its_sandboxes(
    local_ray: LocalRay, cluster: capsa.ray.Cluster
) -> None:
    other = await capsa.ray.connect(resource="capsa")
    sb = await other.sandbox().build()
    assert (await (await sb.agent()).exec("true")).exit_code == 0
    await other.close()
    with pytest.raises(capsa.SandboxLost, match="closed"):
        await (await sb.agent()).exec("true")
    assert await used_on(cluster) == dict.fromkeys(local_ray.worker_ids, 0)


DRIVER = """
import asyncio, os, sys
import ray, capsa.ray
ray.init(address=sys.argv[1], _node_ip_address="127.0.0.1", log_to_driver=False)
async def main():
    cluster = await capsa.ray.connect(resource="capsa")
    sb = await cluster.sandbox().build()
    print(sb.node_id, flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


async def test_a_driver_killed_leaves_no_sandbox(
    local_ray: LocalRay, cluster: capsa.ray.Cluster
) -> None:
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, local_ray.cluster.address],
        stdout=subprocess.PIPE,
        env=dict(os.environ, CAPSA_RUNTIME_DIR=str(RUNTIME_DIR)),
    )
    try:
        assert driver.stdout is not None
        node = (await asyncio.to_thread(driver.stdout.readline)).decode().strip()
        assert node in local_ray.worker_ids
        assert (await used_on(cluster))[node] == 1
        assert len(our_qemus()) == 1
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    deadline = time.monotonic() + 30
    while (await used_on(cluster))[node] != 0:
        assert time.monotonic() < deadline, "the dead driver's sandbox still runs"
        await asyncio.sleep(0.5)
    await asyncio.to_thread(wait_until, lambda: not our_qemus(), 15, "its QEMU to end")


async def test_capsa_serve_fronts_the_cluster(
    local_ray: LocalRay, cluster: capsa.ray.Cluster, tmp_path: Path
) -> None:
    """HTTP clients get cluster sandboxes without knowing about Ray: exec, files, code and
    an interactive terminal, through the server to a node."""
    from websockets.asyncio.client import unix_connect

    address = local_ray.cluster.address
    server = start_server(tmp_path, "--ray", address, "--ray-resource", "capsa")
    try:
        remote = await capsa.remote.connect(server.socket)
        async with remote:
            sb = await remote.create(name="far")
            node = (await sb.status())["node"]
            assert node in local_ray.worker_ids
            assert (await used_on(cluster))[node] == 1
            agent = await sb.agent()
            result = await agent.exec("exit 5")
            assert result.exit_code == 5
            data = os.urandom(70_000)
            await agent.write_file("/tmp/blob", data)
            assert await agent.read_file("/tmp/blob") == data
            assert (await agent.stat("/tmp/blob")).size == len(data)
            run = await sb.run_code("n=$((20 + 1))", "bash", context="k")
            assert run.exit_code == 0
            assert (await sb.run_code("echo $((n * 2))", "bash", context="k")).stdout == "42\n"

            uri = "ws://capsa/sandboxes/far/shell?rows=33&cols=101"
            async with unix_connect(str(server.socket), uri) as ws:
                await ws.send(b"stty size; exit 3\n")
                screen, end = b"", {}
                async for message in ws:
                    if isinstance(message, bytes):
                        screen += message
                    else:
                        end = json.loads(message)
            assert b"33 101" in screen and end == {"exit_code": 3}

            with pytest.raises(capsa.InvalidConfig, match="Ray cluster"):
                await remote._call("POST", "/sandboxes/far/pause")
            await sb.kill()
            assert (await used_on(cluster))[node] == 0
            await remote.create(name="left")  # ended by the server's exit
        stop(server)
        # Its own shutdown ran: the lifespan removed the socket, and uvicorn re-raised the
        # signal (Ray's SIGTERM handler would have exited with status 15).
        assert server.process.returncode == -signal.SIGTERM
        assert server.socket is not None and not server.socket.exists()
        assert sum((await used_on(cluster)).values()) == 0
    finally:
        stop(server)


async def test_a_lost_node_fails_its_handles_and_the_pool_refills_elsewhere(
    local_ray: LocalRay, cluster: capsa.ray.Cluster
) -> None:
    pool = await cluster.sandbox().pool(2)
    async with pool:
        assert {m.node_id for m in pool.members()} == local_ray.worker_ids
        doomed_id = pool.members()[0].node_id
        doomed = next(n for n in local_ray.workers if n.node_id == doomed_id)
        on_doomed = await cluster.sandbox().on_node(doomed_id).build()
        survivor = next(iter(local_ray.worker_ids - {doomed_id}))

        local_ray.cluster.remove_node(doomed, allow_graceful=False)
        # Ray notices within seconds; the call fails then, it does not hang.
        with pytest.raises(capsa.SandboxLost):
            await asyncio.wait_for((await on_doomed.agent()).exec("sleep 600"), 60)
        with pytest.raises(capsa.SandboxLost):
            await on_doomed.ping()
        await on_doomed.kill()  # a lost sandbox is already ended: no error

        deadline = time.monotonic() + 120
        while [m.node_id for m in pool.members()] != [survivor, survivor]:
            assert time.monotonic() < deadline, f"pool did not refill: {pool.failures}"
            await asyncio.sleep(0.5)
        member = await pool.reserve(timeout=60)
        async with member:
            assert member.node_id == survivor
            assert (await (await member.agent()).exec("true")).exit_code == 0
        # The lost node's VMs went with it: only the survivor's remain (two pool members,
        # the replacement of the reserved one perhaps still starting).
        assert len(our_qemus()) <= SLOTS
