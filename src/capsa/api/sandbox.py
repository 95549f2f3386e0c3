"""``capsa.sandbox()``: a capsa-built guest (our init + agent) with an agent channel."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from capsa._util.host import share_transport
from capsa.api.agent import AgentClient
from capsa.api.agent_channel import AgentChannel
from capsa.api.builders import VmBuilder, check_pool_size
from capsa.api.console import Console
from capsa.api.handle import VmHandle, VmStatus
from capsa.api.launch import start_vm
from capsa.api.network import NetworkArg, NetworkInterface
from capsa.api.pool import Pool, SnapshotTemplate, start_pool
from capsa.api.snapshot import Snapshot, snapshot_scratch
from capsa.api.starting import Starting
from capsa.api.vsock import VsockSocket
from capsa.errors import BootTimeout, InvalidConfig, StartFailed
from capsa.guest.protocol import AGENT_PORT_NAME
from capsa.net.policy import IpProtocol, NetworkPolicy
from capsa.net.spec import NetworkConfig, NetworkPort
from capsa.oci.reference import parse_reference
from capsa.oci.registry import Credentials
from capsa.oci.store import default_store
from capsa.spec.shares import MountMode, Ownership, SharedDir
from capsa.spec.vm import (
    GUEST_ARCHES,
    DiskImage,
    ImageFormat,
    KernelCmdline,
    LinuxDirectBoot,
    ResourceConfig,
    VmConfig,
)

DEFAULT_TIMEOUT = 60.0
# x86 Linux truncates the kernel command line at 2048 bytes.
MAX_CMDLINE = 2048


def _static_ip(network: NetworkConfig | None) -> str | None:
    """``ADDR/PREFIX[,GATEWAY]`` for init when the sandbox's address is fixed."""
    if isinstance(network, NetworkPort) and network.static_ip:
        return network.network.static_ip_value(network.static_ip)
    return None


def encode_cmdline_value(value: str) -> str:
    """Percent-encode everything but letters and digits, so no value can split the cmdline."""
    return quote(value, safe="")


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

    def _guest_cmdline(self, config: VmConfig) -> KernelCmdline:
        """What init is told on the kernel command line: hostname, environment, the main
        process, where to mount shares, a static address."""
        line = config.cmdline.with_arg("capsa.hostname", self._hostname)
        if self._env:
            pairs = (encode_cmdline_value(f"{k}={v}") for k, v in self._env.items())
            line = line.with_arg("capsa.env", ",".join(pairs))
        if self._run is not None:
            path, run_args = self._run
            line = line.with_arg(
                "capsa.run", ":".join(map(encode_cmdline_value, (path, *run_args)))
            )
        mounts = []
        for shared in config.shares:
            if shared.guest_path is not None:
                parts = (shared.tag, shared.guest_path, shared.mode.value, share_transport())
                mounts.append(":".join(map(encode_cmdline_value, parts)))
        if mounts:
            line = line.with_arg("capsa.mount", ",".join(mounts))
        static = _static_ip(config.network)
        if static is not None:
            line = line.with_arg("capsa.ip", static)
        return line

    def config(self) -> VmConfig:
        """Validate and freeze the sandbox's VM configuration (builds the image if needed)."""
        vm = self._vm.copy().with_boot(self._boot()).console_enabled()
        vm.serial_port(AGENT_PORT_NAME)
        if self._oci_disk is not None:
            vm.disk(DiskImage(self._oci_disk, ImageFormat.RAW).read_only())
        config = vm.config()
        config = dataclasses.replace(config, cmdline=self._guest_cmdline(config))
        user_part = " ".join(a.render() for a in config.cmdline.args)
        if len(user_part) > MAX_CMDLINE - 512:
            raise InvalidConfig(
                f"run() arguments and env() values take {len(user_part)} bytes of kernel "
                f"command line; at most {MAX_CMDLINE - 512} fit (pass data as files instead)"
            )
        return config

    async def _prepare_image(self) -> None:
        """Pull the OCI image (or find it cached) and build its root file system."""
        if self._oci is None or self._container is not None:
            return
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

    def build(self) -> Starting[Sandbox]:
        """Boot the sandbox: ``sb = await ....build()``, or ``async with ....build() as sb:``."""
        return Starting(self._build())

    async def _build(self) -> Sandbox:
        await self._prepare_image()
        return await _start_sandbox(self.config(), self._timeout, self._container)

    def pool(self, size: int) -> Starting[Pool[Sandbox]]:
        """A pool of ``size`` sandboxes whose members come out with the agent ready."""
        check_pool_size(size)
        return Starting(self._pool(size))

    async def _pool(self, size: int) -> Pool[Sandbox]:
        await self._prepare_image()
        config, timeout, container = self.config(), self._timeout, self._container

        async def cold() -> Sandbox:
            sb = await _start_sandbox(config, timeout, container)
            try:
                await sb.agent()
            except BaseException:
                await sb.kill()
                raise
            return sb

        async def snapshot(sb: Sandbox, path: Path) -> Path:
            return (await sb.snapshot(path)).path

        async def restore(path: Path) -> Sandbox:
            return await restore_sandbox(path, config, timeout)

        async def destroy(sb: Sandbox) -> None:
            await sb.kill()

        template = SnapshotTemplate(
            cold=cold,
            snapshot=snapshot,
            restore=restore,
            backend_vm=lambda sb: sb.vm.backend_vm,
            memory_mb=config.resources.memory_mb,
        )
        return await start_pool(size, template.new_member, destroy, template.close)


