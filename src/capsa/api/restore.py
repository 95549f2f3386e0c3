"""``capsa.restore(path)`` starts copies of a saved VM or sandbox; ``capsa.resume(path)``
runs a paused one again."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from capsa.api.handle import VmHandle
from capsa.api.launch import start_vm
from capsa.api.network import NetworkArg, network_choice
from capsa.api.sandbox_handle import DEFAULT_TIMEOUT, Sandbox, restore_sandbox, resume_sandbox
from capsa.api.snapshot import claim_paused, read_meta


class _Keep:
    """``restore()``'s default for ``network``: the saved one."""


KEEP = _Keep()


async def restore(path: str | Path, *, network: NetworkArg | _Keep = KEEP) -> VmHandle | Sandbox:
    """A running copy of the VM saved in ``path``: a :class:`Sandbox` when a sandbox was
    saved, else a :class:`VmHandle`. It rejoins the network it was on (a shared network
    by its name in this process, or one made again from its saved definition);
    ``network`` puts it on another one instead."""
    snap = read_meta(Path(path))
    config = snap.config
    if not isinstance(network, _Keep):
        config = dataclasses.replace(config, network=network_choice(network))
    if snap.kind == "sandbox":
        return await restore_sandbox(snap.path, config, snap.sandbox_timeout or DEFAULT_TIMEOUT)
    # A plain guest has no agent to take a new MAC: it keeps the saved one.
    return await start_vm(config, restore_from=snap.path, mac=snap.mac)


async def resume(path: str | Path) -> VmHandle | Sandbox:
    """Run the VM or sandbox that ``pause(path)`` saved again, as the same machine, in
    this process or any other. Its directory is used up: it is removed once the VM runs
    (a failed resume leaves it as it was), and a second resume of it fails clearly."""
    with claim_paused(Path(path)) as snap:
        if snap.kind == "sandbox":
            return await resume_sandbox(snap)
        return await start_vm(snap.config, restore_from=snap.path, mac=snap.mac)
