"""Saving and loading a VM's state through QEMU migration (see spike §4).

Guest RAM lives in a file from the start (``memory-backend-file``, shared, on tmpfs), so a
snapshot is the device state (``migrate`` to ``exec:cat``, with ``x-ignore-shared`` it is a
few tens of KiB) plus a sparse copy of the RAM file taken while the VM is paused. A
restore maps the snapshot's RAM file privately (copy-on-write): nothing is copied, and
every clone of one snapshot shares the unchanged pages through the page cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from capsa._util.host import RAM_DIR, has_room, share_transport
from capsa._util.privileges import is_capsa_id, new_identity
from capsa.backends.qemu.probe import QemuInfo
from capsa.errors import SnapshotError
from capsa.spec.vm import LinuxDirectBoot, VmConfig

STATE_FILE = "state"
RAM_FILE = "ram"
QEMU_FILE = "qemu.json"  # which QEMU wrote the state: only that one can read it back
IGNORE_SHARED = "x-ignore-shared"
MIGRATE_TIMEOUT = 120.0
# vhost-user-fs carries its back end's state in the migration stream from QEMU 8.2 on.
SHARE_MIGRATION = (8, 2, 0)
# QEMU 7.2 throttles migration to 128 MiB/s by default; a local file needs no limit.
MAX_BANDWIDTH = 1 << 40

Qmp = Callable[..., Awaitable[object]]
# Hands QEMU an open file under a name (QMP getfd): QEMU's sandbox forbids it to spawn
# `cat`, and it may not be allowed to open the snapshot's files itself.
PassFd = Callable[[int, str], Awaitable[None]]


def uses_vhost_user(config: VmConfig) -> bool:
    """Whether a VM has back ends (vsock, virtio-fs) that map its RAM."""
    return bool(config.vsock_ports) or (bool(config.shares) and share_transport() != "9p")


def snapshot_blocker(config: VmConfig, info: QemuInfo) -> str | None:
    """Why a VM with ``config`` cannot be snapshotted under the QEMU ``info`` (None: it can)."""
    if IGNORE_SHARED not in info.migration_capabilities:
        return f"{info.describe()} lacks the {IGNORE_SHARED} migration capability"
    if not isinstance(config.boot, LinuxDirectBoot):
        return "only LinuxDirectBoot VMs can be snapshotted"
    if config.vsock_ports:
        return (
            "its vsock ports use vhost-user-vsock, which QEMU marks non-migratable "
            f"(so does {info.describe()})"
        )
    if config.shares:
        tags = ", ".join(repr(s.tag) for s in config.shares)
        if share_transport() == "9p":
            return f"its shared folders ({tags}) use virtio-9p, which blocks migration"
        if info.version < SHARE_MIGRATION:
            return (
                f"its shared folders ({tags}) use vhost-user-fs, which QEMU migrates from "
                f"8.2 on; this is {info.describe()}"
            )
    writable = [str(d.path) for d in config.all_disks if not d.is_read_only]
    if writable:
        return (
            f"its writable disks ({', '.join(writable)}) would not match the saved "
            "state; attach them read-only"
        )
    return None


def ram_directory(mem_mb: int) -> Path | None:
    """A private tmpfs directory for a VM's RAM file, or None when tmpfs has no room (the
    VM then runs on anonymous memory and cannot be snapshotted)."""
    if not has_room(RAM_DIR, mem_mb, 64):
        return None
    return Path(tempfile.mkdtemp(prefix=f"capsa-ram-{os.getpid()}-", dir=RAM_DIR))


async def _wait_migration(qmp: Qmp, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + MIGRATE_TIMEOUT
    while True:
        info: Any = await qmp("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise SnapshotError(f"{what} failed: {info.get('error-desc', status)}")
        if loop.time() > deadline:
            raise SnapshotError(f"{what} did not finish within {MIGRATE_TIMEOUT}s")
        await asyncio.sleep(0.005)


async def _ignore_shared_ram(qmp: Qmp) -> None:
    await qmp(
        "migrate-set-capabilities", capabilities=[{"capability": IGNORE_SHARED, "state": True}]
    )


async def save_state(
    qmp: Qmp, pass_fd: PassFd, info: QemuInfo, ram_file: Path | None, dest: Path, mem_mb: int
) -> None:
    """Pause the VM and write its device state and RAM into ``dest`` (the VM stays paused).

    ``ram_file`` None: the RAM is not shared (a restored VM), so it travels in the state
    stream and the snapshot's RAM file is left empty (all holes)."""
    await qmp("stop")
    (dest / QEMU_FILE).write_text(json.dumps(_qemu_identity(info)))
    await _ignore_shared_ram(qmp)
    await qmp("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH})
    fd = os.open(dest / STATE_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        await pass_fd(fd, "capsa-state")
        await qmp("migrate", uri="fd:capsa-state")
        await _wait_migration(qmp, "saving the VM state")
    finally:
        os.close(fd)
    if ram_file is not None:
        await asyncio.to_thread(copy_sparse, ram_file, dest / RAM_FILE)
    else:
        with open(dest / RAM_FILE, "wb") as f:
            f.truncate(mem_mb << 20)
    # Guest memory holds the guest's secrets: only its owner reads it.
    os.chmod(dest / RAM_FILE, 0o600)


def snapshot_group(ram: Path, writable: bool) -> int:
    """The group through which confined QEMUs restoring this snapshot read its RAM file
    (and write it, for QEMUs older than 8.2 that cannot map a read-only file privately):
    given to the file the first time, under a lock, as restores may run at once."""
    with open(ram, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        st = os.fstat(f.fileno())
        # Only a group capsa made for this purpose: never widen a group of the user's.
        group = st.st_gid if is_capsa_id(st.st_gid) else new_identity().gid
        os.fchown(f.fileno(), -1, group)
        os.fchmod(f.fileno(), 0o660 if writable else 0o640)
    return group


def _qemu_identity(info: QemuInfo) -> dict[str, str]:
    return {"version": info.version_text, "package": info.package}


def check_restorable(source: Path, info: QemuInfo) -> None:
    """Refuse a snapshot whose state another QEMU wrote: device state formats (and the
    unversioned microvm machine) may differ between releases and builds."""
    try:
        saved = json.loads((source / QEMU_FILE).read_text())
    except FileNotFoundError:
        raise SnapshotError(f"snapshot {source} does not say which QEMU made it") from None
    except (OSError, ValueError) as e:
        raise SnapshotError(f"{source / QEMU_FILE} is unreadable: {e}") from None
    if saved != _qemu_identity(info):
        made = f"QEMU {saved.get('version')} ({saved.get('package')})"
        raise SnapshotError(
            f"snapshot {source} was made by {made}; this is {info.describe()}. Restore it "
            "with the QEMU that made it (CAPSA_QEMU can point at it)"
        )


async def load_state(qmp: Qmp, pass_fd: PassFd, source: Path) -> None:
    """Load a snapshot's device state into a QEMU started with ``-incoming defer``, then run."""
    await _ignore_shared_ram(qmp)
    fd = os.open(source / STATE_FILE, os.O_RDONLY | os.O_CLOEXEC)
    try:
        await pass_fd(fd, "capsa-state")
        await qmp("migrate-incoming", uri="fd:capsa-state")
        await _wait_migration(qmp, "loading the VM state")
    finally:
        os.close(fd)
    await qmp("cont")


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy ``src`` keeping its holes (guest RAM is mostly untouched zero pages)."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fin.fileno(), offset, os.SEEK_DATA)
            except OSError:
                break  # no data after offset: the rest is a hole
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            _copy_range(fin.fileno(), fout.fileno(), start, end)
            offset = end
        fout.truncate(size)


def _copy_range(fin: int, fout: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        try:
            n = os.copy_file_range(fin, fout, end - pos, pos, pos)
        except OSError:  # across file systems (tmpfs to disk) since Linux 5.19
            os.lseek(fout, pos, os.SEEK_SET)
            n = os.sendfile(fout, fin, pos, end - pos)
        if n == 0:
            raise SnapshotError("the RAM file shrank while it was being saved")
        pos += n


def remove_tree(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(path)
