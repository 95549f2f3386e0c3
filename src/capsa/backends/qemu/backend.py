"""The QEMU backend: one QEMU process per VM, controlled over QMP.

Every channel to QEMU (serial console, QMP, virtio-serial ports) is one end of a
socketpair handed to QEMU as an inherited fd: nothing can connect before us, no boot
output is lost, and there are no socket files to leak.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import socket
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient

from capsa._util.host import RAM_DIR, has_room, host_arch, share_transport
from capsa._util.privileges import Identity, confinement, give, new_identity, setpriv_argv
from capsa._util.reaper import REAPER
from capsa._util.rundir import RunDir
from capsa.backends.base import BackendVm, Capabilities, ExitInfo, NetworkPlug, NicNeeds
from capsa.backends.qemu.accel import Accel, choose_accel, host_tsc_khz, native_accel
from capsa.backends.qemu.cmdline import (
    Firmware,
    HostFacts,
    build_argv,
    guest_defaults,
    machine_name,
)
from capsa.backends.qemu.handover import FD_PATH, Handover
from capsa.backends.qemu.probe import (
    PACKAGES,
    QemuInfo,
    missing_parts,
    probe,
    require_supported,
)
from capsa.backends.qemu.snapshot import (
    RAM_FILE,
    check_restorable,
    copy_sparse,
    load_state,
    ram_directory,
    remove_tree,
    save_state,
    snapshot_blocker,
    snapshot_group,
    uses_vhost_user,
)
from capsa.errors import (
    BackendUnavailable,
    InvalidConfig,
    SnapshotError,
    StartFailed,
    UnsupportedFeature,
)
from capsa.spec.vm import GUEST_ARCHES, LinuxDirectBoot, UefiBoot, VmConfig, VsockPortConfig

log = logging.getLogger("capsa.qemu")
# qemu.qmp logs every disconnect of a VM that powered itself off as an error.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

OVMF_CANDIDATES = (
    Firmware(Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), Path("/usr/share/OVMF/OVMF_VARS_4M.fd")),
    Firmware(Path("/usr/share/OVMF/OVMF_CODE.fd"), Path("/usr/share/OVMF/OVMF_VARS.fd")),
    Firmware(Path("/usr/share/qemu/OVMF.fd"), Path("/usr/share/qemu/OVMF.fd")),
    # Homebrew's QEMU on macOS (Intel: /usr/local, Apple Silicon: /opt/homebrew).
    *(
        Firmware(
            Path(f"{brew}/share/qemu/edk2-x86_64-code.fd"),
            Path(f"{brew}/share/qemu/edk2-i386-vars.fd"),
        )
        for brew in ("/opt/homebrew", "/usr/local")
    ),
)
QMP_CONNECT_TIMEOUT = 15.0


def find_qemu(arch: str = "x86_64") -> str:
    """The QEMU binary for guests of ``arch``: from ``CAPSA_QEMU`` (a binary, whose
    directory also holds the other architectures' binaries, or a directory), else PATH."""
    binary = f"qemu-system-{arch}"
    chosen = os.environ.get("CAPSA_QEMU")
    if chosen:
        path = Path(chosen)
        if path.is_dir():
            path = path / binary
        elif arch != host_arch():
            path = path.parent / binary
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BackendUnavailable(f"CAPSA_QEMU={chosen}: {path} is not an executable file")
        return str(path)
    found = shutil.which(binary)
    if found is None:
        package = PACKAGES.get(arch, "qemu-system")
        raise BackendUnavailable(
            f"{binary} not found on PATH: install it with `sudo apt-get install {package}` "
            "(Debian/Ubuntu) or `brew install qemu` (macOS)"
        )
    return found


def qemu_info(arch: str = "x86_64") -> QemuInfo:
    """The facts of the QEMU that runs ``arch`` guests; refuses an unsupported one."""
    info = probe(find_qemu(arch))
    require_supported(info, arch)
    return info


AAVMF_CANDIDATES = (
    Firmware(Path("/usr/share/AAVMF/AAVMF_CODE.fd"), Path("/usr/share/AAVMF/AAVMF_VARS.fd")),
    *(
        Firmware(
            Path(f"{brew}/share/qemu/edk2-aarch64-code.fd"),
            Path(f"{brew}/share/qemu/edk2-arm-vars.fd"),
        )
        for brew in ("/opt/homebrew", "/usr/local")
    ),
)


async def remove_files(paths: Iterable[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


def qemu_identity(accel: Accel) -> Identity | None:
    """An identity of its own for one QEMU, when capsa confines what it starts: no
    capabilities; with access to /dev/kvm where KVM is used and only its group may."""
    if not confinement().active:
        return None
    groups = []
    if accel is Accel.KVM:
        with contextlib.suppress(OSError):
            st = os.stat("/dev/kvm")
            if st.st_mode & 0o006 != 0o006:
                groups.append(st.st_gid)
    return new_identity(groups=groups)


def confinement_report(info: QemuInfo | None) -> dict[str, str]:
    """Each layer of confinement and whether it is on here, with why (not)."""
    from capsa._util.landlock import landlock_status

    identities = confinement()
    report = {"identities": f"{'on' if identities.active else 'off'}: {identities.reason}"}
    if info is None:
        report["seccomp"] = "off: no QEMU"
    elif "sandbox" not in info.options:
        report["seccomp"] = f"off: {info.describe()} is built without seccomp"
    elif not seccomp_available(info):
        report["seccomp"] = "off: turned off by CAPSA_CONFINE=0"
    else:
        report["seccomp"] = "on: QEMU's -sandbox (obsolete, set*id, spawn, resource control)"
    landlock = landlock_status()
    state = "on" if landlock.enabled else "off"
    report["landlock"] = f"{state}: shared-folder helpers, {landlock.reason}"
    if info is not None and identities.active:
        if "rom" in info.ram_file_properties:
            report["snapshot RAM"] = "read-only to restored VMs"
        else:
            report["snapshot RAM"] = (
                f"writable by restored VMs ({info.describe()} cannot map a read-only file "
                "privately; QEMU 8.2 and later can)"
            )
    return report


def seccomp_available(info: QemuInfo) -> bool:
    """Whether VMs run under QEMU's seccomp filter: when the build has it (``-sandbox``),
    unless ``CAPSA_CONFINE=0`` turns capsa's confinement off (for debugging only)."""
    return "sandbox" in info.options and os.environ.get("CAPSA_CONFINE", "1") != "0"


def find_firmware(arch: str = "x86_64") -> Firmware:
    arm = arch == "aarch64"
    for fw in AAVMF_CANDIDATES if arm else OVMF_CANDIDATES:
        if fw.code.is_file() and fw.vars_template.is_file():
            return fw
    name, package = ("AAVMF", "qemu-efi-aarch64") if arm else ("OVMF", "ovmf")
    raise BackendUnavailable(
        f"UEFI firmware ({name}) not found: install it with `sudo apt-get install {package}`"
    )


def vhost_user_available() -> bool:
    """vhost-user (our vsock and virtio-fs back ends) exists only on Linux hosts."""
    return sys.platform.startswith("linux")


class QemuBackend:
    name = "qemu"

    def capabilities(self, host: str = sys.platform) -> Capabilities:
        """What QEMU can do for guests of this host's architecture, on ``host``."""
        info: QemuInfo | None = None
        try:
            info = qemu_info(host_arch())
            available, reason = True, info.describe()
        except BackendUnavailable as e:
            available, reason = False, str(e)
        native, native_reason = native_accel(host)
        forced = os.environ.get("CAPSA_ACCEL")
        accel = forced.lower() if forced else (native.value if native else "tcg")
        choice_reason = "forced by CAPSA_ACCEL" if forced else native_reason
        boot = ["linux_direct"]
        unavailable: dict[str, str] = {}
        try:
            find_firmware(host_arch())
            boot.append("uefi")
        except BackendUnavailable as e:
            unavailable["uefi"] = str(e)
        devices = ["console", "virtio-blk", "virtio-serial", "virtio-rng"]
        if host.startswith("linux"):
            devices += ["vsock", "virtio-fs"]
        else:
            devices.append("virtio-9p")
            why = "QEMU has vhost-user back ends only on Linux"
            unavailable["vsock"] = why
            unavailable["virtio-fs"] = f"{why}; shares use QEMU's virtio-9p instead"
            unavailable["snapshots of VMs with shares"] = "9p shares block migration"
        return Capabilities(
            name=self.name,
            available=available,
            reason=reason,
            accelerator=accel,
            accelerator_reason=choice_reason,
            boot_methods=tuple(boot),
            image_formats=("raw", "qcow2"),
            network_modes=("none", "nat", "user_nat", "cluster"),
            devices=tuple(devices),
            unavailable=unavailable,
            confinement=confinement_report(info) if host.startswith("linux") else {},
        )

    def validate(self, config: VmConfig) -> None:
        if config.arch not in GUEST_ARCHES:
            raise InvalidConfig(f"guest architecture {config.arch!r} is not one of {GUEST_ARCHES}")
        info = qemu_info(config.arch)
        machine = machine_name(config.arch, isinstance(config.boot, UefiBoot))
        if info.machine(machine) is None:
            raise UnsupportedFeature(f"{info.describe()} has no {machine} machine")
        if config.vsock_ports and not vhost_user_available():
            raise UnsupportedFeature(
                "vsock ports need vhost-user back ends, which QEMU has only on Linux"
            )
        if isinstance(config.boot, UefiBoot):
            find_firmware(config.arch)
            store = config.boot.efi_variable_store
            if store is not None and not store.exists() and not config.boot.create_variable_store:
                raise InvalidConfig(f"EFI variable store not found: {store}")

    def snapshot_blocker(self, config: VmConfig) -> str | None:
        info = qemu_info(config.arch)
        reason = snapshot_blocker(config, info)
        if reason is None and not has_room(RAM_DIR, config.resources.memory_mb, 64):
            reason = f"{RAM_DIR} has no room for the guest's RAM file"
        return reason

    def state_identity(self, arch: str) -> dict[str, str]:
        info = qemu_info(arch)
        accel = choose_accel().accel
        return {
            "qemu": info.version_text,
            "package": info.package,
            "accel": accel.value,
            "kernel_args": guest_defaults(arch, accel),
        }

    def nic_needs(self) -> NicNeeds:
        # Stream by default; CAPSA_NET_TRANSPORT=dgram runs vfkit's datagram path under QEMU.
        return NicNeeds(datagram=os.environ.get("CAPSA_NET_TRANSPORT", "stream") == "dgram")

    async def start(
        self,
        config: VmConfig,
        *,
        mac: str,
        net: NetworkPlug | None = None,
        restore_from: Path | None = None,
    ) -> QemuVm:
        info = await asyncio.to_thread(qemu_info, config.arch)
        vm = QemuVm(config, info, mac=mac, net=net, restore_from=restore_from)
        try:
            await vm.start()
        except BaseException:
            await vm.cleanup()
            raise
        return vm


@dataclass
class _Channel:
    """A socketpair: ``host`` stays with us, ``guest`` goes to QEMU."""

    host: socket.socket
    guest: socket.socket

    @classmethod
    def new(cls) -> _Channel:
        host, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        host.setblocking(False)
        return cls(host, guest)


class QemuVm(BackendVm):
    """One QEMU process and everything it owns."""

    def __init__(
        self,
        config: VmConfig,
        info: QemuInfo,
        *,
        mac: str,
        net: NetworkPlug | None,
        restore_from: Path | None,
    ) -> None:
        self.config = config
        self.info = info
        self.restore_from = restore_from
        self.run_dir = RunDir()
        self.ram_dir: Path | None = None
        self._console = _Channel.new()
        self._qmp_chan = _Channel.new()
        self._ports = {name: _Channel.new() for name in config.serial_ports}
        self._proc: asyncio.subprocess.Process | None = None
        self._qmp: QMPClient | None = None
        self._shutdown_reason: str | None = None
        self._events_task: asyncio.Task[None] | None = None
        self._exit: ExitInfo | None = None
        self._wait_lock = asyncio.Lock()
        self._stop_devices: list[Callable[[], Awaitable[None]]] = []
        self._cleaned = False
        self.accel = choose_accel()
        self.argv: list[str] = []
        self.guest_cid = 3
        self._mac = mac
        self.net = net
        # Whom QEMU runs as when capsa is root (None: as capsa itself).
        self.identity: Identity | None = qemu_identity(self.accel.accel)

    @property
    def mac(self) -> str:
        return self._mac

    # -- start -----------------------------------------------------------------------------

    def _efi_vars(self, firmware: Firmware) -> Path:
        boot = self.config.boot
        assert isinstance(boot, UefiBoot)
        store = boot.efi_variable_store
        if store is None:
            store = self.run_dir.path / "efi-vars.fd"
        if not store.exists():
            shutil.copyfile(firmware.vars_template, store)
        return store

    def vsock_path(self, port: VsockPortConfig) -> Path:
        """Where host programs connect for ``port``: the caller's path or one in the run dir."""
        if port.socket_path is not None:
            return port.socket_path
        return self.run_dir.socket_path(f"vsock-{port.port}.sock")

    async def _start_vsock_device(self) -> Path:
        # Imported lazily: VMs without vsock never pay for the device code.
        from capsa.devices.launch import start_vsock_device

        vhost = self.run_dir.socket_path("vsock.vhost")
        ports = [(p.port, self.vsock_path(p), p.connect) for p in self.config.vsock_ports]
        identity = new_identity() if self.identity is not None else None
        device = await start_vsock_device(vhost, ports, guest_cid=self.guest_cid, identity=identity)
        self._stop_devices.append(device.stop)
        # A confined helper cannot remove the sockets it bound where its owner chose.
        self._stop_devices.append(lambda: remove_files(path for _, path, _ in ports))
        return vhost

    async def _start_shares(self) -> tuple[Path, ...]:
        if not self.config.shares or share_transport() == "9p":
            return ()  # QEMU serves 9p shares itself
        from capsa.devices.launch import share_identity, start_virtio_fs_device

        sockets = []
        for i, share in enumerate(self.config.shares):
            vhost = self.run_dir.socket_path(f"fs{i}.vhost")
            identity = share_identity(share) if self.identity is not None else None
            device = await start_virtio_fs_device(vhost, share, identity)
            self._stop_devices.append(device.stop)
            sockets.append(vhost)
        return tuple(sockets)

    async def start(self) -> None:
        copying: asyncio.Future[None] | None = None
        if self.restore_from is not None:
            check_restorable(self.restore_from, self.info)
            if uses_vhost_user(self.config):
                # While the device helpers start (a copy takes tens of milliseconds).
                copying = asyncio.ensure_future(asyncio.to_thread(self._copy_ram, self._own_ram()))
        try:
            vsock_vhost: Path | None = None
            if self.config.vsock_ports:
                vsock_vhost = await self._start_vsock_device()
            fs_vhosts = await self._start_shares()
        finally:
            if copying is not None:
                await copying
        handover = Handover()
        try:
            facts = self._facts(handover, vsock_vhost, fs_vhosts)
            qemu_argv = build_argv(self.config, facts)
            missing = missing_parts(self.info, qemu_argv)
            if missing:
                raise UnsupportedFeature(f"{self.info.describe()} lacks {'; '.join(missing)}")
            self.argv = qemu_argv
            wrapper = setpriv_argv(self.identity) if self.identity is not None else []
            await self._spawn([*wrapper, *qemu_argv], handover.fds)
        finally:
            handover.close()
        await self._connect_qmp()
        if self.restore_from is not None:
            await self._load_state(self.restore_from)

    async def _load_state(self, source: Path) -> None:
        """Load a saved state; QEMU exits when it cannot, which is said as a SnapshotError
        naming QEMU's complaint (the VM never ran)."""
        try:
            await load_state(self.qmp, self.pass_fd, source)
        except SnapshotError:
            raise
        except Exception as e:
            if self._proc is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._proc.wait(), 2.0)
            detail = self.stderr_text().strip() or str(e)
            raise SnapshotError(f"QEMU could not load the state in {source}: {detail}") from None

    def _facts(
        self, handover: Handover, vsock_vhost: Path | None, fs_vhosts: tuple[Path, ...]
    ) -> HostFacts:
        """Everything the command line needs, QEMU's files and sockets handed over open."""
        net = self.net
        net_fd = None
        if net is not None:
            if net.datagram:
                # Beside the switch's port, owned like it: the switch sends replies there.
                local = net.socket.with_name(net.socket.stem + ".vm.sock")
                net_fd = handover.datagram(local, net.socket)
                self._stop_devices.append(lambda: remove_files([local]))
            else:
                net_fd = handover.connected(net.socket)
        ram_file, ram_private, ram_readonly = self._ram_file(handover)
        boot = self.config.boot
        kernel = initrd = None
        pflash = None
        if isinstance(boot, LinuxDirectBoot):
            kernel = handover.file(boot.kernel)
            initrd = handover.file(boot.initrd) if boot.initrd is not None else None
        else:
            firmware = find_firmware(self.config.arch)
            variables = self._efi_vars(firmware)
            pflash = (
                handover.fdset(firmware.code, writable=False),
                handover.fdset(variables, writable=True),
            )
        info = self.info
        return HostFacts(
            qemu_binary=info.binary,
            qemu=info,
            accel=self.accel.accel,
            tsc_khz=host_tsc_khz() if self.accel.accel is Accel.TCG else None,
            console_fd=self._console.guest.fileno(),
            qmp_fd=self._qmp_chan.guest.fileno(),
            serial_port_fds={n: c.guest.fileno() for n, c in self._ports.items()},
            vsock_fd=handover.connected(vsock_vhost) if vsock_vhost is not None else None,
            virtio_fs_fds=tuple(handover.connected(path) for path in fs_vhosts),
            guest_cid=self.guest_cid,
            net_fd=net_fd,
            net_datagram=bool(net and net.datagram),
            net_mtu=net.mtu if net else 1500,
            mac=self.mac,
            kernel=kernel,
            initrd=initrd,
            drives=tuple(handover.drive(disk) for disk in self.config.all_disks),
            pflash=pflash,
            add_fds=tuple(handover.add_fds),
            ram_file=ram_file,
            ram_private=ram_private,
            ram_readonly=ram_readonly,
            incoming=self.restore_from is not None,
            arch=self.config.arch,
            share_transport=share_transport(),
            seccomp=seccomp_available(info),
        )

    async def _spawn(self, argv: list[str], handed_over: list[int]) -> None:
        log.debug("starting %s", " ".join(argv))
        stderr_path = self.run_dir.path / "qemu.stderr"
        with open(stderr_path, "wb") as stderr:
            self._proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=stderr,
                pass_fds=[*self._qemu_fds(), *handed_over],
                # Own session: a Ctrl-C meant for the caller must not kill the VM behind its back.
                start_new_session=True,
            )
        REAPER.watch_pid(self._proc.pid)
        for chan in (self._console, self._qmp_chan, *self._ports.values()):
            chan.guest.close()

    def _ram_file(self, handover: Handover) -> tuple[str | None, bool, bool]:
        """Where guest RAM lives (a file name for QEMU, whether mapped privately, whether
        read-only): a restored snapshot's file (mapped privately, copy-on-write), a file of
        our own on tmpfs (so the VM can be snapshotted), or anonymous memory (None)."""
        if self.restore_from is not None and uses_vhost_user(self.config):
            assert self.ram_dir is not None
            return str(self.ram_dir / RAM_FILE), False, False
        if self.restore_from is not None:
            return self._snapshot_ram(handover)
        if snapshot_blocker(self.config, self.info) is not None:
            return None, False, False
        self.ram_dir = ram_directory(self.config.resources.memory_mb)
        if self.ram_dir is None:
            return None, False, False
        REAPER.watch_path(self.ram_dir)
        if self.identity is not None:
            give([self.ram_dir], self.identity, 0o700)  # QEMU creates its RAM file there
        return str(self.ram_dir / RAM_FILE), False, False

    def _own_ram(self) -> Path:
        """vhost-user back ends map guest RAM shared with QEMU, and a private copy-on-write
        mapping would hide the guest's writes from them: such a VM gets a copy of the
        snapshot's RAM of its own (sparse: only the pages in use), shared as at boot.
        This is where it goes."""
        self.ram_dir = ram_directory(self.config.resources.memory_mb)
        if self.ram_dir is None:
            raise SnapshotError(
                f"{RAM_DIR} has no room for a copy of the guest's RAM "
                f"({self.config.resources.memory_mb} MiB), which a VM with shared folders needs"
            )
        REAPER.watch_path(self.ram_dir)
        return self.ram_dir / RAM_FILE

    def _copy_ram(self, ram: Path) -> None:
        assert self.restore_from is not None and self.ram_dir is not None
        copy_sparse(self.restore_from / RAM_FILE, ram)
        if self.identity is not None:
            give([self.ram_dir, ram], self.identity, 0o700)

    def _snapshot_ram(self, handover: Handover) -> tuple[str, bool, bool]:
        """A snapshot's RAM file, mapped privately: read-only where QEMU can map a read-only
        file writable-private (8.2+), through the snapshot's group when QEMU is confined."""
        assert self.restore_from is not None
        ram = self.restore_from / RAM_FILE
        read_only = "rom" in self.info.ram_file_properties
        if self.identity is not None:
            group = snapshot_group(ram, writable=not read_only)
            self.identity = dataclasses.replace(
                self.identity, groups=(*self.identity.groups, group)
            )
        fd = handover.file_fd(ram, writable=not read_only)
        return f"{FD_PATH}/{fd}", True, read_only

    def snapshot_blocker(self) -> str | None:
        reason = snapshot_blocker(self.config, self.info)
        if reason is None and self.ram_dir is None and self.restore_from is None:
            reason = "its RAM is not in a file (/dev/shm had no room when it started)"
        return reason

    async def save(self, dest: Path) -> None:
        """Pause and write the VM's state into ``dest``; it stays paused (see resume()).

        A VM restored from a snapshot has private RAM: QEMU then writes all of it into the
        state stream, and the new snapshot's RAM file is an empty one to map it over."""
        ram = self.ram_dir / RAM_FILE if self.ram_dir is not None else None
        await save_state(
            self.qmp, self.pass_fd, self.info, ram, dest, self.config.resources.memory_mb
        )

    async def resume(self) -> None:
        await self.qmp("cont")

    def _qemu_fds(self) -> list[int]:
        return [c.guest.fileno() for c in (self._console, self._qmp_chan, *self._ports.values())]

    async def _connect_qmp(self) -> None:
        assert self._proc is not None
        qmp = QMPClient(f"capsa-{self._proc.pid}")
        connect = asyncio.ensure_future(qmp.connect(self._qmp_chan.host))
        exited = asyncio.ensure_future(self._proc.wait())
        try:
            done, _ = await asyncio.wait(
                {connect, exited}, timeout=QMP_CONNECT_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:
            # Cancelled (a pool closing, a caller's timeout): the connect task must not
            # outlive us, or its EOF once QEMU is killed is logged as never retrieved.
            await _discard(connect, exited)
            raise
        if connect not in done or connect.exception() is not None:
            await _discard(connect, exited)
            raise StartFailed(f"QEMU failed to start: {self.stderr_text() or 'no QMP greeting'}")
        exited.cancel()
        self._qmp = qmp
        self._events_task = asyncio.ensure_future(self._watch_events(qmp))

    async def _watch_events(self, qmp: QMPClient) -> None:
        listener = EventListener("SHUTDOWN")
        with qmp.listen(listener):
            event: Any = await listener.get()
            self._shutdown_reason = str(event.get("data", {}).get("reason", "unknown"))

    def stderr_text(self) -> str:
        try:
            return (self.run_dir.path / "qemu.stderr").read_text(errors="replace").strip()
        except OSError:
            return ""

    # -- BackendVm ---------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def console_socket(self) -> socket.socket:
        return self._console.host

    def serial_port_socket(self, name: str) -> socket.socket:
        return self._ports[name].host

    async def pass_fd(self, fd: int, name: str) -> None:
        """Give QEMU the open file ``fd`` under ``name`` (SCM_RIGHTS on QMP, then getfd)."""
        if self._qmp is None:
            raise StartFailed("QMP is not connected")
        self._qmp.send_fd_scm(fd)
        await self.qmp("getfd", fdname=name)

    async def qmp(self, command: str, **arguments: object) -> object:
        if self._qmp is None:
            raise StartFailed("QMP is not connected")
        return await self._qmp.execute(command, arguments or None)

    async def request_shutdown(self) -> None:
        with contextlib.suppress(Exception):
            await self.qmp("system_powerdown")

    async def kill(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        await self.wait()

    async def wait(self) -> ExitInfo:
        async with self._wait_lock:
            if self._exit is not None:
                return self._exit
            assert self._proc is not None
            code = await self._proc.wait()
            if self._events_task is not None and code >= 0:
                # The SHUTDOWN event precedes process exit; give the reader a moment to see it
                # (a QEMU killed by a signal sent none).
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(self._events_task), 0.2)
            self._exit = self._exit_info(code)
            return self._exit

    def _exit_info(self, code: int) -> ExitInfo:
        if code < 0:
            return ExitInfo(None, "killed", f"QEMU killed by signal {-code}")
        if code != 0:
            return ExitInfo(code, "crashed", f"QEMU exited with {code}: {self.stderr_text()}")
        return ExitInfo(0, self._shutdown_reason or "guest-shutdown")

    async def cleanup(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()
        if self._events_task is not None:
            self._events_task.cancel()
            with contextlib.suppress(BaseException):
                await self._events_task
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                await self._qmp.disconnect()
        for stop in self._stop_devices:
            with contextlib.suppress(Exception):
                await stop()
        for chan in (self._console, self._qmp_chan, *self._ports.values()):
            chan.host.close()
            chan.guest.close()
        if self._proc is not None:
            REAPER.unwatch_pid(self._proc.pid)
        self.run_dir.remove()
        if self.ram_dir is not None:
            remove_tree(self.ram_dir)
            REAPER.unwatch_path(self.ram_dir)


async def _discard(*tasks: asyncio.Future[Any]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(BaseException):
            await task
