"""Snapshots on disk: a directory with the VM's device state, its RAM, and what capsa needs
to start the same VM again (``snapshot.json``).

    snap = await vm.snapshot("/var/tmp/snap")      # VmHandle or Sandbox
    clone = await capsa.restore("/var/tmp/snap")   # a running VmHandle (or Sandbox)

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
from typing import Any

from capsa._util.reaper import REAPER
from capsa._util.rundir import runtime_base
from capsa.backends.qemu.snapshot import RAM_DIR, has_room
from capsa.config import (
    ClusterPortConfig,
    CmdlineArg,
    DiskImage,
    ImageFormat,
    KernelCmdline,
    LinuxDirectBoot,
    PortForward,
    QemuNat,
    ResourceConfig,
    UserNatConfig,
    VmConfig,
    host_arch,
)
from capsa.errors import SnapshotError, UnsupportedFeature
from capsa.net.policy import NetworkPolicy

FORMAT = 1
META_FILE = "snapshot.json"


@dataclass(frozen=True)
class Snapshot:
    """A saved VM: ``path`` is the directory to pass to :func:`capsa.restore`."""

    path: Path
    kind: str  # "vm" or "sandbox"
    memory_mb: int
    seconds: float  # how long the VM was paused to take it
    config: VmConfig
    sandbox_timeout: float | None = None
    # "interface" when the VM was on a VirtualNetwork object: restore() needs network=.
    network_kind: str | None = None
    mac: str | None = None  # the saved guest's MAC address


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
    meta = {"format": FORMAT, "kind": snap.kind, "memory_mb": snap.memory_mb,
            "created": time.time(), "sandbox_timeout": snap.sandbox_timeout, "mac": snap.mac,
            "config": config_to_json(snap.config)}  # fmt: skip
    (snap.path / META_FILE).write_text(json.dumps(meta, indent=1))


def read_meta(path: Path) -> Snapshot:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        raise SnapshotError(f"{path} is not a capsa snapshot (no {META_FILE})") from None
    except ValueError as e:
        raise SnapshotError(f"{path / META_FILE} is corrupt: {e}") from None
    if meta.get("format") != FORMAT:
        raise SnapshotError(f"snapshot format {meta.get('format')!r} is not {FORMAT}")
    for name in ("state", "ram"):
        if not (path / name).is_file():
            raise SnapshotError(f"snapshot {path} has no {name} file")
    config = config_from_json(meta["config"])
    network = meta["config"].get("network") or {}
    return Snapshot(path, str(meta["kind"]), int(meta["memory_mb"]), 0.0, config,
                    meta.get("sandbox_timeout"), network.get("kind"), meta.get("mac"))  # fmt: skip


# -- VmConfig <-> JSON (what a snapshot needs to start the same machine again) ----------------


def config_to_json(config: VmConfig) -> dict[str, Any]:
    boot = config.boot
    if not isinstance(boot, LinuxDirectBoot):
        raise UnsupportedFeature("only LinuxDirectBoot VMs can be snapshotted")
    return {
        "kernel": str(boot.kernel),
        "initrd": str(boot.initrd) if boot.initrd else None,
        "root_disk": _disk_to_json(boot.root_disk) if boot.root_disk else None,
        "cpus": config.resources.cpus,
        "memory_mb": config.resources.memory_mb,
        "disks": [_disk_to_json(d) for d in config.disks],
        "cmdline": [[a.key, a.value] for a in config.cmdline.args],
        "cmdline_override": config.cmdline.override,
        "console": config.console,
        "timeout": config.timeout,
        "serial_ports": list(config.serial_ports),
        "network": _network_to_json(config.network),
        "arch": config.arch,
    }


def config_from_json(data: dict[str, Any]) -> VmConfig:
    try:
        root = _disk_from_json(data["root_disk"]) if data["root_disk"] else None
        cmdline = KernelCmdline(tuple(CmdlineArg(k, v) for k, v in data["cmdline"]),
                                data["cmdline_override"])  # fmt: skip
        return VmConfig(
            boot=LinuxDirectBoot(data["kernel"], data["initrd"], root),
            resources=ResourceConfig(int(data["cpus"]), int(data["memory_mb"])),
            disks=tuple(_disk_from_json(d) for d in data["disks"]),
            cmdline=cmdline,
            console=bool(data["console"]),
            timeout=data["timeout"],
            serial_ports=tuple(data["serial_ports"]),
            network=_network_from_json(data["network"]),
            arch=str(data.get("arch") or host_arch()),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"snapshot configuration is unreadable: {e!r}") from None


def _disk_to_json(disk: DiskImage) -> dict[str, Any]:
    return {"path": str(disk.path), "format": disk.format.value, "read_only": disk.is_read_only}


def _disk_from_json(data: dict[str, Any]) -> DiskImage:
    return DiskImage(data["path"], ImageFormat(data["format"]), bool(data["read_only"]))


def _network_to_json(net: object) -> dict[str, Any] | None:
    if net is None:
        return None
    if isinstance(net, QemuNat):
        return {"kind": "nat"}
    if isinstance(net, UserNatConfig):
        return {"kind": "user_nat", "subnet": net.subnet, "mtu": net.mtu,
                "host_aliases": [list(a) for a in net.host_aliases],
                "dns_upstream": net.dns_upstream,
                "policy": net.policy.to_json() if net.policy else None,
                "port_forwards": [f.to_json() for f in net.port_forwards]}  # fmt: skip
    if isinstance(net, ClusterPortConfig):
        return {"kind": "cluster", "name": net.cluster_name, "static_ip": net.static_ip,
                "port_forwards": [f.to_json() for f in net.port_forwards]}  # fmt: skip
    return {"kind": "interface"}  # a VirtualNetwork object: only the running process has it


def _network_from_json(
    data: dict[str, Any] | None,
) -> UserNatConfig | QemuNat | ClusterPortConfig | None:
    if data is None or data["kind"] == "interface":
        return None
    kind = data["kind"]
    forwards = tuple(PortForward.from_json(f) for f in data.get("port_forwards", ()))
    if kind == "nat":
        return QemuNat()
    if kind == "user_nat":
        policy = NetworkPolicy.from_json(data["policy"]) if data["policy"] else None
        return UserNatConfig(data["subnet"], int(data["mtu"]),
                             tuple((str(g), str(h)) for g, h in data["host_aliases"]),
                             data["dns_upstream"], policy, forwards)  # fmt: skip
    if kind == "cluster":
        return ClusterPortConfig(data["name"], data["static_ip"], forwards)
    raise SnapshotError(f"unknown network kind {kind!r} in snapshot")
