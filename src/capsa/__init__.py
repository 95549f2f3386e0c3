"""capsa: Linux micro-VMs as sandboxes, from Python.

>>> import capsa
>>> boot = capsa.LinuxDirectBoot(kernel, initrd)
>>> async with await capsa.vm(boot).console_enabled().build() as vm:
...     console = await vm.console()
"""

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
from capsa.api.console import Console, ConsoleWriter
from capsa.api.handle import VmHandle, VmState, VmStatus
from capsa.api.network import Gateway, NetworkCluster, NetworkInterface, NetworkMode, VirtualNetwork
from capsa.api.pool import Pool, Pooled, VmPool
from capsa.api.restore import restore
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
    ConsoleNotEnabled,
    ImageBuildError,
    InvalidConfig,
    NotRunning,
    OutputLimitExceeded,
    PatternNotFound,
    PoolEmpty,
    PoolShutdown,
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
    "Console",
    "ConsoleNotEnabled",
    "ConsoleWriter",
    "DirEntry",
    "DiskImage",
    "ExecCommand",
    "ExecResult",
    "FileStat",
    "Gateway",
    "GuestOs",
    "ImageBuildError",
    "ImageFormat",
    "InvalidConfig",
    "IpProtocol",
    "KernelCmdline",
    "LinuxDirectBoot",
    "MatchCriteria",
    "MountInfo",
    "MountMode",
    "NetworkCluster",
    "NetworkInterface",
    "NetworkMode",
    "NetworkPolicy",
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
    "Protocol",
    "ResourceConfig",
    "Sandbox",
    "SandboxBuilder",
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
    "sandbox",
    "vm",
]
