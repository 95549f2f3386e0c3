"""The configuration types under their old home, for code written against it.

They now live by concept: :mod:`capsa.spec.vm` (boot, disks, command line, resources,
vsock, ``VmConfig``), :mod:`capsa.spec.shares` (shared folders), :mod:`capsa.net.spec`
(networks as data), :mod:`capsa.api.network` (the network builders) and
:mod:`capsa._util.host` (host facts). Nothing inside capsa imports this module.
"""

from capsa._util.host import host_arch, share_transport
from capsa.api.network import ClusterPortBuilder, NetworkMode, UserNatBuilder
from capsa.net.spec import (
    ClusterPortConfig,
    NetworkPort,
    NetworkSpec,
    PortForward,
    QemuNat,
    UserNatConfig,
    check_forwards,
    check_subnet,
    dns_upstream,
    host_alias,
)
from capsa.spec.shares import (
    MAX_TAG_BYTES,
    MountMode,
    Ownership,
    OwnershipMode,
    SharedDir,
    check_share,
    check_shares,
)
from capsa.spec.vm import (
    GUEST_ARCHES,
    BootConfig,
    CmdlineArg,
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

__all__ = [
    "GUEST_ARCHES",
    "MAX_TAG_BYTES",
    "BootConfig",
    "ClusterPortBuilder",
    "ClusterPortConfig",
    "CmdlineArg",
    "DiskImage",
    "GuestOs",
    "ImageFormat",
    "KernelCmdline",
    "LinuxDirectBoot",
    "MountMode",
    "NetworkMode",
    "NetworkPort",
    "NetworkSpec",
    "Ownership",
    "OwnershipMode",
    "PortForward",
    "QemuNat",
    "ResourceConfig",
    "SharedDir",
    "UefiBoot",
    "UserNatBuilder",
    "UserNatConfig",
    "VmConfig",
    "VsockPortConfig",
    "check_forwards",
    "check_share",
    "check_shares",
    "check_subnet",
    "dns_upstream",
    "host_alias",
    "host_arch",
    "share_transport",
]
