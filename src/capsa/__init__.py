"""capsa: Linux micro-VMs as sandboxes, from Python.

>>> import capsa
>>> boot = capsa.LinuxDirectBoot(kernel, initrd)
>>> async with await capsa.vm(boot).console_enabled().build() as vm:
...     console = await vm.console()
"""

# Public names load on first use (PEP 562): a helper process importing one module of
# capsa, and `capsa --help`, do not pay for the whole API.
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from capsa.api.agent import (
        AgentClient,
        DirEntry,
        ExecCommand,
        ExecResult,
        FileStat,
        MountInfo,
        Process,
        SystemInfo,
    )
    from capsa.api.builders import PoolBuilder, VmBuilder, pool, vm
    from capsa.api.code import CodeContext, CodeError, CodeEvent, Execution
    from capsa.api.console import Console, ConsoleWriter
    from capsa.api.handle import VmHandle, VmState, VmStatus
    from capsa.api.network import (
        Gateway,
        NetworkCluster,
        NetworkInterface,
        NetworkMode,
        VirtualNetwork,
    )
    from capsa.api.pool import Pool, Pooled, VmPool
    from capsa.api.restore import restore, resume
    from capsa.api.sandbox import SandboxBuilder, sandbox
    from capsa.api.sandbox_handle import Sandbox
    from capsa.api.snapshot import Snapshot
    from capsa.api.vsock import VsockSocket
    from capsa.errors import (
        AgentDisconnected,
        AgentError,
        AgentLimitExceeded,
        AgentProtocolError,
        BackendUnavailable,
        BootTimeout,
        CapsaError,
        CapsaTimeout,
        CodeContextError,
        ConsoleNotEnabled,
        ImageBuildError,
        InvalidConfig,
        NoCapacity,
        NodeLost,
        NotRunning,
        OutputLimitExceeded,
        PatternNotFound,
        PoolEmpty,
        PoolShutdown,
        SandboxLost,
        SnapshotError,
        StartFailed,
        UnsupportedFeature,
    )
    from capsa.net.policy import IpProtocol, MatchCriteria, NetworkPolicy, PolicyAction, Protocol
    from capsa.net.spec import PortForward, UserNatConfig
    from capsa.spec.shares import MountMode, Ownership, OwnershipMode, SharedDir
    from capsa.spec.vm import (
        DiskImage,
        GuestOs,
        ImageFormat,
        KernelCmdline,
        LinuxDirectBoot,
        ResourceConfig,
        UefiBoot,
        VmConfig,
        VsockPortConfig,
    )

__version__ = "0.1.0"

