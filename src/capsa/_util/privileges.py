"""Running QEMU and the helpers with as little privilege as they need.

When capsa runs as root (the usual case for a sandbox service), a compromised QEMU or
helper must not be a compromised host. So each of them runs as an identity of its own, a
uid/gid pair taken at random from a range no account uses (:func:`new_identity`), with
no capabilities beyond the few it needs, ``PR_SET_NO_NEW_PRIVS`` set, and (for QEMU) its
seccomp filter. What it must reach, it is handed: open file descriptors, and run
directories or socket files given to its identity.

Two ways to apply an identity:

- QEMU is started through ``setpriv`` (util-linux), which changes the ids and drops the
  capabilities before exec (:func:`setpriv_argv`);
- a helper (Python) starts as root, imports everything it will run, and then drops to its
  identity itself (:func:`drop_privileges`): its code may live where only root can read
  (an editable install under /root), and nothing of the guest's reaches it before that.

``CAPSA_CONFINE=0`` turns all of this off (debugging only); :func:`confinement` says
whether it applies and why not.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import secrets
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Unprivileged identities come from the top of the 31-bit range: above every account a
# distribution or an LDAP directory hands out, below nobody's 65534-style sentinels of
# 32-bit ids. Each VM and helper gets its own, so they cannot signal or ptrace each other.
ID_RANGE_START = 0x7F00_0000
ID_RANGE_SIZE = 0x0080_0000

_PR_SET_KEEPCAPS = 8
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAPABILITIES = {
    "chown": 0,
    "dac_override": 1,
    "dac_read_search": 2,
    "fowner": 3,
    "net_bind_service": 10,
    "net_raw": 13,
}

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Identity:
    """Whom a confined process runs as, and the capabilities it keeps (by name)."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    keep: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        unknown = set(self.keep) - set(CAPABILITIES)
        if unknown:
            raise ValueError(f"unknown capabilities {sorted(unknown)}")

    def to_arg(self) -> str:
        """``uid:gid:group,group:cap,cap`` for a helper's command line."""
        groups = ",".join(map(str, self.groups))
        return f"{self.uid}:{self.gid}:{groups}:{','.join(sorted(self.keep))}"

    @classmethod
    def from_arg(cls, text: str) -> Identity:
        uid, gid, groups, keep = text.split(":")
        return cls(
            uid=int(uid),
            gid=int(gid),
            groups=tuple(int(g) for g in groups.split(",") if g),
            keep=frozenset(k for k in keep.split(",") if k),
        )


@dataclass(frozen=True)
class Confinement:
    """Whether capsa confines what it starts here, and why (not)."""

    active: bool
    reason: str


def confinement() -> Confinement:
    if os.environ.get("CAPSA_CONFINE", "1") == "0":
        return Confinement(active=False, reason="turned off by CAPSA_CONFINE=0")
    if not sys.platform.startswith("linux"):
        return Confinement(active=False, reason="identities are changed on Linux only")
    if os.geteuid() != 0:
        return Confinement(
            active=False, reason="capsa runs unprivileged: what it starts already is"
        )
    if shutil.which("setpriv") is None:
        return Confinement(active=False, reason="setpriv (util-linux) is not installed")
    return Confinement(active=True, reason="QEMU and helpers run as identities of their own")


def new_identity(keep: Iterable[str] = (), groups: Sequence[int] = ()) -> Identity:
    """A fresh unprivileged identity (its gid equal to its uid)."""
    while True:
        uid = ID_RANGE_START + secrets.randbelow(ID_RANGE_SIZE)
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return Identity(uid=uid, gid=uid, groups=tuple(groups), keep=frozenset(keep))


def is_capsa_id(number: int) -> bool:
    """Whether ``number`` is in the range capsa's identities come from."""
    return ID_RANGE_START <= number < ID_RANGE_START + ID_RANGE_SIZE


def setpriv_argv(identity: Identity) -> list[str]:
    """The ``setpriv`` prefix that runs a program as ``identity``: its ids, no other
    groups, only the kept capabilities (bounding, inheritable and ambient sets alike),
    and no way to gain privileges again."""
    caps = "".join(f",+{name}" for name in sorted(identity.keep))
    argv = [
        shutil.which("setpriv") or "setpriv",
        f"--reuid={identity.uid}",
        f"--regid={identity.gid}",
        "--no-new-privs",
        f"--inh-caps=-all{caps}",
        f"--bounding-set=-all{caps}",
    ]
    if identity.groups:
        argv.append(f"--groups={','.join(map(str, identity.groups))}")
    else:
        argv.append("--clear-groups")
    if identity.keep:
        argv.append(f"--ambient-caps=-all{caps}")
    return [*argv, "--"]


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _last_capability() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 63


def drop_privileges(identity: Identity) -> None:
    """Become ``identity`` for good: the capability bounding set reduced to what it keeps,
    its ids, only the kept capabilities effective, and no way to gain privileges back."""
    wanted = {CAPABILITIES[name] for name in identity.keep}
    for cap in set(range(_last_capability() + 1)) - wanted:
        # EINVAL: a capability this kernel does not know.
        if _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != 22:
            _check(-1, f"dropping capability {cap}")
    _check(_libc.prctl(_PR_SET_KEEPCAPS, 1 if wanted else 0, 0, 0, 0), "keeping capabilities")
    os.setgroups(list(identity.groups))
    os.setresgid(identity.gid, identity.gid, identity.gid)
    os.setresuid(identity.uid, identity.uid, identity.uid)
    mask = sum(1 << cap for cap in wanted)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)(
        _CapData(mask & 0xFFFFFFFF, mask & 0xFFFFFFFF, 0),
        _CapData(mask >> 32, mask >> 32, 0),
    )
    _check(_libc.capset(ctypes.byref(header), data), "setting capabilities")
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "setting no_new_privs")


def reachable_by_others(path: Path) -> bool:
    """Whether an unprivileged identity can get to ``path``: every folder above it lets
    others through (o+x)."""
    return all(os.stat(folder).st_mode & 0o001 for folder in path.resolve().parents)


def give(paths: Iterable[str | os.PathLike[str]], identity: Identity, mode: int) -> None:
    """Hand files or directories (made by us) over to ``identity``."""
    for path in paths:
        os.chown(path, identity.uid, identity.gid)
        os.chmod(path, mode)
