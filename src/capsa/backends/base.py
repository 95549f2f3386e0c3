"""The seam between the public API and a hypervisor: a backend turns a config into a VM."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from capsa.spec.vm import VmConfig, VsockPortConfig


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do on this host (``capsa backends`` prints it)."""

    name: str
    available: bool
    reason: str
    accelerator: str = ""
    accelerator_reason: str = ""
    boot_methods: tuple[str, ...] = ()
    image_formats: tuple[str, ...] = ()
    network_modes: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    unavailable: dict[str, str] = field(default_factory=dict)
    # What confines the VMs and helpers it starts, each with its state ("on ..."/"off ...").
    confinement: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NetworkPlug:
    """Where a VM's NIC connects: a switch port of capsa's network stack, made before the
    VM starts (QEMU never reconnects), and the MTU that network uses."""

    socket: Path
    mtu: int
    datagram: bool = False  # one frame per unixgram datagram, not a length-prefixed stream


@dataclass(frozen=True)
class NicNeeds:
    """What a backend's NIC needs of a network port."""

    datagram: bool = False
    max_mtu: int | None = None


@dataclass(frozen=True)
class ExitInfo:
    """How a VM process ended."""

    exit_code: int | None
    reason: str
    """``guest-shutdown``, ``guest-reset``, ``killed``, ``host-quit``, ``crashed`` ..."""
    error: str | None = None


class BackendVm(Protocol):
    """One running VM as the backend sees it."""

    @property
    def mac(self) -> str:
        """The MAC address of the VM's NIC (the one the API gave ``start()``)."""
        ...

    @property
    def pid(self) -> int: ...

    @property
    def console_socket(self) -> socket.socket:
        """The host end of the guest's serial port (always attached, for boot logs)."""
        ...

    def serial_port_socket(self, name: str) -> socket.socket:
        """The host end of a named virtio-serial port."""
        ...

    async def request_shutdown(self) -> None:
        """Ask the guest to power off (ACPI power button)."""
        ...

    async def kill(self) -> None: ...

    async def wait(self) -> ExitInfo: ...

    def vsock_path(self, port: VsockPortConfig) -> Path:
        """Where host programs connect for vsock ``port``."""
        ...

    def snapshot_blocker(self) -> str | None:
        """Why this VM cannot be snapshotted (None: it can)."""
        ...

    async def save(self, dest: Path) -> None:
        """Pause the VM and write its state into the directory ``dest``; it stays paused."""
        ...

    async def resume(self) -> None:
        """Run a paused VM again."""
        ...

    async def cleanup(self) -> None:
        """Release every host resource (helpers, sockets, run dir). Idempotent."""
        ...


class Backend(Protocol):
    name: str

    def capabilities(self) -> Capabilities: ...

    def nic_needs(self) -> NicNeeds:
        """How this backend's NIC wants its network port (asked before the port is made)."""
        ...

    def validate(self, config: VmConfig) -> None:
        """Raise InvalidConfig/UnsupportedFeature for what this backend cannot run."""
        ...

    def snapshot_blocker(self, config: VmConfig) -> str | None:
        """Why a VM of ``config`` could not be snapshotted here (None: it could)."""
        ...

    def state_identity(self, arch: str) -> dict[str, str]:
        """What a saved state of an ``arch`` guest depends on besides the VM itself (the
        hypervisor's build, the accelerator): a template is made again when it changes."""
        ...

    async def start(
        self,
        config: VmConfig,
        *,
        mac: str,
        net: NetworkPlug | None = None,
        restore_from: Path | None = None,
    ) -> BackendVm:
        """Start the VM (its NIC, if any, on ``net`` with ``mac``), or load the snapshot
        in ``restore_from`` into it."""
        ...
