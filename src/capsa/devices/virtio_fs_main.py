"""One shared folder's virtio-fs back end as a helper process.

    python -m capsa.devices.virtio_fs_main --vhost-socket PATH --root DIR \\
        [--read-only] [--ownership squash:0:0]

The guest's requests are hostile input handled outside the user's process; a crash here
loses one share, never the caller. Before serving, the helper confines itself with
Landlock where the kernel has it (:func:`confine_to_share`): the shared folder (read-only
for a read-only share) and read access to what Python needs to keep running; nothing else
is writable, and no TCP socket can be bound or connected.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import sys
from collections.abc import Sequence
from pathlib import Path

from capsa._util import landlock
from capsa._util.helper import run_helper, say_ready, stop_event
from capsa._util.landlock import Fs, LandlockStatus, Rule
from capsa.devices.shared_fs import SharedFs
from capsa.devices.vhost_server import listen_unix, remove_paths, serve_vhost_user
from capsa.devices.virtio_fs import VirtioFsDevice
from capsa.spec.shares import Ownership

log = logging.getLogger("capsa.virtio_fs")

SHARE_READ = landlock.READ
# Everything a share's requests do to its tree. Not EXECUTE (the helper runs nothing),
# not MAKE_CHAR/MAKE_BLOCK/IOCTL_DEV (a share never holds a device node the guest made
# or opens one it finds): the kernel then refuses those even if our own checks failed.
SHARE_READ_WRITE = (
    SHARE_READ
    | Fs.WRITE_FILE
    | Fs.TRUNCATE
    | Fs.MAKE_REG
    | Fs.MAKE_DIR
    | Fs.MAKE_SYM
    | Fs.MAKE_FIFO
    | Fs.MAKE_SOCK
    | Fs.REMOVE_FILE
    | Fs.REMOVE_DIR
    | Fs.REFER
)


def raise_fd_limit() -> None:
    """Every inode the guest kernel holds is an open descriptor here (until it forgets it),
    so a 1024 soft limit would fail an ``ls -lR`` of a big tree: take what we may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard
    if os.geteuid() == 0:
        with contextlib.suppress(OSError, ValueError):
            wanted = max(hard, min(1 << 20, int(Path("/proc/sys/fs/nr_open").read_text())))
    for limit in (wanted, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, limit), limit))
            return
        except (OSError, ValueError):
            continue


def share_rules(root_fd: int, read_only: bool) -> list[Rule]:
    """The share's tree, named by the descriptor ``SharedFs`` holds (whatever its path
    means by now), and what the interpreter needs."""
    share = Rule(Path(f"/proc/self/fd/{root_fd}"), SHARE_READ if read_only else SHARE_READ_WRITE)
    return [share, *landlock.python_runtime_rules()]


def confine_to_share(fs: SharedFs) -> LandlockStatus:
    """Confine this process to ``fs``'s folder for good (before any thread starts, so
    every worker inherits it); says whether Landlock could."""
    status = landlock.confine(share_rules(fs.root.fd, fs.read_only))
    log.info("%s", status, extra={"capsa_landlock": status.enabled})
    return status


async def serve(
    vhost_path: Path, root: Path, read_only: bool, ownership: Ownership, identity: str | None
) -> None:
    # Modes arrive already masked by the guest's umask; ours must not mask them again.
    os.umask(0)
    raise_fd_limit()
    fs = SharedFs(root, read_only, ownership)
    listener = listen_unix(vhost_path)
    try:
        confine_to_share(fs)
        stop = stop_event()
        say_ready(identity)
        device = VirtioFsDevice(fs)
        try:
            await serve_vhost_user(listener, device, stop)
        finally:
            device.close()
    finally:
        listener.close()
        fs.close()
        remove_paths([vhost_path])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="capsa virtio-fs device")
    parser.add_argument("--vhost-socket", type=Path, required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--read-only", action="store_true")
    parser.add_argument("--ownership", type=Ownership.from_arg, default=Ownership.squash_to_root())
    parser.add_argument("--identity", default=None, help="uid:gid:groups:caps to run as")
    args = parser.parse_args(argv)
    served = serve(args.vhost_socket, args.root, args.read_only, args.ownership, args.identity)
    # INFO: the owner learns whether this share runs under Landlock.
    return run_helper(served, level=logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