async def resume_agent(channel: AgentChannel, mac: str | None) -> None:
    """Tell the agent of a restored VM that it is a new machine: host entropy for its RNG,
    the current time, and the MAC its network port was made for. Its answer stands in for
    the hello it sent long ago, in the snapshot's past."""
    header = await channel.request("resume", os.urandom(64), mac=mac, time_ns=time.time_ns())
    channel.accept_hello(header)


async def restore_sandbox(snapshot: Path, config: VmConfig, timeout: float) -> Sandbox:
    """A running copy of the sandbox saved in ``snapshot``, with an identity of its own."""
    handle = await start_vm(config, restore_from=snapshot)
    try:
        sock = handle.backend_vm.serial_port_socket(AGENT_PORT_NAME)
        client = await AgentClient.connect_socket(sock)
        sandbox = Sandbox(handle, client, timeout)
        # A guest on capsa's network takes the new MAC its port was made for.
        mac = handle.mac if isinstance(config.network, NetworkPort) else None
        await asyncio.wait_for(resume_agent(client.channel, mac), timeout)
    except BaseException:
        await handle.kill()
        raise
    return sandbox


async def _start_sandbox(
    config: VmConfig, timeout: float, container: dict[str, object] | None = None
) -> Sandbox:
    handle = await start_vm(config)
    try:
        sock = handle.backend_vm.serial_port_socket(AGENT_PORT_NAME)
        client = await AgentClient.connect_socket(sock)
        sandbox = Sandbox(handle, client, timeout)
        if container is not None:
            # The image's root must be in place before anyone runs a command.
            await sandbox.agent()
            await client.channel.request("container", b"", **container)
    except BaseException:
        await handle.kill()
        raise
    return sandbox


@dataclass(frozen=True)
class OciSpec:
    image: str
    args: tuple[str, ...] | None
    insecure: bool
    credentials: Credentials | None


