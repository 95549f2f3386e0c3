"""``capsa.sandbox()``: a capsa-built guest (our init + agent) with an agent channel."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from capsa.api.builders import VmBuilder, check_pool_size
from capsa.api.guest_setup import GuestSetup
from capsa.api.network import NetworkArg, NetworkInterface
from capsa.api.pool import Pool, start_pool
from capsa.api.sandbox_handle import DEFAULT_TIMEOUT, Sandbox, check_limit
from capsa.api.starting import Starting
from capsa.api.templates import start_sandbox
from capsa.errors import InvalidConfig
from capsa.guest.protocol import AGENT_PORT_NAME
from capsa.images.debian import check_packages
from capsa.oci.reference import parse_reference
from capsa.spec.shares import MountMode, Ownership, SharedDir
from capsa.spec.vm import GUEST_ARCHES, DiskImage, ImageFormat, LinuxDirectBoot, VmConfig

if TYPE_CHECKING:  # the registry client (httpx) loads only when an image is pulled
    from capsa.oci.registry import Credentials

IMAGES = ("debian", "minimal")


def default_image() -> str:
    """``$CAPSA_SANDBOX_IMAGE`` (``debian`` or ``minimal``), else ``debian``."""
    name = os.environ.get("CAPSA_SANDBOX_IMAGE") or "debian"
    if name not in IMAGES:
        raise InvalidConfig(f"CAPSA_SANDBOX_IMAGE={name!r} is not one of {IMAGES}")
    return name


class SandboxBuilder:
    """Describes a sandbox; ``build()`` boots it. It wraps a :class:`VmBuilder` for the
    VM's own settings and adds the guest's: environment, main process, mounts, image."""

    def __init__(self) -> None:
        self._vm = VmBuilder(None).timeout(DEFAULT_TIMEOUT)
        self._timeout = DEFAULT_TIMEOUT
        self._env: dict[str, str] = {}
        self._kernel: Path | None = None
        self._initrd: Path | None = None
        self._run: tuple[str, tuple[str, ...]] | None = None
        self._hostname = "sandbox"
        self._shares = 0  # shares given so far, for default tags
        self._oci: OciSpec | None = None
        self._arch: str | None = None
        self._oci_disk: Path | None = None
        self._container: dict[str, object] | None = None
        self._use_template = True
        self._image = default_image()
        self._packages: tuple[str, ...] = ()
        self._lifetime: float | None = None
        self._idle_timeout: float | None = None
        self._disk_size: int | None = None

    # -- the VM ---------------------------------------------------------------------------

    def cpus(self, n: int) -> SandboxBuilder:
        self._vm.cpus(n)
        return self

    def memory_mb(self, mb: int) -> SandboxBuilder:
        self._vm.memory_mb(mb)
        return self

    def timeout(self, seconds: float) -> SandboxBuilder:
        """Bound on boot-to-agent-ready and on agent waits without their own timeout."""
        self._vm.timeout(seconds)
        self._timeout = seconds
        return self

    def arch(self, arch: str) -> SandboxBuilder:
        """The guest's architecture: ``x86_64`` or ``aarch64`` (default: the host's); the
        image and kernel for it are fetched and built on first use."""
        if arch not in GUEST_ARCHES:
            raise InvalidConfig(f"guest architecture {arch!r} is not one of {GUEST_ARCHES}")
        self._vm.arch(arch)
        self._arch = arch
        return self

    def backend(self, name: str) -> SandboxBuilder:
        self._vm.backend(name)
        return self

    def disk(self, disk: DiskImage | str | Path) -> SandboxBuilder:
        """An extra disk (``/dev/vdX``), for the guest to mount itself."""
        self._vm.disk(disk)
        return self

    def network(self, mode: NetworkArg) -> SandboxBuilder:
        """A network for the sandbox; init configures eth0 at boot (DHCP or a static IP)."""
        self._vm.network(mode)
        return self

    def interface(self, interface: NetworkInterface) -> SandboxBuilder:
        self._vm.interface(interface)
        return self

    def vsock_listen(self, port: int) -> SandboxBuilder:
        self._vm.vsock_listen(port)
        return self

    def vsock_listen_at(self, port: int, path: str | Path) -> SandboxBuilder:
        self._vm.vsock_listen_at(port, path)
        return self

    def vsock_connect(self, port: int) -> SandboxBuilder:
        self._vm.vsock_connect(port)
        return self

    def vsock_connect_at(self, port: int, path: str | Path) -> SandboxBuilder:
        self._vm.vsock_connect_at(port, path)
        return self

    def cmdline_arg(self, key: str, value: str) -> SandboxBuilder:
        """A ``key=value`` kernel argument for the guest, over capsa's defaults: e.g.
        ``("sysctl.kernel.randomize_va_space", "2")`` keeps the guest's ASLR under TCG,
        where capsa turns it off for speed."""
        self._vm.cmdline_arg(key, value)
        return self

    def cmdline_flag(self, name: str) -> SandboxBuilder:
        """A bare kernel argument for the guest (e.g. ``"nokaslr"``)."""
        self._vm.cmdline_flag(name)
        return self

    def serial_port(self, name: str) -> SandboxBuilder:
        """An extra named virtio-serial port besides the agent's (benchmarks use one)."""
        self._vm.serial_port(name)
        return self

    # -- shared folders -------------------------------------------------------------------

    def mount(
        self,
        host_path: str | Path,
        guest_path: str,
        mode: MountMode = MountMode.READ_ONLY,
        *,
        ownership: Ownership | None = None,
        tag: str | None = None,
    ) -> SandboxBuilder:
        """Mount ``host_path`` at ``guest_path`` during boot (virtio-fs). Files appear owned
        by root unless ``ownership`` says otherwise; a read-only share is enforced on the
        host and mounted read-only."""
        if not guest_path.startswith("/"):
            raise InvalidConfig(
                f"{guest_path!r} is not an absolute guest path; to attach a share by tag "
                "without mounting it, use virtio_fs(host_path, tag)"
            )
        tag = tag or f"share{self._shares}"
        self._vm.shared_dir(SharedDir.of(host_path, tag, mode, ownership, guest_path))
        self._shares += 1
        return self

    def share(
        self,
        host_path: str | Path,
        guest_path: str,
        mode: MountMode = MountMode.READ_ONLY,
        *,
        ownership: Ownership | None = None,
        tag: str | None = None,
    ) -> SandboxBuilder:
        """The seeds' name for :meth:`mount`: on a sandbox, a share is mounted at a guest
        path (``capsa.vm(boot).share(host, tag)`` attaches one by tag instead)."""
        return self.mount(host_path, guest_path, mode, ownership=ownership, tag=tag)

    def virtio_fs(
        self,
        host_path: str | Path,
        tag: str,
        mode: MountMode = MountMode.READ_ONLY,
        *,
        ownership: Ownership | None = None,
    ) -> SandboxBuilder:
        """Attach a share without mounting it: the guest mounts ``tag`` itself."""
        self._vm.share(host_path, tag, mode, ownership=ownership)
        self._shares += 1
        return self

    # -- the guest ------------------------------------------------------------------------

    def env(self, key: str, value: str) -> SandboxBuilder:
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise InvalidConfig(f"invalid environment variable name {key!r}")
        self._env[key] = value
        return self

    def hostname(self, name: str) -> SandboxBuilder:
        if not name or len(name) > 64 or not all(c.isalnum() or c in "-." for c in name):
            raise InvalidConfig(f"invalid hostname {name!r}")
        self._hostname = name
        return self

    def kernel(self, path: str | Path) -> SandboxBuilder:
        self._kernel = Path(path).expanduser()
        return self

    def initrd(self, path: str | Path) -> SandboxBuilder:
        self._initrd = Path(path).expanduser()
        return self

    def run(self, path: str, args: Sequence[str] = ()) -> SandboxBuilder:
        """The sandbox's main process; its exit ends the VM and becomes ``wait()``'s exit code."""
        if self._oci is not None:
            raise InvalidConfig("oci() and run() are exclusive: the image gives the main process")
        if self._run is not None:
            raise InvalidConfig("run() may be given only once")
        if not path:
            raise InvalidConfig("run() needs a program path")
        self._run = (path, tuple(args))
        return self

    def image(self, name: str) -> SandboxBuilder:
        """The userland: ``"debian"`` (the default: Debian stable with bash, python3, pip,
        git, curl..., built locally on first use) or ``"minimal"`` (busybox only)."""
        if name not in IMAGES:
            raise InvalidConfig(f"image {name!r} is not one of {IMAGES}")
        self._image = name
        return self

    def packages(self, *names: str) -> SandboxBuilder:
        """Debian packages on top of the default image's (a derived image, built once and
        cached by its package set)."""
        self._packages = (*self._packages, *check_packages(names))
        self._image = "debian"
        return self

    def oci(
        self,
        image: str,
        args: Sequence[str] | None = None,
        *,
        insecure: bool = False,
        credentials: Credentials | None = None,
    ) -> SandboxBuilder:
        """Boot the OCI image ``image`` (pulled and cached on first use): its root file
        system, read-only with a private writable layer on top, becomes the sandbox's, and
        its entrypoint + cmd (cmd replaced by ``args`` when given) the main process.
        ``insecure``: the registry speaks plain HTTP (a local one)."""
        if self._run is not None:
            raise InvalidConfig("oci() and run() are exclusive: the image gives the main process")
        self._oci = OciSpec(
            image=parse_reference(image).name,
            args=None if args is None else tuple(args),
            insecure=insecure,
            credentials=credentials,
        )
        return self

    # -- the result -----------------------------------------------------------------------

    def _boot(self) -> LinuxDirectBoot:
        if (self._kernel is None) != (self._initrd is None):
            raise InvalidConfig("kernel() and initrd() must be given together")
        if self._kernel is not None and self._initrd is not None:
            return LinuxDirectBoot(self._kernel, self._initrd)
        from capsa.images.sandbox import sandbox_image

        image = sandbox_image(arch=self._arch)
        return LinuxDirectBoot(image.kernel, image.initrd)

    def config(self, scratch: Path | None = None) -> VmConfig:
        """Validate and freeze the sandbox's VM (builds the image if needed): what its
        guest is before it is set up, so sandboxes of one base share a template
        (``scratch``: this sandbox's own writable disk, see :meth:`disk_size`)."""
        vm = self._vm.copy().with_boot(self._boot()).console_enabled()
        vm.serial_port(AGENT_PORT_NAME)
        if self._oci_disk is not None:
            vm.disk(DiskImage(self._oci_disk, ImageFormat.RAW).read_only())
        if scratch is not None:
            vm.disk(DiskImage(scratch, ImageFormat.RAW))
        return vm.config()

    def guest_setup(self) -> GuestSetup:
        """What the guest is told once it runs: hostname, environment, main process."""
        container = self._container
        if container is not None and self._disk_size is not None:
            container = {**container, "rw_disk_bytes": self._disk_size}
        return GuestSetup(
            hostname=self._hostname,
            env=tuple(self._env.items()),
            run=None if self._run is None else (self._run[0], *self._run[1]),
            container=container,
        )

    def _resolved(self, scratch: Path | None = None) -> tuple[VmConfig, GuestSetup]:
        config, setup = self.config(scratch), self.guest_setup()
        setup.check_size(config)
        return config, setup

    def disk_size(self, size: str | int) -> SandboxBuilder:
        """Put the image's writable layer on a sparse disk of ``size`` (``"4G"``) made for
        this sandbox and removed with it, instead of in guest RAM. Such a sandbox boots
        (a writable disk cannot be part of a template) and cannot be pooled."""
        from capsa.images.scratch_disk import parse_size

        self._disk_size = parse_size(size)
        return self

    async def _prepare_image(self) -> None:
        """Pull the OCI image (or find it cached) and build its root file system; or
        build the Debian image (once per package set)."""
        if self._container is not None:
            return
        if self._oci is None:
            if self._image == "debian":
                await self._prepare_debian()
            return
        from capsa.oci.store import default_store

        store = default_store()
        image = await store.pull(
            self._oci.image, insecure=self._oci.insecure, credentials=self._oci.credentials
        )
        self._oci_disk = await store.rootfs(image)
        cfg = image.config
        command = list(self._oci.args) if self._oci.args is not None else cfg.cmd
        env = [*cfg.env, *(f"{k}={v}" for k, v in self._env.items())]
        self._container = {
            "disk": "/dev/vda",
            "env": env,
            "workdir": cfg.workdir,
            "user": cfg.user,
            "argv": cfg.entrypoint + command,
        }

    async def _prepare_debian(self) -> None:
        from capsa.images.debian import debian_image

        image = await asyncio.to_thread(debian_image, self._packages, arch=self._arch)
        self._oci_disk = image.path
        env = [
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME=/root",
            "LANG=C.UTF-8",
            *(f"{k}={v}" for k, v in self._env.items()),
        ]
        argv = [] if self._run is None else [self._run[0], *self._run[1]]
        self._container = {
            "disk": "/dev/vda",
            # Found by size when the sandbox has disks of its own too.
            "disk_bytes": image.path.stat().st_size,
            "env": env,
            "workdir": "/root",
            "user": "0",
            "argv": argv,
        }

    def template(self, enabled: bool = True) -> SandboxBuilder:
        """Start from a template snapshot of this sandbox's base (the default): the first
        sandbox of a base boots and saves it, every later one is a copy-on-write restore.
        ``template(False)`` boots cold every time."""
        self._use_template = bool(enabled)
        return self

    def build(self) -> Starting[Sandbox]:
        """Start the sandbox: ``sb = await ....build()``, or ``async with ....build() as sb:``."""
        return Starting(self._build())

    def lifetime(self, seconds: float) -> SandboxBuilder:
        """End the sandbox ``seconds`` after ``build()`` returns, whatever it is doing
        (``sb.set_lifetime()`` extends it); ``sb.expired`` then says why it ended and
        ``agent()`` raises :class:`~capsa.errors.SandboxExpired`."""
        self._lifetime = check_limit("lifetime", seconds)
        return self

    def idle_timeout(self, seconds: float) -> SandboxBuilder:
        """End the sandbox once nobody has used it for ``seconds`` (see
        :meth:`Sandbox.set_idle_timeout` for what counts as use)."""
        self._idle_timeout = check_limit("idle_timeout", seconds)
        return self

    async def _build(self) -> Sandbox:
        await self._prepare_image()
        if self._disk_size is None:
            sandbox = await self._start()
        else:
            sandbox = await self._start_with_scratch(self._disk_size)
        if self._lifetime is not None:
            sandbox.set_lifetime(self._lifetime)
        if self._idle_timeout is not None:
            sandbox.set_idle_timeout(self._idle_timeout)
        return sandbox

    async def _start(self, scratch: Path | None = None) -> Sandbox:
        config, setup = self._resolved(scratch)
        return await start_sandbox(config, setup, self._timeout, use_template=self._use_template)

    async def _start_with_scratch(self, size: int) -> Sandbox:
        from capsa.images.scratch_disk import make_scratch_disk, remove_scratch_disk

        if self._container is None:
            raise InvalidConfig(
                "disk_size() puts an image's writable layer on a disk: it needs the "
                "Debian image or an OCI image, not the minimal one"
            )
        scratch = await asyncio.to_thread(make_scratch_disk, size)
        try:
            sandbox = await self._start(scratch)
        except BaseException:
            remove_scratch_disk(scratch)
            raise

        async def remove() -> None:
            remove_scratch_disk(scratch)

        sandbox.vm.before_teardown(remove)
        return sandbox

    def pool(self, size: int, *, wait: bool = True) -> Starting[Pool[Sandbox]]:
        """A pool of ``size`` sandboxes, handed out ready. ``await`` returns once ``size``
        members are idle; ``wait=False`` returns at once and lets them start behind."""
        check_pool_size(size)
        return Starting(self._pool(size, wait))

    async def _pool(self, size: int, wait: bool) -> Pool[Sandbox]:
        if self._disk_size is not None:
            raise InvalidConfig("sandboxes with disk_size() cannot be pooled")
        await self._prepare_image()
        config, setup = self._resolved()
        timeout, use_template = self._timeout, self._use_template

        async def create() -> Sandbox:
            sb = await start_sandbox(config, setup, timeout, use_template=use_template)
            try:
                await sb.agent()
            except BaseException:
                await sb.kill()
                raise
            return sb

        async def destroy(sb: Sandbox) -> None:
            await sb.kill()

        return await start_pool(size, create, destroy, wait=wait)


@dataclass(frozen=True)
class OciSpec:
    image: str
    args: tuple[str, ...] | None
    insecure: bool
    credentials: Credentials | None


def sandbox() -> SandboxBuilder:
    """Start describing a sandbox VM."""
    return SandboxBuilder()
