"""The owner's end of a network's helper process (:mod:`capsa.net.stack_main`): start it
for a :class:`~capsa.net.spec.NetworkSpec`, add and remove VM ports and port forwards,
change the policy, read counters, stop it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from capsa._util.helper import HelperProcess
from capsa._util.privileges import Identity
from capsa.net.policy import IpProtocol, NetworkPolicy
from capsa.net.spec import NetworkSpec, PortForward


class StackProcess:
    """A running switch (and gateway) for one network."""

    def __init__(self, helper: HelperProcess) -> None:
        self.helper = helper

    @property
    def running(self) -> bool:
        return self.helper.running

    @property
    def pid(self) -> int:
        return self.helper.pid

    async def add_port(
        self, path: Path, mac: str, ip: str | None = None, datagram: bool = False
    ) -> None:
        mac_hex = mac.replace(":", "")
        await self.helper.request("add_port", path=str(path), mac=mac_hex, ip=ip, datagram=datagram)

    async def remove_port(self, mac: str) -> int:
        reply = await self.helper.request("remove_port", mac=mac.replace(":", ""))
        return int(reply["ports"])

    async def set_policy(self, policy: NetworkPolicy | None) -> None:
        await self.helper.request("set_policy", policy=policy.to_json() if policy else None)

    async def add_forward(self, forward: PortForward) -> int:
        reply = await self.helper.request("add_forward", forward=forward.to_json())
        return int(reply["host_port"])

    async def remove_forward(self, protocol: IpProtocol, host_port: int, host_addr: str) -> None:
        await self.helper.request(
            "remove_forward", protocol=protocol.value, host_addr=host_addr, host_port=host_port
        )

    async def stats(self) -> dict[str, Any]:
        return await self.helper.request("stats")

    async def stop(self) -> None:
        await self.helper.stop()


async def start_stack(spec: NetworkSpec, identity: Identity | None = None) -> StackProcess:
    """The helper for ``spec``, listening and ready for ports (as ``identity``, if given)."""
    args = ["--spec", json.dumps(spec.to_json())]
    helper = await HelperProcess.start("capsa.net.stack_main", args, "network", identity)
    return StackProcess(helper)
