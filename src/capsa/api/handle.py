"""A running VM: lifecycle, status, console and vsock access."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ClassVar

from capsa.api.console import Console, ConsoleTap
from capsa.api.network import Attachment
from capsa.api.snapshot import Snapshot, write_meta
from capsa.api.vsock import VsockSocket
from capsa.backends.base import BackendVm, ExitInfo
from capsa.errors import (
    BootTimeout,
    CapsaTimeout,
    ConsoleNotEnabled,
    InvalidConfig,
    NotRunning,
    PatternNotFound,
    SnapshotError,
    StartFailed,
    UnsupportedFeature,
)
from capsa.net.policy import IpProtocol, NetworkPolicy
from capsa.net.spec import PortForward
from capsa.spec.vm import GuestOs, ResourceConfig, VmConfig


class VmState(enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True)
class VmStatus:
    """A snapshot of a VM's lifecycle state (STOPPED carries the exit code, FAILED a message)."""

    state: VmState
    exit_code: int | None = None
    message: str | None = None

    CREATED: ClassVar[VmStatus]
    STARTING: ClassVar[VmStatus]
    RUNNING: ClassVar[VmStatus]
    STOPPING: ClassVar[VmStatus]

    @property
    def is_running(self) -> bool:
        return self.state is VmState.RUNNING

    @property
    def is_finished(self) -> bool:
        return self.state in (VmState.STOPPED, VmState.FAILED)

    def __str__(self) -> str:
        if self.state is VmState.STOPPED:
            return f"stopped (exit code {self.exit_code})"
        if self.state is VmState.FAILED:
            return f"failed: {self.message}"
        return str(self.state.value)


VmStatus.CREATED = VmStatus(VmState.CREATED)
VmStatus.STARTING = VmStatus(VmState.STARTING)
VmStatus.RUNNING = VmStatus(VmState.RUNNING)
VmStatus.STOPPING = VmStatus(VmState.STOPPING)

# Lets a layer above (the sandbox) supply the exit code the guest reported itself.
ExitCodeSource = Callable[[], int | None]


