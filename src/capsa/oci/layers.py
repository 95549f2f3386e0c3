"""Image layers to one root file system, safely.

Layers are hostile input. They are first merged in memory (whiteouts, opaque directories,
later layers over earlier ones) with every path checked: no absolute path, no ``..``, no
entry below something that is a symlink or a file in the merged tree, hard links only to
files already in it. Device nodes are skipped. Only then is the result written into a
fresh private directory, one component at a time relative to directory descriptors opened
with ``O_NOFOLLOW``, so nothing can land outside it. ``mke2fs -d`` turns that directory
into the read-only ext4 image a sandbox boots.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from capsa._util.tools import find_tool
from capsa.errors import CapsaError

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


class LayerError(CapsaError):
    """A layer that would write outside the image, or that cannot be unpacked."""


@dataclass
class Entry:
    info: tarfile.TarInfo
    layer: int  # index into the layer files, for the data


def _clean(name: str, what: str) -> str:
    """The normalized relative path of a tar entry, or LayerError if it tries to escape."""
    if name.startswith("/"):
        raise LayerError(f"{what}: absolute path {name!r}")
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
    if ".." in parts:
        raise LayerError(f"{what}: path {name!r} climbs out with '..'")
    return "/".join(parts)


def _is_below(path: str, parent: str) -> bool:
    return path.startswith(parent + "/") if parent else bool(path)


def merge(layers: list[Path]) -> dict[str, Entry]:
    """The merged tree of ``layers`` (uncompressed tar files, lowest first)."""
    tree: dict[str, Entry] = {}
    for index, layer in enumerate(layers):
        what = f"layer {index + 1}"
        with tarfile.open(layer, "r:") as tar:
            members = tar.getmembers()
        # Whiteouts hide lower layers only: apply them before this layer's own entries.
        for m in members:
            path = _clean(m.name, what)
            base = PurePosixPath(path).name
            parent = str(PurePosixPath(path).parent).strip(".")
            if base == OPAQUE:
                for p in [p for p in tree if _is_below(p, parent) and tree[p].layer < index]:
                    del tree[p]
            elif base.startswith(WHITEOUT):
                gone = f"{parent}/{base[len(WHITEOUT) :]}".lstrip("/")
                for p in [p for p in tree if p == gone or _is_below(p, gone)]:
                    del tree[p]
        for m in members:
            path = _clean(m.name, what)
            base = PurePosixPath(path).name
            if not path or base.startswith(WHITEOUT):
                continue
            if m.ischr() or m.isblk():
                continue  # device nodes never come from an image
            _check_parents(tree, path, what)
            old = tree.get(path)
            if old is not None and old.info.isdir() and not m.isdir():
                for p in [p for p in tree if _is_below(p, path)]:
                    del tree[p]
            if m.islnk():
                linked = tree.get(_clean(m.linkname, what))
                if linked is None or not linked.info.isreg():
                    raise LayerError(
                        f"{what}: hard link {path!r} to {m.linkname!r}, "
                        "which is not a file of the image"
                    )
            tree[path] = Entry(m, index)
    # A hard link whose target a later layer removed or replaced has nothing to point at.
    for path in [p for p, e in tree.items() if e.info.islnk()]:
        target = tree.get(_clean(tree[path].info.linkname, "link"))
        if target is None or not target.info.isreg():
            del tree[path]
    return tree


def _check_parents(tree: dict[str, Entry], path: str, what: str) -> None:
    parts = path.split("/")
    for i in range(1, len(parts)):
        parent = tree.get("/".join(parts[:i]))
        if parent is None:
            continue
        if parent.info.issym():
            raise LayerError(f"{what}: {path!r} lies below the symlink {parent.info.name!r}")
        if not parent.info.isdir():
            raise LayerError(f"{what}: {path!r} lies below the non-directory {parent.info.name!r}")


def decompress(blob: Path, media_type: str, dest: Path) -> Path:
    """An uncompressed copy of a layer blob (tarfile needs random access to read data)."""
    if media_type.endswith("zstd"):
        raise LayerError(f"zstd-compressed layers are not supported ({media_type})")
    with open(blob, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    if not gz:
        return blob
    with gzip.open(blob, "rb") as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    return dest


class _Writer:
    """Creates entries beneath ``root`` through directory descriptors, never a path walk."""

    def __init__(self, root: Path, keep_owners: bool) -> None:
        self.root_fd = os.open(root, os.O_DIRECTORY | os.O_NOFOLLOW)
        self.dirs: dict[str, int] = {"": self.root_fd}
        self.keep_owners = keep_owners

    def close(self) -> None:
        for fd in self.dirs.values():
            os.close(fd)

    def parent(self, path: str) -> tuple[int, str]:
        head, _, name = path.rpartition("/")
        fd = self.dirs.get(head)
        if fd is None:
            above, base = self.parent(head)
            with contextlib.suppress(FileExistsError):
                os.mkdir(base, 0o755, dir_fd=above)
            fd = os.open(base, os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=above)
            self.dirs[head] = fd
        return fd, name

    def meta(self, dirfd: int, name: str, info: tarfile.TarInfo, link: bool) -> None:
        if self.keep_owners:
            os.chown(name, info.uid, info.gid, dir_fd=dirfd, follow_symlinks=False)
        if not link:
            os.chmod(name, info.mode & 0o7777, dir_fd=dirfd)
        os.utime(name, (info.mtime, info.mtime), dir_fd=dirfd, follow_symlinks=False)


def write_tree(tree: dict[str, Entry], layers: list[Path], root: Path) -> None:
    """Write the merged ``tree`` into the empty directory ``root``."""
    writer = _Writer(root, keep_owners=os.geteuid() == 0)
    with contextlib.ExitStack() as stack:
        tars = [stack.enter_context(tarfile.open(layer, "r:")) for layer in layers]
        try:
            _write_entries(tree, tars, writer)
        finally:
            writer.close()


def _write_entries(tree: dict[str, Entry], tars: list[tarfile.TarFile], writer: _Writer) -> None:
    ordered = sorted(tree, key=lambda p: p.split("/"))
    dirs = []
    for path in ordered:
        info = tree[path].info
        if info.islnk():
            continue
        dirfd, name = writer.parent(path)
        if info.isdir():
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=dirfd)
            dirs.append(path)
        elif info.isreg():
            fd = os.open(
                name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dirfd
            )
            with os.fdopen(fd, "wb") as out:
                data = tars[tree[path].layer].extractfile(info)
                if data is not None:
                    shutil.copyfileobj(data, out, 1 << 20)
            writer.meta(dirfd, name, info, link=False)
        elif info.issym():
            os.symlink(info.linkname, name, dir_fd=dirfd)
            writer.meta(dirfd, name, info, link=True)
        elif info.isfifo():
            os.mkfifo(name, info.mode & 0o777, dir_fd=dirfd)
            writer.meta(dirfd, name, info, link=False)
    for path in ordered:  # hard links, once their targets exist
        info = tree[path].info
        if info.islnk():
            src_fd, src = writer.parent(_clean(info.linkname, "link"))
            dirfd, name = writer.parent(path)
            os.link(src, name, src_dir_fd=src_fd, dst_dir_fd=dirfd, follow_symlinks=False)
    for path in reversed(dirs):  # modes last: a read-only directory must be filled first
        dirfd, name = writer.parent(path)
        writer.meta(dirfd, name, tree[path].info, link=False)


def make_ext4(source: Path, out: Path, label: str = "capsa-oci") -> None:
    """A read-only-use ext4 image of the directory ``source`` (no journal, sized to fit)."""
    used = inodes = 0
    for dirpath, dirnames, filenames in os.walk(source):
        for name in dirnames + filenames:
            inodes += 1
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                if stat.S_ISREG(st.st_mode):
                    used += st.st_blocks * 512
    size_mb = int(used * 1.2 / (1 << 20)) + 32 + inodes // 100
    tmp = out.with_name(out.name + ".part")
    mke2fs = find_tool("mke2fs")
    if mke2fs is None:
        raise LayerError("mke2fs not found: `sudo apt-get install e2fsprogs`")
    argv = [mke2fs, "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-L", label]
    argv += ["-N", str(inodes + 1024), "-E", "root_owner=0:0"]
    argv += ["-d", str(source), str(tmp), f"{size_mb}M"]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise LayerError(f"mke2fs failed: {proc.stderr.strip()}")
    tmp.rename(out)


@contextlib.contextmanager
def scratch(base: Path) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=".unpack-", dir=base))  # mode 0700: set-id stays ours
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def build_rootfs(blobs: list[tuple[Path, str]], out: Path) -> None:
    """``out``: the ext4 image of the layers ``(blob, media type)``, lowest first."""
    with scratch(out.parent) as work:
        layers = [
            decompress(blob, media, work / f"layer{i}.tar") for i, (blob, media) in enumerate(blobs)
        ]
        tree = merge(layers)
        root = work / "root"
        root.mkdir()
        write_tree(tree, layers, root)
        make_ext4(root, out)
