"""What makes a sandbox itself, as data, and the agent requests that apply it.

A sandbox's guest boots (or is restored from a template) knowing nothing of its own: the
first request to its agent is ``setup`` with the hostname, environment, a machine id, the
shares to mount, the address to take and the main process. A VM restored from a snapshot
of a sandbox that was already set up gets ``resume`` instead: new entropy, the time and
its new MAC address.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from capsa._util.host import share_transport
from capsa.api.agent_channel import AgentChannel
from capsa.errors import InvalidConfig
from capsa.net.spec import NetworkConfig, NetworkPort
from capsa.spec.vm import VmConfig

# The setup request is one agent frame (2 MiB at most); leave room for the rest.
MAX_SETUP_BYTES = 1 << 20


@dataclass(frozen=True)
class GuestSetup:
    """The per-sandbox part of a sandbox: everything its guest is told after it starts."""

    hostname: str = "sandbox"
    env: tuple[tuple[str, str], ...] = ()
    run: tuple[str, ...] | None = None
    # An OCI image's root: disk, env, workdir, user and argv (its entrypoint + cmd).
    container: Mapping[str, object] | None = field(default=None, compare=False)

    def fields(self, config: VmConfig) -> dict[str, object]:
        """The ``setup`` request's fields for a sandbox running ``config``."""
        fields: dict[str, object] = {
            "hostname": self.hostname,
            "env": dict(self.env),
            "machine_id": os.urandom(16).hex(),
            "mounts": mounts(config),
        }
        if self.run is not None:
            fields["run"] = list(self.run)
        if self.container is not None:
            fields["container"] = dict(self.container)
        address = _static_address(config.network)
        if address is not None:
            fields["ip"], fields["gateway"] = address
        return fields

    def check_size(self, config: VmConfig) -> None:
        size = len(json.dumps(self.fields(config)))
        if size > MAX_SETUP_BYTES:
            raise InvalidConfig(
                f"run() arguments and env() values take {size} bytes; at most "
                f"{MAX_SETUP_BYTES} fit (pass data as files instead)"
            )


def mounts(config: VmConfig) -> list[list[str]]:
    """The shares init mounts: tag, guest path, ro/rw, transport."""
    transport = share_transport()
    return [
        [share.tag, share.guest_path, "ro" if share.read_only else "rw", transport]
        for share in config.shares
        if share.guest_path is not None
    ]


def _static_address(network: NetworkConfig | None) -> tuple[str, str | None] | None:
    """``(ADDR/PREFIX, GATEWAY)`` when the sandbox's address is fixed."""
    if not isinstance(network, NetworkPort) or not network.static_ip:
        return None
    address, _, gateway = network.network.static_ip_value(network.static_ip).partition(",")
    return address, gateway or None


def _renewal(mac: str | None) -> tuple[bytes, dict[str, object]]:
    """What a restored copy needs to become a distinct machine: host entropy for its RNG,
    the current time, and the MAC its network port was made for."""
    return os.urandom(64), {"mac": mac, "time_ns": time.time_ns()}


async def set_up_booted(channel: AgentChannel, setup: GuestSetup, config: VmConfig) -> None:
    """A freshly booted guest: wait for its hello, then set it up."""
    await channel.wait_ready()
    await channel.request("setup", b"", **setup.fields(config))


async def set_up_restored(
    channel: AgentChannel, setup: GuestSetup, config: VmConfig, mac: str | None
) -> None:
    """A guest restored from a template (saved at its hello, never set up): renew it and
    set it up in one request, whose answer stands in for the hello of the template's past."""
    entropy, renewal = _renewal(mac)
    header = await channel.request("setup", entropy, **renewal, **setup.fields(config))
    channel.accept_hello(header)


async def resume_agent(channel: AgentChannel, mac: str | None) -> None:
    """A guest restored from a snapshot of a running sandbox: renew it (its set-up is in
    the snapshot). The answer stands in for the hello it sent long ago."""
    entropy, renewal = _renewal(mac)
    header = await channel.request("resume", entropy, **renewal)
    channel.accept_hello(header)
