"""The owner's side of the device helpers: start the vsock back end of one VM, or the
virtio-fs back end of one share, and return once it listens for QEMU."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from capsa._util.helper import HelperProcess
from capsa._util.privileges import Identity
from capsa.spec.shares import OwnershipMode, SharedDir


async def start_vsock_device(
    vhost_socket: Path,
    ports: Sequence[tuple[int, Path, bool]],
    guest_cid: int = 3,
    identity: Identity | None = None,
) -> HelperProcess:
    """The vsock helper (:mod:`capsa.devices.vsock_main`), every socket listening (and,
    with ``identity``, running as it: it needs no file access once its sockets are bound)."""
    args = ["--vhost-socket", str(vhost_socket), "--guest-cid", str(guest_cid)]
    for port, path, connect in ports:
        args += ["--port", f"{port}:{'connect' if connect else 'listen'}:{path}"]
    return await HelperProcess.start("capsa.devices.vsock_main", args, "vsock device", identity)


def share_identity(share: SharedDir) -> Identity:
    """Whom a share's helper runs as: the folder's owner (so what the guest creates belongs
    to whoever owns the share on the host), with only the capabilities to reach every file
    below it, and to give files away when the guest's chown is real (passthrough)."""
    st = os.stat(share.host_path)
    keep = {"dac_override", "dac_read_search", "fowner"}
    if share.ownership.mode is OwnershipMode.PASSTHROUGH:
        keep.add("chown")
    return Identity(uid=st.st_uid, gid=st.st_gid, keep=frozenset(keep))


async def start_virtio_fs_device(
    vhost_socket: Path, share: SharedDir, identity: Identity | None = None
) -> HelperProcess:
    """The virtio-fs helper (:mod:`capsa.devices.virtio_fs_main`) for ``share`` (as
    ``identity``, when given)."""
    args = ["--vhost-socket", str(vhost_socket), "--root", str(share.host_path)]
    args += ["--ownership", share.ownership.to_arg()]
    if share.read_only:
        args.append("--read-only")
    what = f"virtio-fs device for share {share.tag!r}"
    return await HelperProcess.start("capsa.devices.virtio_fs_main", args, what, identity)
