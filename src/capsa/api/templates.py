"""Templates: every sandbox starts as a copy-on-write restore of a snapshot of its *base*.

A sandbox's base is everything that shapes its guest before the agent's hello: kernel,
initrd, disks (an OCI image's root), architecture, CPUs, memory, kernel command line and
device slots (NIC and its MTU, serial ports, shares, vsock). Sandboxes with the same base
differ only in what the agent's ``setup`` request gives them afterwards, so one snapshot of
the base, taken at the hello and before any user code ran, serves them all.

Templates live in ``$XDG_CACHE_HOME/capsa/templates/<key>/``; the key hashes the base, the
files' identities and the versions of capsa and of the hypervisor. The first sandbox of a
base makes the template (one maker per key across processes: a lock file; the others wait
and then restore). A template is checked before each use (format, key, checksums of its
small files, size and time of its RAM file); a bad one is removed and made again, and a
restore that the hypervisor refuses also sends the template back to be made again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from capsa.api.agent_channel import AgentChannel
from capsa.api.guest_setup import GuestSetup, mounts, set_up_booted
from capsa.api.handle import VmHandle
from capsa.api.sandbox_handle import Sandbox, launch_sandbox, restore_template
from capsa.api.snapshot import META_FILE as SNAPSHOT_META
from capsa.backends.registry import select_backend
from capsa.errors import CapsaError, SnapshotError
from capsa.net.spec import NetworkPort, capped
from capsa.spec.codec import config_to_json
from capsa.spec.vm import LinuxDirectBoot, VmConfig

log = logging.getLogger("capsa.template")

CAPSA_VERSION = "0.1.0"
FORMAT = 1
META_FILE = "template.json"
RAM_FILE = "ram"  # the one large file: checked by size and time, not by checksum
LOCK_POLL = 0.05


GUEST_MARK = "/run/capsa/template"  # in every guest made from a template: its nonce


def templates_dir() -> Path:
    """``$CAPSA_TEMPLATE_DIR``, else ``$XDG_CACHE_HOME/capsa/templates``."""
    if os.environ.get("CAPSA_TEMPLATE_DIR"):
        return Path(os.environ["CAPSA_TEMPLATE_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "capsa" / "templates"


@dataclass(frozen=True)
class TemplateInfo:
    """One template on disk, as ``capsa template ls`` shows it."""

    key: str
    path: Path
    created: float
    last_used: float
    size_bytes: int
    description: str
    identity: dict[str, str]
    nonce: str  # also in GUEST_MARK inside every sandbox made from it


@dataclass(frozen=True)
class TemplatePlan:
    """Whether a sandbox can start from a template, and which one."""

    key: str | None
    reason: str = ""  # why not, when key is None
    description: str = ""
    identity: dict[str, str] = dataclasses.field(default_factory=dict)


def _file_identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _base_json(config: VmConfig, mtu: int | None, datagram: bool) -> dict[str, object]:
    """The base of ``config``: what the guest sees before its set-up. The network becomes
    its NIC (which network it is on, and the address, arrive with the set-up)."""
    data = config_to_json(dataclasses.replace(config, network=None, timeout=None))
    data["nic"] = None if mtu is None else {"mtu": mtu, "datagram": datagram}
    # Which folders are shared is set-up; the devices and where the guest mounts them
    # (the template is saved with its shares mounted) are base.
    data["shares"] = [[s.tag, s.guest_path, s.mode.value] for s in config.shares]
    data["vsock"] = bool(config.vsock_ports)
    data.pop("vsock_ports", None)
    return data


def _files(config: VmConfig) -> list[Path]:
    files = [d.path for d in config.all_disks]
    if isinstance(config.boot, LinuxDirectBoot):
        files.append(config.boot.kernel)
        if config.boot.initrd is not None:
            files.append(config.boot.initrd)
    return files


def _describe(config: VmConfig) -> str:
    parts = [config.arch, f"{config.resources.cpus} cpu", f"{config.resources.memory_mb} MiB"]
    if isinstance(config.boot, LinuxDirectBoot) and config.boot.initrd is not None:
        parts.append(config.boot.initrd.name)
    parts += [f"disk {d.path.name}" for d in config.all_disks]
    if config.network is not None:
        parts.append("nic")
    if config.shares:
        parts.append(f"{len(config.shares)} share(s)")
    if config.vsock_ports:
        parts.append("vsock")
    return ", ".join(parts)


def current_identity(arch: str, backend: str | None = None) -> dict[str, str]:
    """What templates made now for ``arch`` guests depend on: capsa, the template format,
    the hypervisor build and accelerator."""
    state = select_backend(backend).state_identity(arch)
    return {"capsa": CAPSA_VERSION, "format": str(FORMAT), "arch": arch, **state}


def plan_template(config: VmConfig) -> TemplatePlan:
    """The template a sandbox running ``config`` starts from, or why it boots cold."""
    backend = select_backend(config.backend)
    reason = backend.snapshot_blocker(config)
    if (
        reason is None
        and config.network is not None
        and not isinstance(config.network, NetworkPort)
    ):
        reason = "QEMU's own NAT keeps guest-visible state a template cannot renew"
    if reason is not None:
        return TemplatePlan(key=None, reason=reason)
    identity = current_identity(config.arch, config.backend)
    mtu = None
    needs = backend.nic_needs()
    if isinstance(config.network, NetworkPort):
        mtu = capped(config.network, needs.max_mtu).network.mtu
    try:
        files = {str(p): _file_identity(p) for p in _files(config)}
    except OSError as e:
        return TemplatePlan(key=None, reason=f"cannot read {e.filename}: {e.strerror}")
    base = {
        "identity": identity,
        "base": _base_json(config, mtu, needs.datagram),
        "files": files,
    }
    digest = hashlib.sha256(json.dumps(base, sort_keys=True).encode()).hexdigest()[:32]
    return TemplatePlan(key=digest, description=_describe(config), identity=identity)


class MakerLock:
    """A held lock file (flock: also excludes other holders in this process)."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    async def release_async(self) -> None:
        self.release()


