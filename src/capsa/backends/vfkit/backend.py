"""The vfkit backend: one ``vfkit`` process per VM, driven through its REST API.

vfkit exposes the console and the agent channel as PTYs (their paths come from
``GET /vm/inspect``); capsa bridges each to a socketpair so the rest of capsa sees the
same byte streams as with QEMU. Stopping is ``POST /vm/state {"state": "Stop"}``; a kill
is a signal to the process, which always works.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from capsa._util.reaper import REAPER
from capsa._util.rundir import RunDir
from capsa.backends.base import Capabilities, ExitInfo, NetworkPlug, NicNeeds
from capsa.backends.vfkit.cmdline import VfkitFacts, build_vfkit_argv, check_vfkit_config
from capsa.backends.vfkit.rest import VfkitApiError, VfkitClient
from capsa.errors import BackendUnavailable, StartFailed, UnsupportedFeature
from capsa.spec.vm import KernelCmdline, LinuxDirectBoot, VmConfig, VsockPortConfig

START_TIMEOUT = 30.0
VZ_MTU = 1500


def find_vfkit() -> str:
    path = os.environ.get("CAPSA_VFKIT") or shutil.which("vfkit")
    if path is None:
        raise BackendUnavailable("vfkit not found on PATH: install it with `brew install vfkit`")
    return path


def default_vfkit_cmdline(config: VmConfig) -> str:
    """virtio consoles are hvc0, hvc1... under vfkit (no named ports): the console is hvc0
    and a sandbox's agent channel hvc1. The user's args win."""
    defaults = KernelCmdline().with_arg("console", "hvc0").with_arg("reboot", "t")
    defaults = defaults.with_arg("panic", "-1").with_arg("quiet")
    if config.serial_ports:
        defaults = defaults.with_arg("capsa.agent", "hvc1")
    return config.cmdline.merged_over(defaults)


class VfkitBackend:
    name = "vfkit"

    def capabilities(self) -> Capabilities:
        available, reason = False, "vfkit runs only on macOS (Virtualization.framework)"
        if sys.platform == "darwin" or os.environ.get("CAPSA_VFKIT"):
            try:
                available, reason = True, f"vfkit at {find_vfkit()}"
            except BackendUnavailable as e:
                reason = str(e)
        return Capabilities(
            name=self.name,
            available=available,
            reason=reason,
            accelerator="vz",
            accelerator_reason="Apple Virtualization.framework",
            boot_methods=("linux_direct", "uefi"),
            image_formats=("raw",),
            network_modes=("none", "nat", "user_nat", "cluster"),
            devices=("console", "virtio-blk", "virtio-serial", "vsock", "virtio-fs", "virtio-rng"),
            unavailable={
                "qcow2": "Virtualization.framework attaches raw images only (use APFS clones)",
                "snapshots": "vfkit cannot save or restore VM state",
                "share ownership": "every file appears owned by the caller (DynamicCaller)",
            },
        )

    def validate(self, config: VmConfig) -> None:
        check_vfkit_config(config)
        caps = self.capabilities()
        if not caps.available:
            raise BackendUnavailable(caps.reason)

    def snapshot_blocker(self, config: VmConfig) -> str | None:
        return "vfkit cannot save VM state"

    def state_identity(self, arch: str) -> dict[str, str]:
        return {"backend": "vfkit"}

    def nic_needs(self) -> NicNeeds:
        # vfkit's unixSocketPath NIC sends datagrams, and Virtualization.framework's
        # file-handle NIC carries standard 1500-byte frames.
        return NicNeeds(datagram=True, max_mtu=VZ_MTU)

    async def start(
        self,
        config: VmConfig,
        *,
        mac: str,
        net: NetworkPlug | None = None,
        restore_from: Path | None = None,
    ) -> VfkitVm:
        if restore_from is not None:
            raise UnsupportedFeature("vfkit cannot restore snapshots")
        vm = VfkitVm(config, mac=mac, net=net)
        try:
            await vm.start()
        except BaseException:
            await vm.cleanup()
            raise
        return vm


class _PtyBridge:
    """Copies between a PTY (vfkit's side) and a socketpair (capsa's side)."""

    def __init__(self, pty_path: str) -> None:
        import termios
        import tty

        self.fd = os.open(pty_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        with contextlib.suppress(termios.error):
            # TCSANOW: the default TCSAFLUSH would drop what the guest printed before we came.
            tty.setraw(self.fd, termios.TCSANOW)
        self.host, self.inner = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.host.setblocking(False)
        self.inner.setblocking(False)
        loop = asyncio.get_running_loop()
        loop.add_reader(self.fd, self._from_pty)
        loop.add_reader(self.inner.fileno(), self._to_pty)

    def _from_pty(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            with contextlib.suppress(OSError):
                self.inner.sendall(data)

    def _to_pty(self) -> None:
        try:
            data = self.inner.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        if data:
            with contextlib.suppress(OSError):
                os.write(self.fd, data)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.fd)
        loop.remove_reader(self.inner.fileno())
        os.close(self.fd)
        self.inner.close()
        self.host.close()


class VfkitVm:
    """One vfkit process and what it owns."""

    def __init__(self, config: VmConfig, *, mac: str, net: NetworkPlug | None) -> None:
        self.config = config
        self.run_dir = RunDir()
        self._mac = mac
        self.net = net
        self.rest_socket = self.run_dir.socket_path("vfkit.sock")
        self.argv: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._client: VfkitClient | None = None
        self._bridges: list[_PtyBridge] = []
        self._ports: dict[str, _PtyBridge] = {}
        self._exit: ExitInfo | None = None
        self._stop_requested = False

    @property
    def mac(self) -> str:
        return self._mac

    def vsock_path(self, port: VsockPortConfig) -> Path:
        return port.socket_path or self.run_dir.socket_path(f"vsock-{port.port}.sock")

    async def start(self) -> None:
        efi_vars = None
        if not isinstance(self.config.boot, LinuxDirectBoot):
            efi_vars = self.run_dir.path / "efi-vars"
        facts = VfkitFacts(
            binary=find_vfkit(),
            rest_socket=self.rest_socket,
            vsock_paths={p.port: self.vsock_path(p) for p in self.config.vsock_ports},
            mac=self.mac,
            efi_vars=efi_vars,
            net_socket=self.net.socket if self.net else None,
        )
        cmdline = default_vfkit_cmdline(self.config)
        self.argv = build_vfkit_argv(self.config, facts, cmdline)
        with open(self.run_dir.path / "vfkit.stderr", "wb") as stderr:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        REAPER.watch_pid(self._proc.pid)
        self._client = VfkitClient(self.rest_socket)
        inspect = await self._wait_for_api()
        ptys = [
            d.get("ptyName") for d in inspect.get("devices", []) if d.get("kind") == "virtioserial"
        ]
        ptys = [p for p in ptys if p]
        if len(ptys) < 1 + len(self.config.serial_ports):
            raise StartFailed(
                f"vfkit reported {len(ptys)} serial PTYs, capsa needs "
                f"{1 + len(self.config.serial_ports)}"
            )
        self._bridges = [_PtyBridge(p) for p in ptys]
        self._ports = dict(zip(self.config.serial_ports, self._bridges[1:], strict=False))

    async def _wait_for_api(self) -> dict[str, Any]:
        assert self._proc is not None and self._client is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while True:
            if self._proc.returncode is not None:
                raise StartFailed(
                    f"vfkit exited with {self._proc.returncode}: {self.stderr_text()}"
                )
            if self.rest_socket.exists():
                with contextlib.suppress(VfkitApiError):
                    return await self._client.inspect()
            if loop.time() > deadline:
                raise StartFailed(f"vfkit's REST service did not come up: {self.stderr_text()}")
            await asyncio.sleep(0.05)

    def stderr_text(self) -> str:
        try:
            return (self.run_dir.path / "vfkit.stderr").read_text(errors="replace").strip()
        except OSError:
            return ""

    # -- BackendVm ---------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def console_socket(self) -> socket.socket:
        return self._bridges[0].host

    def serial_port_socket(self, name: str) -> socket.socket:
        return self._ports[name].host

    async def request_shutdown(self) -> None:
        if self._client is not None:
            self._stop_requested = True
            with contextlib.suppress(VfkitApiError):
                await self._client.stop()

    async def kill(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        await self.wait()

    async def wait(self) -> ExitInfo:
        if self._exit is None:
            assert self._proc is not None
            code = await self._proc.wait()
            if code < 0:
                self._exit = ExitInfo(None, "killed", f"vfkit killed by signal {-code}")
            elif code != 0:
                self._exit = ExitInfo(
                    code, "crashed", f"vfkit exited with {code}: {self.stderr_text()}"
                )
            else:
                self._exit = ExitInfo(0, "guest-shutdown")
        return self._exit

    def snapshot_blocker(self) -> str | None:
        return "vfkit cannot save VM state"

    async def save(self, dest: Path) -> None:
        raise UnsupportedFeature("vfkit cannot save VM state")

    async def resume(self) -> None:
        if self._client is not None:
            await self._client.change_state("Resume")

    async def cleanup(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()
        if self._proc is not None:
            REAPER.unwatch_pid(self._proc.pid)
        if self._client is not None:
            await self._client.close()
        for bridge in self._bridges:
            with contextlib.suppress(OSError):
                bridge.close()
        self._bridges = []
        self.run_dir.remove()
