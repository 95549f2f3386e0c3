"""``VmConfig`` as JSON and back: what a snapshot keeps so that the same machine can be
started again, in this process or another. Every field round-trips; reading checks types
and raises ``ValueError`` on anything malformed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from capsa.net.spec import network_from_json, network_to_json
from capsa.spec.shares import MountMode, Ownership, SharedDir
from capsa.spec.vm import (
    BootConfig,
    CmdlineArg,
    DiskImage,
    ImageFormat,
    KernelCmdline,
    LinuxDirectBoot,
    ResourceConfig,
    UefiBoot,
    VmConfig,
    VsockPortConfig,
)


def config_to_json(config: VmConfig) -> dict[str, Any]:
    return {
        "boot": _boot_to_json(config.boot),
        "cpus": config.resources.cpus,
        "memory_mb": config.resources.memory_mb,
        "disks": [_disk_to_json(d) for d in config.disks],
        "cmdline": [[a.key, a.value] for a in config.cmdline.args],
        "cmdline_override": config.cmdline.override,
        "console": config.console,
        "vsock_ports": [_vsock_to_json(p) for p in config.vsock_ports],
        "shares": [_share_to_json(s) for s in config.shares],
        "timeout": config.timeout,
        "serial_ports": list(config.serial_ports),
        "network": network_to_json(config.network),
        "arch": config.arch,
        "backend": config.backend,
    }


def config_from_json(data: dict[str, Any]) -> VmConfig:
    try:
        cmdline = KernelCmdline(
            args=tuple(
                CmdlineArg(str(k), None if v is None else str(v)) for k, v in data["cmdline"]
            ),
            override=_optional_str(data["cmdline_override"]),
        )
        timeout = data["timeout"]
        return VmConfig(
            boot=_boot_from_json(data["boot"]),
            resources=ResourceConfig(cpus=int(data["cpus"]), memory_mb=int(data["memory_mb"])),
            disks=tuple(_disk_from_json(d) for d in data["disks"]),
            cmdline=cmdline,
            console=bool(data["console"]),
            vsock_ports=tuple(_vsock_from_json(p) for p in data["vsock_ports"]),
            shares=tuple(_share_from_json(s) for s in data["shares"]),
            timeout=None if timeout is None else float(timeout),
            serial_ports=tuple(str(p) for p in data["serial_ports"]),
            network=network_from_json(data["network"]),
            arch=str(data["arch"]),
            backend=_optional_str(data["backend"]),
        )
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"malformed VM configuration: {e!r}") from None


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


def _boot_to_json(boot: BootConfig) -> dict[str, Any]:
    if isinstance(boot, LinuxDirectBoot):
        return {
            "kind": "linux",
            "kernel": str(boot.kernel),
            "initrd": str(boot.initrd) if boot.initrd else None,
            "root_disk": _disk_to_json(boot.root_disk) if boot.root_disk else None,
        }
    return {
        "kind": "uefi",
        "disk": _disk_to_json(boot.disk),
        "efi_variable_store": str(boot.efi_variable_store) if boot.efi_variable_store else None,
        "create_variable_store": boot.create_variable_store,
    }


def _boot_from_json(data: dict[str, Any]) -> BootConfig:
    if data["kind"] == "linux":
        root = data["root_disk"]
        return LinuxDirectBoot(
            data["kernel"], data["initrd"], _disk_from_json(root) if root else None
        )
    if data["kind"] == "uefi":
        store = data["efi_variable_store"]
        return UefiBoot(
            disk=_disk_from_json(data["disk"]),
            efi_variable_store=Path(store) if store else None,
            create_variable_store=bool(data["create_variable_store"]),
        )
    raise ValueError(f"unknown boot kind {data['kind']!r}")


def _disk_to_json(disk: DiskImage) -> dict[str, Any]:
    return {"path": str(disk.path), "format": disk.format.value, "read_only": disk.is_read_only}


def _disk_from_json(data: dict[str, Any]) -> DiskImage:
    disk = DiskImage(data["path"], ImageFormat(data["format"]))
    return disk.read_only() if data["read_only"] else disk


def _vsock_to_json(port: VsockPortConfig) -> dict[str, Any]:
    path = str(port.socket_path) if port.socket_path is not None else None
    return {"port": port.port, "socket_path": path, "connect": port.connect}


def _vsock_from_json(data: dict[str, Any]) -> VsockPortConfig:
    path = data["socket_path"]
    return VsockPortConfig(
        port=int(data["port"]),
        socket_path=Path(path) if path is not None else None,
        connect=bool(data["connect"]),
    )


def _share_to_json(share: SharedDir) -> dict[str, Any]:
    return {
        "host_path": str(share.host_path),
        "tag": share.tag,
        "mode": share.mode.value,
        "ownership": share.ownership.to_arg(),
        "guest_path": share.guest_path,
    }


def _share_from_json(data: dict[str, Any]) -> SharedDir:
    return SharedDir(
        host_path=Path(data["host_path"]),
        tag=str(data["tag"]),
        mode=MountMode(data["mode"]),
        ownership=Ownership.from_arg(str(data["ownership"])),
        guest_path=_optional_str(data["guest_path"]),
    )