class TemplateStore:
    """The template directory: find, make, list and remove templates."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or templates_dir()

    def path(self, key: str) -> Path:
        return self.root / key

    # -- use --------------------------------------------------------------------------

    def find(self, key: str) -> Path | None:
        """The template for ``key`` if it is present and intact; a bad one is removed."""
        path = self.path(key)
        if not path.exists():
            return None
        problem = _check(path, key)
        if problem is not None:
            log.warning("template %s is unusable (%s): making it again", key, problem)
            self.remove(key)
            return None
        with contextlib.suppress(OSError):
            os.utime(path / META_FILE)  # last use, for `capsa template prune`
        return path

    async def lock(self, key: str) -> MakerLock:
        """The maker's lock for ``key``, held (polled, so a cancelled waiter holds nothing)."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.root / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return MakerLock(fd)
                except BlockingIOError:
                    await asyncio.sleep(LOCK_POLL)
        except BaseException:
            os.close(fd)
            raise

    def scratch(self, key: str) -> Path:
        """Where a template is written before it is moved into place in one rename."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.root / f".{key}.{os.getpid()}.tmp"
        shutil.rmtree(path, ignore_errors=True)
        return path

    def publish(self, scratch: Path, plan: TemplatePlan, nonce: str) -> Path:
        assert plan.key is not None
        (scratch / SNAPSHOT_META).unlink(missing_ok=True)  # not a snapshot to restore()
        meta = {
            "format": FORMAT,
            "key": plan.key,
            "nonce": nonce,
            "created": time.time(),
            "description": plan.description,
            "identity": plan.identity,
            "files": _checksums(scratch),
        }
        (scratch / META_FILE).write_text(json.dumps(meta, indent=1))
        final = self.path(plan.key)
        self.remove(plan.key)
        os.rename(scratch, final)
        return final

    # -- management -------------------------------------------------------------------

    def templates(self) -> list[TemplateInfo]:
        infos = []
        for path in sorted(self.root.glob("*")) if self.root.is_dir() else []:
            if path.is_dir() and not path.name.startswith("."):
                infos.append(_info(path))
        return infos

    def remove(self, key: str) -> bool:
        path = self.path(key)
        if not path.exists():
            return False
        # Out of sight in one rename, then deleted: a restore that already opened the
        # files keeps them; no one finds a half-deleted template.
        doomed = self.root / f".{key}.{os.getpid()}.{time.monotonic_ns()}.rm"
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            return False
        shutil.rmtree(doomed, ignore_errors=True)
        return True

    def prune(self, *, unused_days: float) -> list[TemplateInfo]:
        """Remove templates unused for ``unused_days``, made by another capsa, hypervisor
        build or accelerator than this one would use now, or damaged; also leftovers of
        makers that died. Returns what was removed."""
        removed = []
        limit = time.time() - unused_days * 86400
        for info in self.templates():
            foreign = info.identity != _identity_now(info.identity)
            stale = info.last_used < limit or foreign or _check(info.path, info.key) is not None
            if stale and self.remove(info.key):
                removed.append(info)
        for leftover in self.root.glob(".*.tmp") if self.root.is_dir() else []:
            if leftover.stat().st_mtime < time.time() - 3600:
                shutil.rmtree(leftover, ignore_errors=True)
        return removed


def _identity_now(made: dict[str, str]) -> dict[str, str] | None:
    try:
        return current_identity(made.get("arch", ""))
    except CapsaError:  # no hypervisor for that architecture any more
        return None


def _checksums(path: Path) -> dict[str, object]:
    sums: dict[str, object] = {}
    for item in sorted(path.iterdir()):
        if item.name == META_FILE:
            continue
        st = item.stat()
        if item.name == RAM_FILE:
            sums[item.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        else:
            sums[item.name] = {"sha256": hashlib.sha256(item.read_bytes()).hexdigest()}
    return sums


def _check(path: Path, key: str) -> str | None:
    """What is wrong with the template in ``path`` (None: nothing)."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError) as e:
        return f"no readable {META_FILE}: {e}"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("key") != key:
        return "another format or key"
    try:
        if _checksums(path) != meta.get("files"):
            return "its files do not match their checksums"
    except OSError as e:
        return str(e)
    return None


