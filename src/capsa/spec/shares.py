"""Shared folders: a host directory, the tag the guest knows it by, read-only or
read-write, whom its files appear to belong to, and where a sandbox mounts it."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from capsa.errors import InvalidConfig


class MountMode(enum.Enum):
    READ_ONLY = "ro"
    READ_WRITE = "rw"


class OwnershipMode(enum.Enum):
    PASSTHROUGH = "passthrough"  # host uid/gid as they are; chown is a real host chown
    SQUASH = "squash"  # every file appears owned by one uid/gid; chown succeeds, no effect
    DYNAMIC_CALLER = "dynamic_caller"  # each file appears owned by whoever looks at it


@dataclass(frozen=True)
class Ownership:
    """How a share reports file owners to the guest (files are always created on the host
    with the ids of the process serving the share)."""

    mode: OwnershipMode = OwnershipMode.SQUASH
    uid: int = 0
    gid: int = 0

    def __post_init__(self) -> None:
        for what, value in (("uid", self.uid), ("gid", self.gid)):
            if not 0 <= value < 0xFFFFFFFF:
                raise InvalidConfig(f"ownership {what} {value} is not a valid id")

    @classmethod
    def passthrough(cls) -> Ownership:
        return cls(OwnershipMode.PASSTHROUGH)

    @classmethod
    def squash(cls, uid: int = 0, gid: int = 0) -> Ownership:
        return cls(OwnershipMode.SQUASH, uid, gid)

    @classmethod
    def squash_to_root(cls) -> Ownership:
        return cls(OwnershipMode.SQUASH, 0, 0)

    @classmethod
    def dynamic_caller(cls) -> Ownership:
        return cls(OwnershipMode.DYNAMIC_CALLER)

    def to_arg(self) -> str:
        return f"{self.mode.value}:{self.uid}:{self.gid}"

    @classmethod
    def from_arg(cls, text: str) -> Ownership:
        mode, uid, gid = text.split(":")
        return cls(OwnershipMode(mode), int(uid), int(gid))


MAX_TAG_BYTES = 36  # the virtio-fs config space holds the tag in 36 bytes


@dataclass(frozen=True)
class SharedDir:
    """A host directory exported to the guest as a virtio-fs device with ``tag``.

    ``guest_path`` set: the sandbox's init mounts it there during boot. Without it the
    guest mounts it itself: ``mount -t virtiofs TAG /mnt``.
    """

    host_path: Path
    tag: str
    mode: MountMode = MountMode.READ_ONLY
    ownership: Ownership = field(default_factory=Ownership.squash_to_root)
    guest_path: str | None = None

    @property
    def read_only(self) -> bool:
        return self.mode is MountMode.READ_ONLY

    @classmethod
    def of(
        cls,
        host_path: str | Path,
        tag: str,
        mode: MountMode = MountMode.READ_ONLY,
        ownership: Ownership | None = None,
        guest_path: str | None = None,
    ) -> SharedDir:
        """The builders' shorthand: ``~`` expanded, owners squashed to root by default."""
        owners = ownership or Ownership.squash_to_root()
        return cls(Path(host_path).expanduser(), tag, mode, owners, guest_path)


def check_share(share: SharedDir) -> None:
    """Every mistake a share can carry, found at build time."""
    if not isinstance(share.mode, MountMode):
        raise InvalidConfig(f"share {share.tag!r}: mode must be a MountMode, not {share.mode!r}")
    encoded = share.tag.encode()
    if not 0 < len(encoded) <= MAX_TAG_BYTES:
        raise InvalidConfig(f"share tag {share.tag!r} must be 1 to {MAX_TAG_BYTES} bytes")
    if any(c.isspace() or c in ":,=%\0" for c in share.tag) or not share.tag.isprintable():
        raise InvalidConfig(f"share tag {share.tag!r} may not contain spaces, ':', ',', '=', '%'")
    if not share.host_path.exists():
        raise InvalidConfig(f"share {share.tag!r}: host path {share.host_path} does not exist")
    if not share.host_path.is_dir():
        raise InvalidConfig(f"share {share.tag!r}: host path {share.host_path} is not a directory")
    if share.guest_path is not None:
        path = share.guest_path
        if not path.startswith("/") or ".." in path.split("/") or "\0" in path or path == "/":
            raise InvalidConfig(
                f"share {share.tag!r}: guest path {path!r} must be absolute, not '/', without '..'"
            )


def check_shares(shares: Sequence[SharedDir]) -> None:
    tags: set[str] = set()
    paths: set[str] = set()
    for share in shares:
        check_share(share)
        if share.tag in tags:
            raise InvalidConfig(f"share tag {share.tag!r} is used twice")
        tags.add(share.tag)
        if share.guest_path is not None:
            normal = share.guest_path.rstrip("/")
            if normal in paths:
                raise InvalidConfig(f"two shares are mounted at {share.guest_path!r}")
            paths.add(normal)
