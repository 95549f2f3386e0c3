"""Whether the kernel will exec a file in a container root: what it needs besides the file
itself, found the way it finds it after ``chroot``. Lets the agent start a command through
busybox's ``nsenter`` only where exec cannot fail; anywhere else the Python path runs it and
an exec error reaches the caller as the agent's error, not as the command's exit 127.

The checks follow Linux's ``binfmt_script`` and ``binfmt_elf`` and are stricter where that
is simpler: a nested script, a 32-bit program or a relative loader takes the slow path.
Guest code: standard library only."""

from __future__ import annotations

import errno
import functools
import os
import re
import stat
import struct
import sys
from collections import deque

SHEBANG_BYTES = 256  # what Linux reads of a "#!" line (BINPRM_BUF_SIZE)
MAX_SYMLINKS = 40  # as the kernel's path walk
MAX_STEPS = 1024  # names walked through, links' included: real paths take a few dozen
ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ET_EXEC, ET_DYN = 2, 3
PT_INTERP = 3
PHDR_BYTES = 56  # an ELF64 program header; the kernel takes no other size
MAX_PHDR_TABLE = 4096  # the kernel's limit is a page: the smallest page there is
PATH_MAX = 4096
_ELF64_HEADER_BYTES = 64
_SHEBANG_TERMINATOR = re.compile(rb"[ \t\0]")


def resolve_in_root(root: str, path: str) -> str | None:
    """Where absolute ``path`` lands once ``root`` is ``/``, as a path from outside: symlinks
    (absolute ones too) resolved inside, ``..`` stopping at the root. None where the kernel
    fails: a path of PATH_MAX bytes or more, a part missing, ``.``, ``..`` or a trailing
    ``/`` after a non-directory, an empty link, or more than 40 links; and where this walk
    would differ from the kernel's (a link in /proc) or take long (over 1 024 steps: a
    hostile image could make each of 40 links long, and the agent checks every command)."""
    try:
        if len(os.fsencode(path)) >= PATH_MAX:
            return None
    except UnicodeError:
        return None
    pending = deque(_parts(path))
    done: list[str] = []
    hops = steps = 0
    while pending:
        part = pending.popleft()
        steps += 1
        if steps > MAX_STEPS:
            return None
        if part in (".", ".."):
            if not os.path.isdir(os.path.join(root, *done)):
                return None
            if part == ".." and done:
                done.pop()
            continue
        try:
            target = os.readlink(os.path.join(root, *done, part))
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: there, and not a symlink
                return None
            done.append(part)
            continue
        except ValueError:  # a NUL in the name
            return None
        hops += 1
        if hops > MAX_SYMLINKS or not target or done[:1] == ["proc"]:
            return None  # /proc's links jump to where the kernel says, not to their text
        if target.startswith("/"):
            done = []
        pending.extendleft(reversed(_parts(target)))
    return os.path.join(root, *done)


def _parts(path: str) -> list[str]:
    """The names along ``path``; a trailing ``/`` becomes a ``.``, which needs a directory."""
    parts = [part for part in path.split("/") if part]
    if parts and path.endswith("/"):
        parts.append(".")
    return parts


@functools.cache
def this_machine() -> bytes:
    """The ELF class and byte order (ident bytes 4-5) and e_machine of the running
    interpreter; empty if unreadable, and then no program counts as this machine's."""
    try:
        with open(sys.executable, "rb") as f:
            head = f.read(20)
    except OSError:
        return b""
    return head[4:6] + head[18:20] if head[:4] == ELF_MAGIC and len(head) == 20 else b""


def runs_here(head: bytes) -> bool:
    """``head`` starts an ELF for this machine: class, byte order and architecture."""
    machine = this_machine()
    return bool(machine) and head[:4] == ELF_MAGIC and head[4:6] + head[18:20] == machine


def shebang_interpreter(head: bytes) -> str | None:
    """The interpreter a ``#!`` line names, read as ``binfmt_script`` reads it: spaces and
    tabs skipped, the name ends at a space, tab, NUL or the line's end. None if there is no
    name, or the 256 bytes the kernel reads end inside it."""
    line = head[2:SHEBANG_BYTES]
    newline = line.find(b"\n")
    truncated = newline < 0 and len(head) >= SHEBANG_BYTES
    line = line[:newline] if newline >= 0 else line[: SHEBANG_BYTES - 3]
    rest = line.lstrip(b" \t")
    end = _SHEBANG_TERMINATOR.search(rest)
    if end is None and truncated:
        return None
    name = rest[: end.start()] if end else rest
    return name.decode("utf-8", "surrogateescape") if name else None


