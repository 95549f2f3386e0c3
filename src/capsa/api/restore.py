"""``capsa.restore(path)``: start a saved VM or sandbox again."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from capsa.api.builders import NetworkArg, network_choice, start_vm
from capsa.api.handle import VmHandle
from capsa.api.sandbox import DEFAULT_TIMEOUT, Sandbox, restore_sandbox
from capsa.api.snapshot import read_meta
from capsa.errors import SnapshotError

_KEEP = object()


async def restore(path: str | Path, *, network: NetworkArg | object = _KEEP) -> VmHandle | Sandbox:
    """A running copy of the VM saved in ``path``: a :class:`Sandbox` when a sandbox was
    saved, else a :class:`VmHandle`. ``network`` replaces the saved network (needed when
    the VM was on a ``VirtualNetwork`` object, which only its own process knows)."""
    snap = read_meta(Path(path))
    config = snap.config
    if network is not _KEEP:
        config = dataclasses.replace(config, network=network_choice(network))  # type: ignore[arg-type]
    elif snap.network_kind == "interface":
        raise SnapshotError(
            "this snapshot's VM was on a VirtualNetwork object; pass network= to restore()"
        )
    if snap.kind == "sandbox":
        return await restore_sandbox(snap.path, config, snap.sandbox_timeout or DEFAULT_TIMEOUT)
    # A plain guest has no agent to take a new MAC: it keeps the saved one.
    return await start_vm(config, restore_from=snap.path, mac=snap.mac)
