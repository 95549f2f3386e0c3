"""Landlock (Linux >= 5.13): a process gives up file system access it will never need.

A helper that serves a hostile guest confines itself before the first request: if the
guest ever found a way to steer it, the kernel still refuses every access outside the few
trees a :class:`Rule` names (``EACCES``; ``EXDEV`` for a rename or link from outside them),
whatever the helper's uid. The restriction is for life and is inherited by threads started
afterwards; threads already running keep their freedom, so :func:`confine` refuses to run
in a process that has any.

Rules are checked on the object actually reached: a file reopened through
``/proc/self/fd/N`` is judged by where it lives, not by ``/proc``. Metadata changes (mode,
owner, times, extended attributes) are outside Landlock's reach.

:func:`landlock_status` says what this kernel offers; ``capsa doctor`` can print it.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import stat
import struct
import sys
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from capsa.errors import CapsaError

# The same numbers on x86_64 and aarch64: Landlock came after the syscall tables merged.
SYS_CREATE_RULESET = 444
SYS_ADD_RULE = 445
SYS_RESTRICT_SELF = 446
CREATE_RULESET_VERSION = 1 << 0
RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38
# ABI 1 has no REFER right: every rename or link across directories fails with EXDEV, even
# inside one rule's tree, which breaks `mv` and git in a share. Below 2 we stay off.
MIN_ABI = 2

RULESET_ATTR = struct.Struct("=QQQ")  # handled_access_fs, handled_access_net, scoped
PATH_BENEATH_ATTR = struct.Struct("=Qi")  # allowed_access, parent_fd (packed)


class Fs(enum.IntFlag):
    """File system access rights (``LANDLOCK_ACCESS_FS_*``)."""

    EXECUTE = 1 << 0
    WRITE_FILE = 1 << 1
    READ_FILE = 1 << 2
    READ_DIR = 1 << 3
    REMOVE_DIR = 1 << 4
    REMOVE_FILE = 1 << 5
    MAKE_CHAR = 1 << 6
    MAKE_DIR = 1 << 7
    MAKE_REG = 1 << 8
    MAKE_SOCK = 1 << 9
    MAKE_FIFO = 1 << 10
    MAKE_BLOCK = 1 << 11
    MAKE_SYM = 1 << 12
    REFER = 1 << 13  # ABI 2
    TRUNCATE = 1 << 14  # ABI 3
    IOCTL_DEV = 1 << 15  # ABI 5


READ = Fs.READ_FILE | Fs.READ_DIR
READ_EXECUTE = READ | Fs.EXECUTE
# The rights a rule on a file (not a directory) may carry; the kernel refuses the others.
FILE_RIGHTS = Fs.EXECUTE | Fs.WRITE_FILE | Fs.READ_FILE | Fs.TRUNCATE | Fs.IOCTL_DEV
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6

# Read and run access to what the interpreter loads late (lazy imports, extension modules
# and the libraries they link): besides the interpreter's own directories.
SHARED_LIBRARY_DIRS = ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib")
LOADER_CACHE = "/etc/ld.so.cache"


class LandlockError(CapsaError):
    """The kernel offers Landlock but the confinement could not be put in place."""


@dataclass(frozen=True)
class Rule:
    """``access`` beneath ``path`` (a directory), or to ``path`` itself (any other file)."""

    path: Path
    access: Fs


@dataclass(frozen=True)
class Handled:
    """What a ruleset restricts: everything the ABI knows, nothing it does not."""

    fs: Fs
    net: int
    scoped: int

    @classmethod
    def for_abi(cls, abi: int) -> Handled:
        fs = Fs(0)
        for right in Fs:
            if abi >= _FIRST_ABI.get(right, 1):
                fs |= right
        net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
        scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
        return cls(fs, net, scoped)

    def pack(self) -> bytes:
        return RULESET_ATTR.pack(self.fs, self.net, self.scoped)


_FIRST_ABI = {Fs.REFER: 2, Fs.TRUNCATE: 3, Fs.IOCTL_DEV: 5}


@dataclass(frozen=True)
class LandlockStatus:
    enabled: bool
    abi: int
    reason: str

    def __str__(self) -> str:
        return f"landlock={'on' if self.enabled else 'off'} ({self.reason})"


# Functions are looked up when called: importing this module must work where there is no
# prctl (macOS), so that capsa doctor can ask everywhere.
_libc = ctypes.CDLL(None, use_errno=True)


def _syscall(number: int, *args: object) -> int:
    syscall = _libc.syscall
    syscall.restype = ctypes.c_long
    ret = int(syscall(ctypes.c_long(number), *args))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _set_no_new_privs() -> None:
    prctl = _libc.prctl
    # Four arguments after the option, the unused ones zero: PR_SET_NO_NEW_PRIVS checks.
    prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
    if prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise LandlockError(f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")


def abi_version() -> int:
    """The Landlock ABI of this kernel; OSError when there is none."""
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, "Landlock is a Linux feature")
    return _syscall(
        SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION)
    )


def landlock_status() -> LandlockStatus:
    """Whether helpers confine themselves on this kernel, and why not if they do not."""
    try:
        abi = abi_version()
    except OSError as e:
        return LandlockStatus(enabled=False, abi=0, reason=_why_unavailable(e))
    if abi < MIN_ABI:
        reason = f"ABI {abi} cannot allow renames across directories; {MIN_ABI} is needed"
        return LandlockStatus(enabled=False, abi=abi, reason=reason)
    return LandlockStatus(enabled=True, abi=abi, reason=f"ABI {abi}")


def _why_unavailable(e: OSError) -> str:
    if e.errno == errno.ENOSYS:
        return "this kernel has no Landlock (Linux >= 5.13 built with CONFIG_SECURITY_LANDLOCK)"
    if e.errno == errno.EOPNOTSUPP:
        return "Landlock is built in but not enabled (the lsm= boot parameter)"
    return f"landlock_create_ruleset: {e.strerror}"


def confine(rules: Iterable[Rule]) -> LandlockStatus:
    """Restrict this process to ``rules`` for the rest of its life, if the kernel can.

    Returns what was done; raises :class:`LandlockError` when the kernel offers Landlock
    but confining failed (the caller must not go on unconfined as if nothing happened).
    """
    status = landlock_status()
    if not status.enabled:
        return status
    _require_single_thread()
    handled = Handled.for_abi(status.abi)
    try:
        ruleset = _create_ruleset(handled)
    except OSError as e:
        raise LandlockError(f"landlock_create_ruleset: {e.strerror}") from e
    try:
        for rule in rules:
            _add_rule(ruleset, rule, handled.fs)
        _restrict_self(ruleset)
    finally:
        os.close(ruleset)
    return status


def _require_single_thread() -> None:
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        raise LandlockError(f"{threads} threads running: the others would stay unconfined")


def _create_ruleset(handled: Handled) -> int:
    attr = ctypes.create_string_buffer(handled.pack(), RULESET_ATTR.size)
    return _syscall(
        SYS_CREATE_RULESET, attr, ctypes.c_size_t(RULESET_ATTR.size), ctypes.c_uint32(0)
    )


def _add_rule(ruleset: int, rule: Rule, handled: Fs) -> None:
    try:
        fd = os.open(rule.path, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        raise LandlockError(f"Landlock rule for {rule.path}: {e.strerror}") from e
    try:
        access = rule_access(rule.access, handled, is_dir=stat.S_ISDIR(os.fstat(fd).st_mode))
        if not access:
            return
        attr = ctypes.create_string_buffer(
            PATH_BENEATH_ATTR.pack(access, fd), PATH_BENEATH_ATTR.size
        )
        _syscall(
            SYS_ADD_RULE,
            ctypes.c_int(ruleset),
            ctypes.c_int(RULE_PATH_BENEATH),
            attr,
            ctypes.c_uint32(0),
        )
    except OSError as e:
        raise LandlockError(f"Landlock rule for {rule.path}: {e.strerror}") from e
    finally:
        os.close(fd)


def rule_access(wanted: Fs, handled: Fs, is_dir: bool) -> Fs:
    """The rights a rule can carry: only handled ones (the kernel refuses others), and on
    a file only those that concern a file."""
    access = wanted & handled
    return access if is_dir else access & FILE_RIGHTS


def _restrict_self(ruleset: int) -> None:
    # Without no_new_privs an unprivileged process may not restrict itself; for root it
    # also means no later execve can gain privileges the domain was meant to hold back.
    _set_no_new_privs()
    try:
        _syscall(SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    except OSError as e:
        raise LandlockError(f"landlock_restrict_self: {e.strerror}") from e


def python_runtime_rules() -> list[Rule]:
    """Read and run access to everything this interpreter may still load: its library
    directories (the virtual environment's and the base installation's), the import path
    (but not the working directory ``-m`` puts first), the package capsa runs from, the
    shared libraries and the loader's cache; and read access to our own ``/proc`` entry."""
    dirs = {Path(p) for p in _interpreter_dirs()}
    dirs |= {Path(p) for p in SHARED_LIBRARY_DIRS}
    dirs.add(Path(__file__).resolve().parents[1])
    rules = [Rule(d, READ_EXECUTE) for d in sorted(dirs) if d.is_dir()]
    if Path(LOADER_CACHE).is_file():
        rules.append(Rule(Path(LOADER_CACHE), Fs.READ_FILE))
    rules.append(Rule(Path("/proc/self"), READ))  # opened as /proc/<our pid>
    return rules


def _interpreter_dirs() -> set[str]:
    base = {
        "base": sys.base_prefix,
        "platbase": sys.base_exec_prefix,
        "installed_base": sys.base_prefix,
        "installed_platbase": sys.base_exec_prefix,
    }
    found: set[str] = set()
    for scheme_vars in (None, base):
        paths = sysconfig.get_paths(vars=scheme_vars)
        found |= {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    try:
        cwd = os.getcwd()
    except OSError:  # removed since we started: nothing of it to leave out
        cwd = ""
    found |= {p for p in sys.path if p and os.path.abspath(p) != cwd}
    return found
