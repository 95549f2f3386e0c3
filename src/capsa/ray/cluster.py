"""``capsa.ray.connect()``: sandboxes placed over the nodes of a Ray cluster.

Every node runs one node service (a detached Ray actor named ``capsa-node-<node id>`` in
the ``capsa`` namespace, pinned to its node), made by the first caller that needs it and
shared by every caller after. A :class:`Cluster` is one caller's connection: it places
sandboxes, and owns them through its *lease*, a small actor Ray ends with the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from capsa.api.builders import check_pool_size
from capsa.api.pool import Pool, start_pool
from capsa.api.sandbox import SandboxBuilder, sandbox
from capsa.api.starting import Starting
from capsa.errors import CapsaError, InvalidConfig, NoCapacity, NodeLost, PoolEmpty, SandboxLost
from capsa.ray.handle import ClusterSandbox, call_node
from capsa.ray.node import Lease, NodeInfo, NodeService
from capsa.ray.recipe import BUILDER_CALLS, NODE_LOCAL_CALLS, Recipe

log = logging.getLogger("capsa.ray")

NAMESPACE = "capsa"
DISCOVERY = 5.0  # seconds between looks for nodes that joined or left
FIRST_INFO_TIMEOUT = 60.0  # a node service's first answer (it starts a Python worker)
INFO_TIMEOUT = 10.0  # later ones: a node slower than this is left out of a placement
POOL_CHECK = 1.0  # seconds between looks at the nodes of a pool's idle members
# Paths name files on the node that runs the sandbox: not checked where the caller is.
NODE_PATH_CALLS = frozenset({"disk", "mount", "share", "virtio_fs", "kernel", "initrd"})

_NodeActor = ray.remote(NodeService)
_ray_nodes: Callable[[], list[dict[str, Any]]] = ray.nodes
_LeaseActor = ray.remote(Lease)


class Placement(enum.Enum):
    """Where a new sandbox goes."""

    SPREAD = "spread"  # the node with the most free slots: sandboxes spread evenly
    PACK = "pack"  # the fullest node that still has room: nodes fill one after another


@dataclass
class _Node:
    node_id: str
    actor: Any
    info: NodeInfo | None = None
    lost: str | None = None  # why it cannot be used
    # Sandboxes this connection is placing there now: a node counts a start only once it
    # began, and concurrent placements must not all see the same free slot.
    placing: int = 0

    def free_slots(self) -> int:
        if self.lost is not None or self.info is None:
            return 0
        return self.info.free_slots - self.placing

    def fits(self, memory_mb: int) -> bool:
        return self.info is not None and self.info.has_room(memory_mb)


async def connect(
    address: str | None = None,
    *,
    placement: Placement = Placement.SPREAD,
    resource: str | None = None,
    slots: int | None = None,
    **ray_init: Any,
) -> Cluster:
    """A connection to the Ray cluster at ``address`` (or the one this process is already
    part of, e.g. inside a Ray driver, task or actor).

    ``resource``: only nodes offering this custom Ray resource run sandboxes. ``slots``:
    sandboxes per node for node services this call creates (default: a node's memory /
    256 MiB). ``ray_init`` goes to ``ray.init()`` when this process is not connected yet;
    the process's SIGTERM handling stays as it was (``ray.init()`` alone would make SIGTERM
    raise ``SystemExit``): a program that wants a graceful end on SIGTERM installs its own.
    """
    if not isinstance(placement, Placement):
        raise InvalidConfig(f"placement must be a Placement, not {placement!r}")
    if slots is not None and (not isinstance(slots, int) or slots < 1):
        raise InvalidConfig(f"slots must be a positive number of sandboxes, not {slots!r}")
    if not ray.is_initialized():
        _init_keeping_sigterm(address, ray_init)
    here = ray.get_runtime_context().get_node_id()
    lease: Any = _LeaseActor.options(
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True)
    ).remote()
    cluster = Cluster(lease, placement=placement, resource=resource, slots=slots)
    try:
        await lease.ping.remote()
        await cluster.nodes()
    except BaseException:
        ray.kill(lease)
        raise
    return cluster


def _init_keeping_sigterm(address: str | None, options: dict[str, Any]) -> None:
    """``ray.init()``, with this process's SIGTERM handling left as it was. Ray installs a
    handler that exits on the spot, which would skip the caller's own shutdown: ``capsa
    serve`` then lost the race to end its sandboxes before the process went."""
    before = None  # also when the handler was not set from Python: then none to put back
    if threading.current_thread() is threading.main_thread():
        before = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(address=address, **options)
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)


class Cluster:
    def __init__(
        self, lease: Any, *, placement: Placement, resource: str | None, slots: int | None
    ) -> None:
        self.placement = placement
        self._lease = lease
        self._owner = secrets.token_hex(8)
        self._resource = resource
        self._slots = slots
        self._nodes: dict[str, _Node] = {}
        self._seen = 0.0
        self._refreshing: asyncio.Lock = asyncio.Lock()
        self._pools: set[ClusterPool] = set()
        self._closed = False

    # -- nodes ------------------------------------------------------------------------------

    async def nodes(self) -> list[NodeInfo]:
        """Every node that can hold sandboxes, as it is now."""
        await self._refresh(force=True)
        return [n.info for n in self._nodes.values() if n.info is not None and not n.lost]

    async def _refresh(self, force: bool = False) -> None:
        """Every node's capacity as it is now (each node counts its own sandboxes: handles
        end them from anywhere), and, every few seconds, which nodes there are."""
        async with self._refreshing:
            if force or time.monotonic() - self._seen >= DISCOVERY:
                await self._discover()
                self._seen = time.monotonic()
        current = [n for n in self._nodes.values() if n.lost is None]
        await asyncio.gather(*(self._ask(node) for node in current))

    async def _discover(self) -> None:
        """Which nodes there are. A node still in the cluster whose service was lost (it
        died, or did not answer) gets its service again: found if it lives, else new."""
        alive = await asyncio.to_thread(self._alive_nodes)
        for node_id, node in self._nodes.items():
            if node_id not in alive and node.lost is None:
                node.lost = "the node left the cluster"
        wanted = [
            node_id
            for node_id in alive
            if node_id not in self._nodes or self._nodes[node_id].lost is not None
        ]
        actors = await asyncio.to_thread(self._node_actors, wanted)
        for node_id, actor in zip(wanted, actors, strict=True):
            self._nodes[node_id] = _Node(node_id, actor)

    def _alive_nodes(self) -> list[str]:
        return [
            node["NodeID"]
            for node in _ray_nodes()
            if node.get("Alive")
            and (self._resource is None or node.get("Resources", {}).get(self._resource, 0) > 0)
        ]

    def _node_actors(self, node_ids: Iterable[str]) -> list[Any]:
        return [
            _NodeActor.options(
                name=f"capsa-node-{node_id}",
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                max_restarts=0,
                max_concurrency=1000,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(node_id, self._slots)
            for node_id in node_ids
        ]

    async def _ask(self, node: _Node) -> None:
        limit = FIRST_INFO_TIMEOUT if node.info is None else INFO_TIMEOUT
        try:
            info = await asyncio.wait_for(call_node(node.actor, node.node_id, "info"), limit)
        except NodeLost as e:
            node.lost = str(e)
        except Exception as e:
            node.info = None
            log.warning("node %s did not answer: %s", node.node_id[:12], e)
        else:
            node.info = info if isinstance(info, NodeInfo) else None

    def _candidates(self, placement: Placement, memory_mb: int) -> list[_Node]:
        """The nodes with room, in the order to try them."""
        ready = [n for n in self._nodes.values() if n.free_slots() > 0 and n.fits(memory_mb)]

        def room(n: _Node) -> tuple[int, int]:
            assert n.info is not None
            return (n.free_slots(), n.info.memory_available_mb)

        return sorted(ready, key=room, reverse=placement is Placement.SPREAD)

    def _why_full(self) -> str:
        reasons = []
        for node in self._nodes.values():
            if node.lost:
                reasons.append(f"{node.node_id[:12]}: {node.lost}")
            elif node.info is None:
                reasons.append(f"{node.node_id[:12]}: no answer")
            elif not node.info.usable:
                reasons.append(f"{node.node_id[:12]}: {node.info.why_not}")
            else:
                info = node.info
                reasons.append(
                    f"{node.node_id[:12]}: {info.used}/{info.slots} sandboxes, "
                    f"{info.memory_available_mb} MiB available"
                )
        return "; ".join(reasons) or "the cluster has no nodes"

    # -- sandboxes --------------------------------------------------------------------------

    def sandbox(self) -> ClusterSandboxBuilder:
        """Describe a sandbox as ``capsa.sandbox()`` does; ``build()`` places it."""
        return ClusterSandboxBuilder(self)

    def pool(self, size: int, *, wait: bool = True) -> Starting[ClusterPool]:
        """``size`` warm default sandboxes, spread over the nodes."""
        return self.sandbox().pool(size, wait=wait)

    async def _create(
        self, recipe: Recipe, placement: Placement, node_id: str | None
    ) -> ClusterSandbox:
        if self._closed:
            raise CapsaError("this cluster connection is closed")
        await self._refresh()
        if node_id is not None:
            chosen = self._nodes.get(node_id)
            if chosen is None or chosen.lost:
                raise NoCapacity(f"node {node_id[:12]} is not in the cluster")
            candidates = [chosen]
        else:
            candidates = self._candidates(placement, recipe.memory_mb)
        refusals = []
        for node in candidates:
            node.placing += 1
            try:
                sid = await call_node(
                    node.actor, node.node_id, "create", recipe, self._owner, self._lease
                )
            except NoCapacity as e:
                refusals.append(str(e))
                continue
            except NodeLost as e:
                node.lost = str(e)
                refusals.append(str(e))
                continue
            except SandboxLost:
                if self._closed:
                    raise CapsaError("this cluster connection was closed") from None
                raise
            finally:
                node.placing -= 1
            if not isinstance(sid, str):
                raise CapsaError(f"node {node.node_id[:12]} answered {sid!r:.40} for an id")
            return ClusterSandbox(node.node_id, node.actor, sid)
        detail = "; ".join(refusals) or self._why_full()
        raise NoCapacity(f"no node has room for another sandbox ({detail})")

    # -- the connection -------------------------------------------------------------------

    async def close(self) -> None:
        """Kill every sandbox this connection made, on every node."""
        if self._closed:
            return
        self._closed = True
        try:
            for pool in list(self._pools):
                await pool.close()
            live = [n for n in self._nodes.values() if n.lost is None]
            await asyncio.gather(
                *(call_node(n.actor, n.node_id, "release_owner", self._owner) for n in live),
                return_exceptions=True,
            )
        finally:
            # Whatever the releases did, the lease goes: node services end the rest.
            with contextlib.suppress(Exception):
                ray.kill(self._lease)

    async def stop_nodes(self) -> None:
        """End the node services themselves (and with them every sandbox on them, whoever
        made it); the next connection starts them again."""
        await self.close()
        for node in self._nodes.values():
            if node.lost is None:
                with contextlib.suppress(CapsaError):
                    await call_node(node.actor, node.node_id, "shutdown")
                with contextlib.suppress(Exception):
                    ray.kill(node.actor)

    async def __aenter__(self) -> Cluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class ClusterSandboxBuilder:
    """``capsa.sandbox()``'s builder for a cluster: the same describing methods (checked as
    they are called), plus where the sandbox goes."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self._recipe = Recipe()
        self._local: SandboxBuilder = sandbox()
        self._placement = cluster.placement
        self._node: str | None = None

    def __getattr__(self, name: str) -> Callable[..., ClusterSandboxBuilder]:
        if name.startswith("_") or name not in BUILDER_CALLS | NODE_LOCAL_CALLS:
            raise AttributeError(f"cluster sandbox builders have no {name}()")

        def describe(*args: Any, **kwargs: Any) -> ClusterSandboxBuilder:
            recipe = self._recipe.then(name, args, kwargs)
            if name not in NODE_PATH_CALLS:
                getattr(self._local, name)(*args, **kwargs)
            self._recipe = recipe
            return self

        return describe

    def placement(self, placement: Placement) -> ClusterSandboxBuilder:
        if not isinstance(placement, Placement):
            raise InvalidConfig(f"placement must be a Placement, not {placement!r}")
        self._placement = placement
        return self

    def on_node(self, node_id: str) -> ClusterSandboxBuilder:
        """Run on this node (a Ray node id) and nowhere else."""
        self._node = node_id
        return self

    def build(self) -> Starting[ClusterSandbox]:
        recipe = self._recipe.with_default_image()
        return Starting(self._cluster._create(recipe, self._placement, self._node))

    def pool(self, size: int, *, wait: bool = True) -> Starting[ClusterPool]:
        """``size`` warm sandboxes of this description, spread over the nodes; members
        lost with their node are replaced on the nodes that remain."""
        check_pool_size(size)
        recipe = self._recipe.with_default_image()
        if not recipe.poolable:
            raise InvalidConfig("sandboxes with disk_size() cannot be pooled")
        placement, node = self._placement, self._node
        return Starting(ClusterPool.start(self._cluster, recipe, placement, node, size, wait))


