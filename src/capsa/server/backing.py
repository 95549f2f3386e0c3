"""Where a server's sandboxes run: on this machine (the default), or over the nodes of a
Ray cluster (``capsa serve --ray ADDRESS``), which HTTP and MCP clients never see."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

import capsa
from capsa.errors import UnsupportedFeature

if TYPE_CHECKING:
    from capsa.ray import Cluster, ClusterSandbox, ClusterSandboxBuilder

    AnySandbox: TypeAlias = capsa.Sandbox | ClusterSandbox
    AnyBuilder: TypeAlias = capsa.SandboxBuilder | ClusterSandboxBuilder


class Backing:
    def __init__(self, ray_address: str | None = None, ray_resource: str | None = None) -> None:
        self.ray_address = ray_address
        self.ray_resource = ray_resource
        self._cluster: Cluster | None = None

    @property
    def on_cluster(self) -> bool:
        return self.ray_address is not None

    async def start(self) -> None:
        if self.ray_address is None:
            return
        try:
            import capsa.ray
        except ImportError as e:
            raise UnsupportedFeature(f"--ray needs Ray: pip install 'capsa[ray]' ({e})") from None
        address = None if self.ray_address == "auto" else self.ray_address
        self._cluster = await capsa.ray.connect(
            address, resource=self.ray_resource, log_to_driver=False
        )

    def builder(self) -> AnyBuilder:
        if self._cluster is None:
            if self.on_cluster:
                raise UnsupportedFeature("the server is not connected to its Ray cluster yet")
            return capsa.sandbox()
        return self._cluster.sandbox()

    async def close(self) -> None:
        if self._cluster is not None:
            await self._cluster.close()
            self._cluster = None


def node_of(sandbox: AnySandbox) -> str | None:
    """The Ray node a sandbox runs on (None: this machine)."""
    return None if isinstance(sandbox, capsa.Sandbox) else sandbox.node_id


def local_only(sandbox: AnySandbox, what: str) -> capsa.Sandbox:
    """``sandbox`` if it runs here; what only a local sandbox can do is refused otherwise."""
    if not isinstance(sandbox, capsa.Sandbox):
        raise UnsupportedFeature(f"{what} is not available for sandboxes on a Ray cluster")
    return sandbox
