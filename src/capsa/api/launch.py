"""The one way a VM starts, booted or restored: pick the backend, check the config against
it, give the VM a MAC and a port on its network, start it, and hand everything to a
:class:`VmHandle`, which owns it all from then on."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from capsa.api.handle import VmHandle
from capsa.api.network import Attachment, attach_network
from capsa.api.vsock import VsockSocket
from capsa.backends.registry import select_backend
from capsa.errors import BootTimeout
from capsa.net.spec import NetworkPort, capped
from capsa.spec.shares import check_shares
from capsa.spec.vm import VmConfig


def random_mac() -> str:
    """A locally administered address in QEMU's range; a fresh one per VM, so VMs on one
    network never collide."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in os.urandom(3))


async def start_vm(
    config: VmConfig, *, restore_from: Path | None = None, mac: str | None = None
) -> VmHandle:
    """Start a VM for ``config``: booting, or loading the snapshot in ``restore_from``
    (``mac``: keep that MAC address instead of a new random one)."""
    backend = select_backend(config.backend)
    backend.validate(config)
    # Checked at build time too, but a restore's folders may have gone since its snapshot.
    check_shares(config.shares)
    mac = mac or random_mac()
    attachment: Attachment | None = None
    if isinstance(config.network, NetworkPort):
        needs = backend.nic_needs()
        port = capped(config.network, needs.max_mtu)
        attachment = await attach_network(port, mac, datagram=needs.datagram)
    try:
        starting = backend.start(
            config,
            mac=mac,
            net=attachment.plug if attachment else None,
            restore_from=restore_from,
        )
        try:
            vm = await asyncio.wait_for(starting, config.timeout)
        except TimeoutError:
            raise BootTimeout(f"the VM did not start within {config.timeout}s") from None
    except BaseException:
        if attachment is not None:
            await attachment.detach()
        raise
    vsock = {p.port: VsockSocket(p.port, vm.vsock_path(p), p.connect) for p in config.vsock_ports}
    return VmHandle(config, vm, vsock, attachment)