def _info(path: Path) -> TemplateInfo:
    try:
        meta = json.loads((path / META_FILE).read_text())
        used = (path / META_FILE).stat().st_mtime
    except (OSError, ValueError):
        meta, used = {}, 0.0
    size = sum(f.stat().st_blocks * 512 for f in path.iterdir() if f.is_file())
    identity = meta.get("identity") if isinstance(meta.get("identity"), dict) else {}
    return TemplateInfo(
        key=path.name,
        path=path,
        created=float(meta.get("created", 0.0)),
        last_used=used,
        size_bytes=size,
        description=str(meta.get("description", "?")),
        identity={str(k): str(v) for k, v in identity.items()},
        nonce=str(meta.get("nonce", "")),
    )


# -- starting sandboxes ---------------------------------------------------------------------


async def start_sandbox(
    config: VmConfig,
    setup: GuestSetup,
    timeout: float,
    *,
    use_template: bool = True,
    store: TemplateStore | None = None,
) -> Sandbox:
    """A sandbox for ``config`` + ``setup``: restored from its template when it can be,
    making the template first if there is none; booted cold otherwise."""
    from capsa.api.sandbox_handle import boot_sandbox

    plan = plan_template(config) if use_template else TemplatePlan(None, "template(False)")
    if plan.key is None:
        log.debug("sandbox boots cold: %s", plan.reason)
        return await boot_sandbox(config, setup, timeout)
    store = store or TemplateStore()
    for _ in range(2):
        path = store.find(plan.key)
        if path is None:
            made = await _make_or_wait(store, plan, config, setup, timeout)
            if made is not None:
                return made
            path = store.find(plan.key)
            if path is None:  # the maker failed; it said why
                return await boot_sandbox(config, setup, timeout)
        try:
            return await restore_template(path, config, setup, timeout)
        except SnapshotError as e:
            log.warning("template %s could not be restored (%s): making it again", plan.key, e)
            store.remove(plan.key)
    return await boot_sandbox(config, setup, timeout)


async def _make_or_wait(
    store: TemplateStore, plan: TemplatePlan, config: VmConfig, setup: GuestSetup, timeout: float
) -> Sandbox | None:
    """Take the maker's lock for the template. If another process made it meanwhile,
    return None (restore it); otherwise boot this sandbox cold, save it at its hello as
    the template, then set it up: the maker's sandbox is the template's first user."""
    assert plan.key is not None
    lock = await store.lock(plan.key)
    try:
        if store.find(plan.key) is not None:
            lock.release()
            return None
        log.info("making a template for this sandbox (first use): %s", plan.description)

        async def prepare(channel: AgentChannel, handle: VmHandle) -> None:
            try:
                await channel.wait_ready()
                premount = _premount(config, setup)
                if premount:
                    # Mounted before the snapshot: copies find their shares mounted (the
                    # FUSE session moves to their own folders with the device state) and
                    # their image root in place (its disk is part of the template's key).
                    await channel.request("mount", b"", **premount)
                nonce = os.urandom(16).hex()
                await _warm_up(channel, nonce)
                await _save_template(store, plan, handle, nonce)
            finally:
                lock.release()
            await set_up_booted(channel, setup, config)

        sandbox = await launch_sandbox(config, timeout, prepare)
    except BaseException:
        lock.release()
        raise
    # A prepare task cancelled before its first step never reaches its finally.
    sandbox.vm.before_teardown(lock.release_async)
    return sandbox


async def _warm_up(channel: AgentChannel, nonce: str) -> None:
    """Run one command before the template is saved, so every sandbox made from it finds
    the agent's process machinery imported and the shell in the page cache (under
    emulation a first command otherwise costs ten times a later one). It leaves the
    template's nonce in the guest: proof, for whoever looks, of where a sandbox came from."""
    script = f'mkdir -p "${{1%/*}}" && echo {nonce} > "$1"'
    with contextlib.suppress(CapsaError):
        await channel.request("exec", b"", argv=["/bin/sh", "-c", script, "sh", GUEST_MARK])


async def _save_template(
    store: TemplateStore, plan: TemplatePlan, handle: VmHandle, nonce: str
) -> None:
    """Snapshot the booted, not yet set-up guest as the template. A failure costs only
    the template (the sandbox runs on, and later ones boot cold until one is made)."""
    scratch = store.scratch(str(plan.key))
    started = time.perf_counter()
    try:
        await handle.snapshot_as(scratch, "template", resume=True)
        store.publish(scratch, plan, nonce)
        log.info("template %s made in %.2fs", plan.key, time.perf_counter() - started)
    except (CapsaError, OSError) as e:
        log.warning("no template for this sandbox: %s", e)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _premount(config: VmConfig, setup: GuestSetup) -> dict[str, object]:
    """What a template maker mounts before saving: shares, and an image root."""
    fields: dict[str, object] = {}
    if config.shares:
        fields["mounts"] = mounts(config)
    container = setup.container
    if container is not None:
        fields["root"] = {k: container[k] for k in ("disk", "disk_bytes") if k in container}
    return fields