class VmHandle:
    """One VM. Use it as an async context manager so it is always torn down."""

    def __init__(
        self,
        config: VmConfig,
        backend_vm: BackendVm,
        vsock: dict[int, VsockSocket],
        network: Attachment | None = None,
    ):
        self._config = config
        self._vm = backend_vm
        self._vsock = vsock
        self._network = network
        self._status = VmStatus.RUNNING
        self._tap = ConsoleTap(backend_vm.console_socket)
        self._console: Console | None = None
        self._killed = False
        self._failure: str | None = None
        self._exit_code_source: ExitCodeSource | None = None
        self._before_cleanup: list[Callable[[], Awaitable[None]]] = []
        self._done = asyncio.ensure_future(self._monitor())

    # -- lifecycle ------------------------------------------------------------------------------

    async def _monitor(self) -> None:
        info = await self._vm.wait()
        # Let the console reader drain what the guest printed last (panic messages).
        for _ in range(20):
            if self._tap.eof:
                break
            await asyncio.sleep(0.01)
        self._status = self._final_status(info)
        for hook in self._before_cleanup:
            with contextlib.suppress(Exception):
                await hook()
        await self._tap.close()
        await self._vm.cleanup()
        if self._network is not None:
            with contextlib.suppress(Exception):
                await self._network.detach()

    def _final_status(self, info: ExitInfo) -> VmStatus:
        if self._failure is not None:
            return VmStatus(VmState.FAILED, message=self._failure)
        if self._killed:
            return VmStatus(VmState.STOPPED, None)
        if info.error is not None and info.reason != "killed":
            return VmStatus(VmState.FAILED, message=f"{info.error}\n{self._tap.tail(2000)}")
        if info.reason == "killed":
            return VmStatus(VmState.FAILED, message=info.error)
        if "Kernel panic" in self._tap.tail(20000):
            return VmStatus(VmState.FAILED, message=f"guest kernel panic:\n{self._tap.tail(2000)}")
        code = info.exit_code
        if self._exit_code_source is not None:
            reported = self._exit_code_source()
            if reported is not None:
                code = reported
        return VmStatus(VmState.STOPPED, code)

    def status(self) -> VmStatus:
        return self._status

    async def stop(self, timeout: float = 30.0) -> VmStatus:
        """Graceful stop: ACPI power button, then kill after ``timeout`` seconds."""
        if self._status.is_finished:
            return self._status
        self._status = VmStatus.STOPPING
        await self._vm.request_shutdown()
        try:
            await asyncio.wait_for(asyncio.shield(self._done), timeout)
        except TimeoutError:
            await self.kill()
        return self._status

    async def kill(self) -> VmStatus:
        """Terminate the VM at once. Always works, also on a VM that already stopped."""
        if not self._done.done():
            self._killed = True
            await self._vm.kill()
        await asyncio.shield(self._done)
        return self._status

    async def fail(self, message: str) -> VmStatus:
        """Kill the VM and record why it is considered failed (a boot that never finished)."""
        if not self._done.done():
            self._failure = f"{message}\n{self.console_tail(2000)}"
        return await self.kill()

    # -- snapshots --------------------------------------------------------------------------

    async def snapshot(self, path: str | Path, *, resume: bool = True) -> Snapshot:
        """Save this VM (memory and device state) into the new directory ``path``.

        The VM is paused while its state is written, then runs on (``resume=False``
        leaves it paused: :meth:`resume`). ``capsa.restore(path)`` starts copies of it."""
        return await self.snapshot_as(Path(path), "vm", resume=resume)

    async def pause(self, path: str | Path) -> Snapshot:
        """Save this VM into the new directory ``path`` and stop it; ``capsa.resume(path)``
        runs it again, in this process or another, as the same machine (same MAC)."""
        snap = await self.snapshot_as(Path(path), "vm", resume=False, paused=True)
        await self.kill()
        return snap

    async def snapshot_as(
        self,
        dest: Path,
        kind: str,
        *,
        resume: bool,
        sandbox_timeout: float | None = None,
        paused: bool = False,
    ) -> Snapshot:
        """:meth:`snapshot`, recording what the VM is (``"sandbox"``: ``restore()`` gives a
        Sandbox back, with the agent timeout it had)."""
        if self._status.is_finished:
            raise NotRunning(f"cannot snapshot a VM that has ended ({self._status})")
        reason = self._vm.snapshot_blocker()
        if reason is not None:
            raise UnsupportedFeature(f"this VM cannot be snapshotted: {reason}")
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise SnapshotError(f"snapshot directory {dest} exists and is not empty")
        dest.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        try:
            await self._vm.save(dest)
            seconds = time.perf_counter() - start
            snap = Snapshot(
                path=dest,
                kind=kind,
                memory_mb=self._config.resources.memory_mb,
                seconds=seconds,
                config=self._config,
                sandbox_timeout=sandbox_timeout,
                mac=self.mac,
                paused=paused,
            )
            write_meta(snap)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            with contextlib.suppress(Exception):
                await self._vm.resume()
            raise
        if resume:
            await self._vm.resume()
        return snap

    async def resume(self) -> None:
        """Run a VM paused by ``snapshot(resume=False)`` again."""
        await self._vm.resume()

    async def wait_ready(self, pattern: str, timeout: float | None = None) -> None:
        """Wait for ``pattern`` on the serial console; a VM that stops or stays silent
        past the timeout is killed and ends FAILED with the console tail."""
        limit = self._config.timeout if timeout is None else timeout
        console = Console(self._tap, self._vm.console_socket, limit)
        try:
            await console.wait_for(pattern)
        except CapsaTimeout:
            await self.fail(f"boot marker {pattern!r} not seen within {limit}s")
            raise BootTimeout(f"VM did not boot within {limit}s", self.console_tail()) from None
        except PatternNotFound:
            status = await self.wait()
            raise StartFailed(
                f"VM stopped before it booted ({status})", self.console_tail()
            ) from None

    async def wait(self, timeout: float | None = None) -> VmStatus:
        """Wait until the VM stops by itself; return its final status."""
        try:
            await asyncio.wait_for(asyncio.shield(self._done), timeout)
        except TimeoutError:
            raise CapsaTimeout(f"VM still running after {timeout}s") from None
        return self._status

    async def __aenter__(self) -> VmHandle:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.kill()

    # -- access ---------------------------------------------------------------------------------

    @property
    def config(self) -> VmConfig:
        return self._config

    @property
    def pid(self) -> int:
        """The QEMU process id."""
        return self._vm.pid

    def resources(self) -> ResourceConfig:
        return self._config.resources

    # -- network ----------------------------------------------------------------------------

    @property
    def mac(self) -> str:
        """The MAC address of the VM's network card."""
        return self._vm.mac

    def _attachment(self) -> Attachment:
        if self._network is None:
            raise InvalidConfig("this VM has no capsa network (use NetworkMode.user_nat())")
        if self._status.is_finished:
            raise NotRunning("VM is not running")
        return self._network

    async def set_network_policy(self, policy: NetworkPolicy | None) -> None:
        """Replace the egress policy. Connections and flows already admitted keep going; on a
        shared network (cluster) the policy is the network's, so every VM on it is affected."""
        await self._attachment().network.set_policy(policy)

    async def add_port_forward(
        self, protocol: IpProtocol, host_port: int, guest_port: int, host_addr: str = "127.0.0.1"
    ) -> int:
        """Listen on ``host_addr:host_port`` (0: any free port) for the guest's ``guest_port``;
        returns the host port."""
        forward = PortForward(protocol, host_port, guest_port, host_addr)
        return await self._attachment().add_port_forward(forward)

    async def remove_port_forward(
        self, protocol: IpProtocol, host_port: int, host_addr: str = "127.0.0.1"
    ) -> None:
        """Stop listening; connections already forwarded stay up."""
        await self._attachment().remove_port_forward(protocol, host_port, host_addr)

    async def network_stats(self) -> dict[str, object]:
        """Counters from the network's gateway (connections, flows, denied, leases)."""
        return await self._attachment().network.stack().stats()

    def guest_os(self) -> GuestOs:
        return GuestOs.LINUX

    async def console(self) -> Console:
        if not self._config.console:
            raise ConsoleNotEnabled("console not enabled for this VM: use .console_enabled()")
        if self._status.is_finished:
            raise NotRunning("VM is not running")
        if self._console is None:
            self._console = Console(self._tap, self._vm.console_socket, self._config.timeout)
        return self._console

    def console_tail(self, max_chars: int = 4000) -> str:
        """The last lines the guest printed on its serial port (kept even without a console)."""
        return self._tap.tail(max_chars)

    def vsock_socket(self, port: int) -> VsockSocket | None:
        return self._vsock.get(port)

    def vsock_sockets(self) -> dict[int, VsockSocket]:
        return dict(self._vsock)

    @property
    def backend_vm(self) -> BackendVm:
        return self._vm

    def use_exit_code_from(self, source: ExitCodeSource) -> None:
        """Where the final status's exit code comes from when the guest reported one (a
        sandbox's main process), instead of QEMU's."""
        self._exit_code_source = source

    def before_teardown(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run ``hook`` once the VM has ended, before its resources are released."""
        self._before_cleanup.append(hook)