def elf_interpreter(fd: int, head: bytes) -> str | None:
    """The loader (``PT_INTERP``) of the 64-bit ELF executable for this machine open at
    ``fd`` whose first bytes are ``head``: "" for a static one, None if the kernel would
    refuse the file (wrong machine or type, a bad program header table or loader name)."""
    if len(head) < _ELF64_HEADER_BYTES or head[4] != ELFCLASS64 or not runs_here(head):
        return None
    order = "<" if head[5] == 1 else ">"
    (kind,) = struct.unpack_from(order + "H", head, 16)
    (table_at,) = struct.unpack_from(order + "Q", head, 32)
    entry_size, count = struct.unpack_from(order + "HH", head, 54)
    size = entry_size * count
    if kind not in (ET_EXEC, ET_DYN) or entry_size != PHDR_BYTES or not 0 < size <= MAX_PHDR_TABLE:
        return None
    table = _pread(fd, size, table_at)
    if table is None:
        return None
    for at in range(0, size, PHDR_BYTES):
        if struct.unpack_from(order + "I", table, at)[0] == PT_INTERP:
            (offset,) = struct.unpack_from(order + "Q", table, at + 8)
            (length,) = struct.unpack_from(order + "Q", table, at + 32)
            return _loader_name(fd, offset, length)
    return ""


def _loader_name(fd: int, offset: int, length: int) -> str | None:
    if not 2 <= length <= PATH_MAX:
        return None
    raw = _pread(fd, length, offset)
    if raw is None or raw[-1] != 0:
        return None
    name = raw.split(b"\0", 1)[0]
    return name.decode("utf-8", "surrogateescape") if name else None


def _pread(fd: int, size: int, offset: int) -> bytes | None:
    try:
        data = os.pread(fd, size, offset)
    except (OSError, OverflowError):
        return None
    return data if len(data) == size else None


def _open_executable(path: str) -> int | None:
    """A descriptor of the regular file at ``path`` (no symlink: resolved already) if exec
    may run it (an execute bit, no noexec mount). Devices are never opened, and nothing
    blocks: a FIFO swapped in between cannot hold the agent."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode) or not os.access(path, os.X_OK):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def judge(root: str, program: str, *, script: bool = True) -> list[str] | None:
    """The files (outside paths) exec of ``program`` (a file in ``root``) reads once ``root``
    is ``/``: the program, its interpreter if a script, and the loader if any. None if the
    kernel would refuse it; it takes an ELF for this machine whose loader is there and is
    one too, or a ``#!`` script whose interpreter is such an ELF. A script without ``#!``
    (a shell would run it, ``execve`` refuses it) is refused."""
    fd = _open_executable(program)
    if fd is None:
        return None
    try:
        head = os.pread(fd, SHEBANG_BYTES, 0)
        if script and head.startswith(b"#!"):
            name = shebang_interpreter(head)
            found = resolve_in_root(root, name) if name and name.startswith("/") else None
            rest = None if found is None else judge(root, found, script=False)
            return None if rest is None else [program, *rest]
        loader = elf_interpreter(fd, head)
    except OSError:
        return None
    finally:
        os.close(fd)
    if loader == "":
        return [program]
    found = resolve_in_root(root, loader) if loader and loader.startswith("/") else None
    return [program, found] if found is not None and _loader_maps(found) else None


def _loader_maps(loader: str) -> bool:
    """The loader (outside path) is an ELF the kernel will map; its own ``PT_INTERP``, if
    any, the kernel ignores."""
    fd = _open_executable(loader)
    if fd is None:
        return False
    try:
        return elf_interpreter(fd, os.pread(fd, _ELF64_HEADER_BYTES, 0)) is not None
    except OSError:
        return False
    finally:
        os.close(fd)


Identity = tuple[int, int, int, int, int, int]


def _identity(path: str) -> Identity | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class ExecChecks:
    """:func:`judge` for one root, remembered per program name while the files it read
    keep their identity (inode, mode, size, times): the full check costs ~1 ms per
    command under emulation, a few stats ~0.1 ms. A link along the way re-pointed between
    commands goes unseen; the worst that does is exit 127 where the agent's error was due,
    to root in the container (other users never come here)."""

    def __init__(self, root: str, limit: int = 256) -> None:
        self.root, self.limit = root, limit
        self._known: dict[str, tuple[str, list[tuple[str, Identity | None]]]] = {}

    def program(self, path: str) -> str | None:
        """Absolute ``path`` in the root, resolved (outside path), if exec will take it."""
        known = self._known.get(path)
        if known is not None and all(_identity(f) == ident for f, ident in known[1]):
            return known[0]
        found = resolve_in_root(self.root, path)
        files = None if found is None else judge(self.root, found)
        if found is None or files is None:
            self._known.pop(path, None)
            return None
        if len(self._known) >= self.limit:
            self._known.clear()
        self._known[path] = (found, [(f, _identity(f)) for f in files])
        return found
