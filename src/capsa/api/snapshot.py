"""Snapshots on disk: a directory with the VM's device state, its RAM, and what capsa needs
to start the same VM again (``snapshot.json``).

    snap = await vm.snapshot("/var/tmp/snap")      # VmHandle or Sandbox
    clone = await capsa.restore("/var/tmp/snap")   # a running VmHandle (or Sandbox)

    await sandbox.pause("/var/tmp/paused")         # saved, then stopped
    same = await capsa.resume("/var/tmp/paused")   # the same machine, in any process

A restore maps the snapshot's RAM copy-on-write, so it copies no guest memory and any
number of clones share it. Each restored VM gets a new MAC address; a restored sandbox
also gets a reseeded RNG, the current time and a fresh DHCP lease from its agent.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from capsa._util.host import RAM_DIR, has_room
from capsa._util.reaper import REAPER
from capsa._util.rundir import runtime_base
from capsa.errors import SnapshotError
from capsa.spec.codec import config_from_json, config_to_json
from capsa.spec.vm import VmConfig

FORMAT = 2  # 2: the whole VmConfig, networks as data (restore needs no network=)
META_FILE = "snapshot.json"
# A paused VM's meta file while a resume() owns it: one resume at a time, and the name
# says what happened if that resume was interrupted.
CLAIMED_FILE = "snapshot.json.resuming"


@dataclass(frozen=True)
class Snapshot:
    """A saved VM: ``path`` is the directory to pass to :func:`capsa.restore`."""

    path: Path
    kind: str  # "vm" or "sandbox"
    memory_mb: int
    seconds: float  # how long the VM was paused to take it
    config: VmConfig
    sandbox_timeout: float | None = None
    mac: str | None = None  # the saved guest's MAC address
    paused: bool = False  # saved by pause(): the VM itself, to go on with resume()


@contextlib.contextmanager
def snapshot_scratch(memory_mb: int) -> Iterator[Path]:
    """A private directory for a short-lived snapshot (fork, pools): on tmpfs when the RAM
    copy fits there, so clones map memory rather than a disk file; removed afterwards."""
    base = RAM_DIR if has_room(RAM_DIR, memory_mb, 256) else runtime_base()
    path = Path(tempfile.mkdtemp(prefix=f"capsa-snap-{os.getpid()}-", dir=base))
    REAPER.watch_path(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        REAPER.unwatch_path(path)


def write_meta(snap: Snapshot) -> None:
    meta = {
        "format": FORMAT,
        "kind": snap.kind,
        "memory_mb": snap.memory_mb,
        "created": time.time(),
        "sandbox_timeout": snap.sandbox_timeout,
        "mac": snap.mac,
        "paused": snap.paused,
        "config": config_to_json(snap.config),
    }
    (snap.path / META_FILE).write_text(json.dumps(meta, indent=1))


def read_meta(path: Path) -> Snapshot:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        if (path / CLAIMED_FILE).exists():
            raise SnapshotError(
                f"{path} is being resumed (if that resume was cut short, rename "
                f"{CLAIMED_FILE} back to {META_FILE})"
            ) from None
        raise SnapshotError(f"{path} is not a capsa snapshot (no {META_FILE})") from None
    except ValueError as e:
        raise SnapshotError(f"{path / META_FILE} is corrupt: {e}") from None
    if meta.get("format") != FORMAT:
        raise SnapshotError(f"snapshot format {meta.get('format')!r} is not {FORMAT}")
    for name in ("state", "ram"):
        if not (path / name).is_file():
            raise SnapshotError(f"snapshot {path} has no {name} file")
    try:
        config = config_from_json(meta["config"])
        timeout = meta.get("sandbox_timeout")
        mac = meta.get("mac")
        return Snapshot(
            path=path,
            kind=str(meta["kind"]),
            memory_mb=int(meta["memory_mb"]),
            seconds=0.0,
            config=config,
            sandbox_timeout=None if timeout is None else float(timeout),
            mac=None if mac is None else str(mac),
            paused=meta.get("paused") is True,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"{path / META_FILE} is unreadable: {e}") from None


@contextlib.contextmanager
def claim_paused(path: Path) -> Iterator[Snapshot]:
    """The paused VM saved in ``path``, owned by the caller: a second claim fails until
    this one ends. The directory goes once the body succeeds (the VM runs again, from its
    own copy of what it needed); a failed body gives it back untouched."""
    snap = read_meta(path)
    if not snap.paused:
        raise SnapshotError(
            f"{path} holds a snapshot, not a paused VM (its source may still run): "
            "capsa.restore() starts copies of it"
        )
    claimed = path / CLAIMED_FILE
    try:
        os.rename(path / META_FILE, claimed)
    except FileNotFoundError:
        raise SnapshotError(f"{path} is being resumed") from None
    try:
        yield snap
    except BaseException:
        os.rename(claimed, path / META_FILE)
        raise
    shutil.rmtree(path, ignore_errors=True)
