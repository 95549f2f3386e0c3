"""A running sandbox (:class:`Sandbox`) and the three ways one starts: booted, restored
from a template, or restored from a snapshot of a running sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType

from capsa.api.agent import AgentClient
from capsa.api.agent_channel import AgentChannel
from capsa.api.code import CodeContext, Execution
from capsa.api.console import Console
from capsa.api.guest_setup import GuestSetup, resume_agent, set_up_booted, set_up_restored
from capsa.api.handle import VmHandle, VmStatus
from capsa.api.launch import start_vm
from capsa.api.metrics import Metrics, Sample, parse_usage
from capsa.api.snapshot import Snapshot, snapshot_scratch
from capsa.api.vsock import VsockSocket
from capsa.errors import BootTimeout, CapsaTimeout, InvalidConfig, SandboxExpired, StartFailed
from capsa.guest.protocol import AGENT_PORT_NAME
from capsa.net.policy import IpProtocol, NetworkPolicy
from capsa.net.spec import NetworkPort
from capsa.spec.vm import ResourceConfig, VmConfig

DEFAULT_TIMEOUT = 60.0
log = logging.getLogger("capsa.sandbox")

# Given the agent channel and the VM: brings the guest from its hello to ready.
Prepare = Callable[[AgentChannel, VmHandle], Awaitable[None]]


def _retrieve(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()  # reported by agent(); never "exception was never retrieved"


async def launch_sandbox(
    config: VmConfig,
    timeout: float,
    prepare: Prepare,
    *,
    restore_from: Path | None = None,
    mac: str | None = None,
) -> Sandbox:
    """Start the VM, connect its agent, and prepare the guest in the background."""
    handle = await start_vm(config, restore_from=restore_from, mac=mac)
    try:
        sock = handle.backend_vm.serial_port_socket(AGENT_PORT_NAME)
        client = await AgentClient.connect_socket(sock)
        return Sandbox(handle, client, timeout, prepare(client.channel, handle))
    except BaseException:
        await handle.kill()
        raise


def new_mac(config: VmConfig, handle: VmHandle) -> str | None:
    """The MAC a restored guest must take: the one its port on capsa's network was made for."""
    return handle.mac if isinstance(config.network, NetworkPort) else None


async def boot_sandbox(config: VmConfig, setup: GuestSetup, timeout: float) -> Sandbox:
    """A sandbox booted cold."""

    async def prepare(channel: AgentChannel, handle: VmHandle) -> None:
        await set_up_booted(channel, setup, config)

    return await launch_sandbox(config, timeout, prepare)


async def restore_template(
    template: Path, config: VmConfig, setup: GuestSetup, timeout: float
) -> Sandbox:
    """A sandbox restored from a template (a snapshot taken at the agent's hello)."""

    async def prepare(channel: AgentChannel, handle: VmHandle) -> None:
        await set_up_restored(channel, setup, config, new_mac(config, handle))

    sandbox = await launch_sandbox(config, timeout, prepare, restore_from=template)
    sandbox.template = template
    return sandbox


async def restore_sandbox(snapshot: Path, config: VmConfig, timeout: float) -> Sandbox:
    """A running copy of the sandbox saved in ``snapshot``, with an identity of its own."""

    async def prepare(channel: AgentChannel, handle: VmHandle) -> None:
        await resume_agent(channel, new_mac(config, handle))

    sandbox = await launch_sandbox(config, timeout, prepare, restore_from=snapshot)
    return await ready_or_killed(sandbox)


async def resume_sandbox(snap: Snapshot) -> Sandbox:
    """The sandbox paused into ``snap``, running again as the same machine: its MAC,
    address and machine id stay; only its clock and RNG are renewed."""

    async def prepare(channel: AgentChannel, handle: VmHandle) -> None:
        await resume_agent(channel, None)

    timeout = snap.sandbox_timeout or DEFAULT_TIMEOUT
    sandbox = await launch_sandbox(
        snap.config, timeout, prepare, restore_from=snap.path, mac=snap.mac
    )
    return await ready_or_killed(sandbox)


async def ready_or_killed(sandbox: Sandbox) -> Sandbox:
    """``sandbox`` once its agent answers; killed if it never does."""
    try:
        await sandbox.agent()
    except BaseException:
        await sandbox.kill()
        raise
    return sandbox


