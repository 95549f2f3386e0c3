"""capsa: Linux micro-VMs as sandboxes, from Python.

>>> import capsa
>>> boot = capsa.LinuxDirectBoot(kernel, initrd)
>>> async with await capsa.vm(boot).console_enabled().build() as vm:
...     console = await vm.console()
"""

from capsa.api.builders import VmBuilder, vm
from capsa.api.console import Console, ConsoleWriter
from capsa.api.handle import VmHandle, VmState, VmStatus
from capsa.api.vsock import VsockSocket
from capsa.config import (
    DiskImage,
    GuestOs,
    ImageFormat,
    KernelCmdline,
    LinuxDirectBoot,
    MountMode,
    ResourceConfig,
    UefiBoot,
    VmConfig,
    VsockPortConfig,
)
from capsa.errors import (
    AgentDisconnected,
    AgentError,
    AgentProtocolError,
    BackendUnavailable,
    BootTimeout,
    CapsaError,
    CapsaTimeout,
    ConsoleNotEnabled,
    ImageBuildError,
    InvalidConfig,
    NotRunning,
    PatternNotFound,
    PoolEmpty,
    PoolShutdown,
    StartFailed,
    UnsupportedFeature,
)

__version__ = "0.1.0"

__all__ = [
    "AgentDisconnected",
    "AgentError",
    "AgentProtocolError",
    "BackendUnavailable",
    "BootTimeout",
    "CapsaError",
    "CapsaTimeout",
    "Console",
    "ConsoleNotEnabled",
    "ConsoleWriter",
    "DiskImage",
    "GuestOs",
    "ImageBuildError",
    "ImageFormat",
    "InvalidConfig",
    "KernelCmdline",
    "LinuxDirectBoot",
    "MountMode",
    "NotRunning",
    "PatternNotFound",
    "PoolEmpty",
    "PoolShutdown",
    "ResourceConfig",
    "StartFailed",
    "UefiBoot",
    "UnsupportedFeature",
    "VmBuilder",
    "VmConfig",
    "VmHandle",
    "VmState",
    "VmStatus",
    "VsockPortConfig",
    "VsockSocket",
    "__version__",
    "vm",
]
