"""The owner's side of the device helpers: start the vsock back end of one VM, or the
virtio-fs back end of one share, and return once it listens for QEMU."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from capsa._util.helper import HelperProcess
from capsa.spec.shares import SharedDir


async def start_vsock_device(
    vhost_socket: Path, ports: Sequence[tuple[int, Path, bool]], guest_cid: int = 3
) -> HelperProcess:
    """The vsock helper (:mod:`capsa.devices.vsock_main`), every socket listening."""
    args = ["--vhost-socket", str(vhost_socket), "--guest-cid", str(guest_cid)]
    for port, path, connect in ports:
        args += ["--port", f"{port}:{'connect' if connect else 'listen'}:{path}"]
    return await HelperProcess.start("capsa.devices.vsock_main", args, "vsock device")


async def start_virtio_fs_device(vhost_socket: Path, share: SharedDir) -> HelperProcess:
    """The virtio-fs helper (:mod:`capsa.devices.virtio_fs_main`) for ``share``."""
    args = ["--vhost-socket", str(vhost_socket), "--root", str(share.host_path)]
    args += ["--ownership", share.ownership.to_arg()]
    if share.read_only:
        args.append("--read-only")
    what = f"virtio-fs device for share {share.tag!r}"
    return await HelperProcess.start("capsa.devices.virtio_fs_main", args, what)