_EXPORTS = {
    "CodeContext": "capsa.api.code",
    "CodeContextError": "capsa.errors",
    "ProcessError": "capsa.errors",
    "SandboxExpired": "capsa.errors",
    "SandboxLost": "capsa.errors",
    "NodeLost": "capsa.errors",
    "NoCapacity": "capsa.errors",
    "Metrics": "capsa.api.metrics",
    "ProcessInfo": "capsa.api.agent",
    "FileEvent": "capsa.api.agent",
    "FileWatch": "capsa.api.agent",
    "CodeError": "capsa.api.code",
    "CodeEvent": "capsa.api.code",
    "Execution": "capsa.api.code",
    "AgentClient": "capsa.api.agent",
    "AgentDisconnected": "capsa.errors",
    "AgentError": "capsa.errors",
    "AgentLimitExceeded": "capsa.errors",
    "AgentProtocolError": "capsa.errors",
    "BackendUnavailable": "capsa.errors",
    "BootTimeout": "capsa.errors",
    "CapsaError": "capsa.errors",
    "CapsaTimeout": "capsa.errors",
    "Console": "capsa.api.console",
    "ConsoleNotEnabled": "capsa.errors",
    "ConsoleWriter": "capsa.api.console",
    "DirEntry": "capsa.api.agent",
    "DiskImage": "capsa.spec.vm",
    "ExecCommand": "capsa.api.agent",
    "ExecResult": "capsa.api.agent",
    "FileStat": "capsa.api.agent",
    "Gateway": "capsa.api.network",
    "GuestOs": "capsa.spec.vm",
    "ImageBuildError": "capsa.errors",
    "ImageFormat": "capsa.spec.vm",
    "InvalidConfig": "capsa.errors",
    "IpProtocol": "capsa.net.policy",
    "KernelCmdline": "capsa.spec.vm",
    "LinuxDirectBoot": "capsa.spec.vm",
    "MatchCriteria": "capsa.net.policy",
    "MountInfo": "capsa.api.agent",
    "MountMode": "capsa.spec.shares",
    "NetworkCluster": "capsa.api.network",
    "NetworkInterface": "capsa.api.network",
    "NetworkMode": "capsa.api.network",
    "NetworkPolicy": "capsa.net.policy",
    "NotRunning": "capsa.errors",
    "OutputLimitExceeded": "capsa.errors",
    "Ownership": "capsa.spec.shares",
    "OwnershipMode": "capsa.spec.shares",
    "PatternNotFound": "capsa.errors",
    "PolicyAction": "capsa.net.policy",
    "pool": "capsa.api.builders",
    "Pool": "capsa.api.pool",
    "PoolBuilder": "capsa.api.builders",
    "Pooled": "capsa.api.pool",
    "PoolEmpty": "capsa.errors",
    "PoolShutdown": "capsa.errors",
    "PortForward": "capsa.net.spec",
    "Process": "capsa.api.agent",
    "Protocol": "capsa.net.policy",
    "ResourceConfig": "capsa.spec.vm",
    "restore": "capsa.api.restore",
    "resume": "capsa.api.restore",
    "sandbox": "capsa.api.sandbox",
    "Sandbox": "capsa.api.sandbox_handle",
    "SandboxBuilder": "capsa.api.sandbox",
    "SharedDir": "capsa.spec.shares",
    "Snapshot": "capsa.api.snapshot",
    "SnapshotError": "capsa.errors",
    "StartFailed": "capsa.errors",
    "SystemInfo": "capsa.api.agent",
    "UefiBoot": "capsa.spec.vm",
    "UnsupportedFeature": "capsa.errors",
    "UserNatConfig": "capsa.net.spec",
    "VirtualNetwork": "capsa.api.network",
    "vm": "capsa.api.builders",
    "VmBuilder": "capsa.api.builders",
    "VmConfig": "capsa.spec.vm",
    "VmHandle": "capsa.api.handle",
    "VmPool": "capsa.api.pool",
    "VmState": "capsa.api.handle",
    "VmStatus": "capsa.api.handle",
    "VsockPortConfig": "capsa.spec.vm",
    "VsockSocket": "capsa.api.vsock",
}


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'capsa' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "AgentClient",
    "AgentDisconnected",
    "AgentError",
    "AgentLimitExceeded",
    "AgentProtocolError",
    "BackendUnavailable",
    "BootTimeout",
    "CapsaError",
    "CapsaTimeout",
    "CodeContext",
    "CodeContextError",
    "CodeError",
    "CodeEvent",
    "Console",
    "ConsoleNotEnabled",
    "ConsoleWriter",
    "DirEntry",
    "DiskImage",
    "ExecCommand",
    "ExecResult",
    "Execution",
    "FileEvent",
    "FileStat",
    "FileWatch",
    "Gateway",
    "GuestOs",
    "ImageBuildError",
    "ImageFormat",
    "InvalidConfig",
    "IpProtocol",
    "KernelCmdline",
    "LinuxDirectBoot",
    "MatchCriteria",
    "Metrics",
    "MountInfo",
    "MountMode",
    "NetworkCluster",
    "NetworkInterface",
    "NetworkMode",
    "NetworkPolicy",
    "NoCapacity",
    "NodeLost",
    "NotRunning",
    "OutputLimitExceeded",
    "Ownership",
    "OwnershipMode",
    "PatternNotFound",
    "PolicyAction",
    "Pool",
    "PoolBuilder",
    "PoolEmpty",
    "PoolShutdown",
    "Pooled",
    "PortForward",
    "Process",
    "ProcessError",
    "ProcessInfo",
    "Protocol",
    "ResourceConfig",
    "Sandbox",
    "SandboxBuilder",
    "SandboxExpired",
    "SandboxLost",
    "SharedDir",
    "Snapshot",
    "SnapshotError",
    "StartFailed",
    "SystemInfo",
    "UefiBoot",
    "UnsupportedFeature",
    "UserNatConfig",
    "VirtualNetwork",
    "VmBuilder",
    "VmConfig",
    "VmHandle",
    "VmPool",
    "VmState",
    "VmStatus",
    "VsockPortConfig",
    "VsockSocket",
    "__version__",
    "pool",
    "restore",
    "resume",
    "sandbox",
    "vm",
]