class Sandbox:
    """A running sandbox: its VM plus the agent channel."""

    def __init__(self, vm: VmHandle, client: AgentClient, timeout: float) -> None:
        self._vm = vm
        self._client = client
        self._timeout = timeout
        vm.use_exit_code_from(lambda: client.exit_code)
        vm.before_teardown(client.close)

    async def agent(self, timeout: float | None = None) -> AgentClient:
        """The agent, once it has said it is ready (bounded by the builder's timeout)."""
        limit = self._timeout if timeout is None else timeout
        ready = asyncio.ensure_future(self._client.wait_ready(limit))
        ended = asyncio.ensure_future(self._vm.wait())
        done, _ = await asyncio.wait({ready, ended}, return_when=asyncio.FIRST_COMPLETED)
        if ready in done and ready.exception() is None:
            ended.cancel()
            return self._client
        ready.cancel()
        ended.cancel()
        with contextlib.suppress(BaseException):
            await ready
        tail = self._vm.console_tail(3000)
        if ended in done:
            status = await self._vm.wait()
            raise StartFailed(f"sandbox VM stopped before its agent was ready ({status})", tail)
        await self._vm.fail(f"sandbox agent not ready within {limit}s")
        raise BootTimeout(f"sandbox agent not ready within {limit}s", tail)

    # -- snapshots ----------------------------------------------------------------------

    async def snapshot(self, path: str | Path, *, resume: bool = True) -> Snapshot:
        """Save this sandbox into the new directory ``path`` (``capsa.restore(path)`` brings
        back running copies, each with its own MAC, lease, RNG state and clock)."""
        await self.agent()
        return await self._vm.snapshot_as(
            Path(path), "sandbox", resume=resume, sandbox_timeout=self._timeout
        )

    async def fork(self, n: int) -> list[Sandbox]:
        """``n`` running copies of this sandbox as it is now; this one runs on."""
        if not isinstance(n, int) or n < 1:
            raise InvalidConfig(f"fork() needs a count of at least 1, got {n!r}")
        with snapshot_scratch(self._vm.config.resources.memory_mb) as scratch:
            snap = await self.snapshot(scratch / "snap")
            # The copies map the RAM file; once they run, the directory may go.
            results = await asyncio.gather(
                *(restore_sandbox(snap.path, snap.config, self._timeout) for _ in range(n)),
                return_exceptions=True,
            )
        clones = [r for r in results if isinstance(r, Sandbox)]
        errors = [r for r in results if not isinstance(r, Sandbox)]
        if errors:
            await asyncio.gather(*(c.kill() for c in clones), return_exceptions=True)
            raise errors[0]
        return clones

    # -- the VM side --------------------------------------------------------------------

    @property
    def vm(self) -> VmHandle:
        return self._vm

    def status(self) -> VmStatus:
        return self._vm.status()

    async def wait(self, timeout: float | None = None) -> VmStatus:
        """Wait for the sandbox to end; ``exit_code`` is the main process's exit code."""
        return await self._vm.wait(timeout)

    async def stop(self, timeout: float = 30.0) -> VmStatus:
        """Ask the agent to shut the guest down cleanly; kill it if that takes too long."""
        if self._vm.status().is_finished:
            return self._vm.status()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.shutdown(), min(timeout, 5.0))
            with contextlib.suppress(asyncio.TimeoutError):
                return await self._vm.wait(timeout)
        return await self._vm.stop(timeout)

    async def kill(self) -> VmStatus:
        return await self._vm.kill()

    async def console(self) -> Console:
        return await self._vm.console()

    def resources(self) -> ResourceConfig:
        return self._vm.resources()

    def vsock_socket(self, port: int) -> VsockSocket | None:
        return self._vm.vsock_socket(port)

    async def set_network_policy(self, policy: NetworkPolicy | None) -> None:
        await self._vm.set_network_policy(policy)

    async def add_port_forward(
        self, protocol: IpProtocol, host_port: int, guest_port: int, host_addr: str = "127.0.0.1"
    ) -> int:
        return await self._vm.add_port_forward(protocol, host_port, guest_port, host_addr)

    async def remove_port_forward(
        self, protocol: IpProtocol, host_port: int, host_addr: str = "127.0.0.1"
    ) -> None:
        await self._vm.remove_port_forward(protocol, host_port, host_addr)

    def vsock_sockets(self) -> dict[int, VsockSocket]:
        return self._vm.vsock_sockets()

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._vm.kill()


def sandbox() -> SandboxBuilder:
    """Start describing a sandbox VM."""
    return SandboxBuilder()
