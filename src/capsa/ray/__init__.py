"""capsa on Ray: sandboxes on many machines behind one API (the ``capsa[ray]`` extra).

    import capsa.ray

    cluster = await capsa.ray.connect("10.0.0.1:6379")     # or inside a Ray driver
    async with cluster.sandbox().memory_mb(512).build() as sb:
        result = await (await sb.agent()).exec("uname -a")

Each node runs one node service that owns its sandboxes, templates and image cache;
``build()`` places a sandbox on the node with room (:class:`Placement`), and the handle it
returns can be passed to Ray tasks and actors. A handle whose node died raises
:class:`~capsa.errors.SandboxLost`; a caller that dies takes its sandboxes with it.
"""

try:
    import ray as _ray  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError("capsa.ray needs Ray: pip install 'capsa[ray]'") from e

from capsa.errors import NoCapacity, SandboxLost
from capsa.ray.cluster import Cluster, ClusterPool, ClusterSandboxBuilder, Placement, connect
from capsa.ray.handle import ClusterAgent, ClusterExec, ClusterProcess, ClusterSandbox
from capsa.ray.node import NodeInfo

__all__ = [
    "Cluster",
    "ClusterAgent",
    "ClusterExec",
    "ClusterPool",
    "ClusterProcess",
    "ClusterSandbox",
    "ClusterSandboxBuilder",
    "NoCapacity",
    "NodeInfo",
    "Placement",
    "SandboxLost",
    "connect",
]