class Sandbox:
    """A running sandbox: its VM plus the agent channel."""

    def __init__(
        self, vm: VmHandle, client: AgentClient, timeout: float, prepare: Awaitable[None]
    ) -> None:
        self._vm = vm
        self._client = client
        self._timeout = timeout
        # The template this sandbox was restored from (None: it booted, or is a copy of
        # another sandbox's snapshot).
        self.template: Path | None = None
        vm.use_exit_code_from(lambda: client.exit_code)
        vm.before_teardown(client.close)
        # Hello, then set-up (or resume): the sandbox is ready when this is done.
        self._ready = asyncio.ensure_future(prepare)
        self._ready.add_done_callback(_retrieve)
        vm.before_teardown(self._cancel_prepare)
        self._usage: Sample | None = None
        # Limits: the loop-clock deadline of its lifetime, its idle timeout, and why it
        # ended if one of them ended it.
        self._deadline: float | None = None
        self._lifetime: float | None = None
        self._idle_timeout: float | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.expired: SandboxExpired | None = None

    async def _cancel_prepare(self) -> None:
        self._ready.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()

    # -- limits ---------------------------------------------------------------------------

    def set_lifetime(self, seconds: float | None) -> None:
        """End the sandbox ``seconds`` from now (None: no lifetime); call again to extend."""
        self._lifetime = check_limit("lifetime", seconds)
        now = asyncio.get_running_loop().time()
        self._deadline = None if self._lifetime is None else now + self._lifetime
        self._rewatch()

    def set_idle_timeout(self, seconds: float | None) -> None:
        """End the sandbox once its agent has had no traffic for ``seconds`` while no call
        that uses it is open (a running exec, a started process, a running code cell;
        following a background process or an idle code context is not use)."""
        self._idle_timeout = check_limit("idle_timeout", seconds)
        self._rewatch()

    def _rewatch(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = None
        if self._deadline is not None or self._idle_timeout is not None:
            self._watchdog = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        channel = self._client.channel
        while not self._vm.status().is_finished:
            now = loop.time()
            waits = []
            if self._deadline is not None:
                if now >= self._deadline:
                    return await self._expire(f"its lifetime of {self._lifetime:g}s ended")
                waits.append(self._deadline - now)
            if self._idle_timeout is not None:
                quiet = 0.0 if channel.busy else now - channel.last_active
                if quiet >= self._idle_timeout:
                    return await self._expire(f"it was idle for {self._idle_timeout:g}s")
                waits.append(self._idle_timeout - quiet if quiet else min(self._idle_timeout, 1.0))
            await asyncio.sleep(min(waits) + 0.01)

    async def _expire(self, why: str) -> None:
        self.expired = SandboxExpired(f"sandbox ended: {why}")
        log.warning("%s", self.expired)
        await self._vm.kill()

    # -- use --------------------------------------------------------------------------------

    async def metrics(self) -> Metrics:
        """CPU time and use since the previous call, memory, the writable layer's use and
        network bytes, from the guest."""
        header = await (await self.agent()).channel.request("metrics")
        metrics, self._usage = parse_usage(header, self._usage)
        return metrics

    async def agent(self, timeout: float | None = None) -> AgentClient:
        """The agent, once the sandbox is set up and ready (bounded by the builder's timeout)."""
        if self.expired is not None:
            raise self.expired
        if self._ready.done() and not self._ready.cancelled() and self._ready.exception() is None:
            return self._client
        limit = self._timeout if timeout is None else timeout
        ready = asyncio.ensure_future(asyncio.wait_for(asyncio.shield(self._ready), limit))
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
        failure = self._setup_failure()
        if failure is not None and ended not in done:
            await self._vm.fail(f"sandbox set-up failed: {failure}")
            raise StartFailed(f"sandbox set-up failed: {failure}", tail)
        if ended in done:
            status = await self._vm.wait()
            raise StartFailed(f"sandbox VM stopped before its agent was ready ({status})", tail)
        await self._vm.fail(f"sandbox agent not ready within {limit}s")
        raise BootTimeout(f"sandbox agent not ready within {limit}s", tail)

    def _setup_failure(self) -> BaseException | None:
        """Why preparing the sandbox failed (None: it did not, or is still going)."""
        if not self._ready.done() or self._ready.cancelled():
            return None
        error = self._ready.exception()
        return None if isinstance(error, TimeoutError | CapsaTimeout) else error

    # -- code -------------------------------------------------------------------------------

    async def code_context(self, language: str = "python") -> CodeContext:
        """A long-lived interpreter (``"python"`` or ``"bash"``) whose state lasts across
        the cells it runs, like a notebook kernel (see :class:`CodeContext`)."""
        return await CodeContext.start(await self.agent(), language)

    async def run_code(
        self, code: str, language: str = "python", *, timeout: float | None = None
    ) -> Execution:
        """Run ``code`` once in a fresh context and return what it produced."""
        async with await self.code_context(language) as ctx:
            return await ctx.run(code, timeout=timeout)

    # -- snapshots ----------------------------------------------------------------------

    async def snapshot(self, path: str | Path, *, resume: bool = True) -> Snapshot:
        """Save this sandbox into the new directory ``path`` (``capsa.restore(path)`` brings
        back running copies, each with its own MAC, lease, RNG state and clock)."""
        await self.agent()
        return await self._vm.snapshot_as(
            Path(path), "sandbox", resume=resume, sandbox_timeout=self._timeout
        )

    async def pause(self, path: str | Path) -> Snapshot:
        """Save this sandbox into the new directory ``path`` and stop it: it uses no CPU or
        memory until ``capsa.resume(path)`` runs it again, in this process or another, as
        the same machine (processes, files, address and identity as they were)."""
        await self.agent()
        snap = await self._vm.snapshot_as(
            Path(path), "sandbox", resume=False, sandbox_timeout=self._timeout, paused=True
        )
        await self._vm.kill()
        return snap

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


def check_limit(name: str, seconds: float | None) -> float | None:
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise InvalidConfig(f"{name} must be a number of seconds, not {seconds!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidConfig(f"{name} must be a positive number of seconds, got {seconds!r}")
    return float(seconds)