class ClusterPool:
    """Warm cluster sandboxes. ``reserve()`` hands out a member checked alive, which then
    belongs to the caller (``kill()`` it, or ``async with`` it), and a replacement starts
    on a node with room."""

    def __init__(self, cluster: Cluster, pool: Pool[ClusterSandbox]) -> None:
        self._cluster = cluster
        self._pool = pool
        self._watch = asyncio.ensure_future(self._watch_nodes())

    @classmethod
    async def start(
        cls,
        cluster: Cluster,
        recipe: Recipe,
        placement: Placement,
        node: str | None,
        size: int,
        wait: bool,
    ) -> ClusterPool:
        async def create() -> ClusterSandbox:
            return await cluster._create(recipe, placement, node)

        async def destroy(member: ClusterSandbox) -> None:
            await member.kill()

        pool = cls(cluster, await start_pool(size, create, destroy, wait=wait))
        cluster._pools.add(pool)
        return pool

    @property
    def size(self) -> int:
        return self._pool.size

    @property
    def failures(self) -> list[BaseException]:
        return self._pool.failures

    def members(self) -> list[ClusterSandbox]:
        """The idle members, as they are now."""
        return self._pool.idle_members()

    async def available_count(self) -> int:
        return await self._pool.available_count()

    async def reserve(self, timeout: float | None = None) -> ClusterSandbox:
        """A warm member, yours until you ``kill()`` it (``async with`` does)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            pooled = await self._pool.reserve(left)
            member = pooled.member
            try:
                await member.ping()
            except SandboxLost:
                await pooled.release()  # and a replacement starts
                if deadline is not None and time.monotonic() >= deadline:
                    raise PoolEmpty("no live pool member within the timeout") from None
                continue
            except BaseException:
                await pooled.release()
                raise
            self._pool.hand_over(member)
            return member

    async def _watch_nodes(self) -> None:
        while True:
            await asyncio.sleep(POOL_CHECK)
            by_node: dict[str, list[ClusterSandbox]] = {}
            for member in self._pool.idle_members():
                by_node.setdefault(member.node_id, []).append(member)
            for members in by_node.values():
                try:
                    alive = await _node_alive(members[0])
                except Exception:
                    log.exception("checking a pool's node failed; going on")
                    continue
                if not alive:
                    for member in members:
                        self._pool.discard(member)

    async def close(self) -> None:
        self._watch.cancel()
        with contextlib.suppress(BaseException):
            await self._watch
        self._cluster._pools.discard(self)
        await self._pool.close()

    async def __aenter__(self) -> ClusterPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _node_alive(member: ClusterSandbox) -> bool:
    try:
        await asyncio.wait_for(call_node(member._actor, member.node_id, "info"), INFO_TIMEOUT)
    except NodeLost:
        return False
    except (CapsaError, TimeoutError):
        return True  # not known to be gone
    return True
