"""Whether the kernel will exec a file in a container root: what it needs besides the file
itself, found the way it finds it after ``chroot``. Lets the agent start a command through
busybox's ``nsenter`` only where exec cannot fail; anywhere else the Python path runs it and
an exec error reaches the caller as the agent's error, not as the command's exit 127.

Guest code: standard library only."""

from __future__ import annotations

import errno
import os
import struct
import sys

HEAD_BYTES = 4096  # the ELF header and its program headers sit in the first page
SHEBANG_BYTES = 256  # what Linux reads of a "#!" line (BINPRM_BUF_SIZE)
MAX_SYMLINKS = 40  # as the kernel's path walk
ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
PT_INTERP = 3
_ELF64_PHDR_BYTES = 56


def resolve_in_root(root: str, path: str) -> str | None:
    """Where absolute ``path`` lands once ``root`` is ``/``, as a path from outside: symlinks
    (absolute ones too) resolved inside, ``..`` stopping at the root. None if a part is
    missing or the links loop."""
    pending = [part for part in path.split("/") if part]
    done: list[str] = []
    hops = 0
    while pending:
        part = pending.pop(0)
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        try:
            target = os.readlink(os.path.join(root, *done, part))
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: there, and not a symlink
                return None
            done.append(part)
            continue
        hops += 1
        if hops > MAX_SYMLINKS:
            return None
        if target.startswith("/"):
            done = []
        pending[:0] = [part for part in target.split("/") if part]
    return os.path.join(root, *done)


def _this_machine() -> bytes:
    """The ELF ident class/data bytes and e_machine of the running interpreter (empty if
    unreadable: then no file counts as this machine's, and every command takes the slow
    path)."""
    try:
        with open(sys.executable, "rb") as f:
            head = f.read(20)
    except OSError:
        return b""
    return head[4:6] + head[18:20] if head[:4] == ELF_MAGIC and len(head) == 20 else b""


_MACHINE: bytes | None = None


def runs_here(head: bytes) -> bool:
    """``head`` starts an ELF for this machine (class, byte order and architecture)."""
    global _MACHINE
    if _MACHINE is None:
        _MACHINE = _this_machine()
    return bool(_MACHINE) and head[:4] == ELF_MAGIC and head[4:6] + head[18:20] == _MACHINE


def elf_interpreter(head: bytes) -> str | None:
    """The program interpreter (``PT_INTERP``) a 64-bit ELF names; "" for a static one;
    None if its program headers are not all in ``head`` or the entry is malformed."""
    if len(head) < 64 or head[4] != ELFCLASS64:
        return None
    order = "<" if head[5] == 1 else ">"
    (phoff,) = struct.unpack_from(order + "Q", head, 32)
    phentsize, phnum = struct.unpack_from(order + "HH", head, 54)
    if phentsize < _ELF64_PHDR_BYTES or phoff + phnum * phentsize > len(head):
        return None
    for index in range(phnum):
        at = phoff + index * phentsize
        (kind,) = struct.unpack_from(order + "I", head, at)
        if kind != PT_INTERP:
            continue
        (offset,) = struct.unpack_from(order + "Q", head, at + 8)
        (size,) = struct.unpack_from(order + "Q", head, at + 32)
        if size < 2 or offset + size > len(head) or head[offset + size - 1] != 0:
            return None
        return head[offset : offset + size - 1].decode("utf-8", "surrogateescape")
    return ""


def shebang_interpreter(head: bytes) -> str | None:
    """The interpreter a ``#!`` line names, or None if the line has none."""
    line = head[2:SHEBANG_BYTES].split(b"\n", 1)[0].replace(b"\t", b" ").strip()
    name = line.split(b" ", 1)[0]
    return name.decode("utf-8", "surrogateescape") if name else None


def _head(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(HEAD_BYTES)
    except OSError:
        return None


def _executable_file(path: str | None) -> bool:
    return path is not None and os.path.isfile(path) and os.access(path, os.X_OK)


def execs_in_root(root: str, program: str, *, script: bool = True) -> bool:
    """The kernel will exec ``program`` (outside path of a file in ``root``) once ``root``
    is ``/``: an ELF for this machine whose loader is there, or (if ``script``) a ``#!``
    script whose interpreter is such an ELF. Anything else, including a script without
    ``#!`` (a shell would run it, ``execve`` refuses it), is False."""
    head = _head(program) if _executable_file(program) else None
    if head is None:
        return False
    if script and head.startswith(b"#!"):
        name = shebang_interpreter(head)
        if name is None or not name.startswith("/"):
            return False
        found = resolve_in_root(root, name)
        return found is not None and execs_in_root(root, found, script=False)
    if not runs_here(head):
        return False
    loader = elf_interpreter(head)
    if loader is None:
        return False
    return loader == "" or (loader.startswith("/") and _loader_there(root, loader))


def _loader_there(root: str, loader: str) -> bool:
    return _executable_file(resolve_in_root(root, loader))
