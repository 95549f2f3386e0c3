"""Image layers to one root file system, safely.

Layers are hostile input. They are first merged in memory (whiteouts, opaque directories,
later layers over earlier ones) with every path checked: no absolute path, no ``..``, no
entry below something that is a symlink or a file in the merged tree, hard links only to
files already in it. Device nodes are skipped. Only then is the result written into a
fresh private directory, one component at a time relative to directory descriptors opened
with ``O_NOFOLLOW``, so nothing can land outside it. ``mke2fs -d`` turns that directory
into the read-only ext4 image a sandbox boots.

What a layer may expand to is bounded (:class:`Limits`): its uncompressed size, the whole
image's, the number of entries, path lengths and depths, the tar metadata held in memory;
sparse files are refused. Past a limit, :class:`LayerLimitError` names it. Whiteouts,
opaque directories and replaced directories cost only what they remove, so merging is
linear in the entries however a layer is shaped.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from capsa._util.tools import find_tool
from capsa.errors import CapsaError

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"

GiB = 1 << 30
MiB = 1 << 20

# The largest real layers (CUDA and ML framework images) stay below ~20 GiB uncompressed;
# a cap well above them still stops a gzip bomb long before it fills a disk.
MAX_LAYER_BYTES = 32 * GiB
# Every layer lands on disk twice while the root is built (the tar and the tree), and then
# once more in the ext4 image: 64 GiB of layers already asks for ~200 GiB of scratch.
MAX_IMAGE_BYTES = 64 * GiB
# Large distribution and ML images hold a few hundred thousand files. Each entry costs
# ~1 KB of memory while merging, so this keeps a hostile layer under ~2 GB.
MAX_ENTRIES = 2_000_000
# Linux's PATH_MAX (4096) counts the terminating NUL; longer paths could not be created.
MAX_PATH_BYTES = 4095
# NAME_MAX: the longest file name ext4 stores.
MAX_NAME_BYTES = 255
# Real trees nest a few dozen levels (node_modules at worst); every level costs a lookup
# per entry when merging and a directory descriptor when writing.
MAX_PATH_DEPTH = 256
# One pax or GNU long-name header is read into memory whole. A path is at most 4 KiB and
# an extended attribute 64 KiB: 1 MiB is far more than any real header needs.
MAX_HEADER_BYTES = 1 * MiB
# Extended headers stay in memory with their entries until the tree is written; real
# images carry ~100 bytes per entry (mtimes, the odd long name or xattr).
MAX_METADATA_BYTES = 256 * MiB
# Headers that only modify the next one (pax, global pax, GNU long name and long link)
# chain by recursion in tarfile; a real entry needs at most three of them.
MAX_HEADER_CHAIN = 8

_CHUNK = 1 << 20  # bytes inflated and written at a time
_OPEN_DIRS = 64  # directory descriptors the writer keeps open (not one per directory)


@dataclass(frozen=True)
class Limits:
    """How much one image's layers may expand to; each field names one limit."""

    layer_bytes: int = MAX_LAYER_BYTES  # one layer, uncompressed
    image_bytes: int = MAX_IMAGE_BYTES  # all the layers of the image, uncompressed
    entries: int = MAX_ENTRIES  # tar entries in all the layers, whiteouts included
    path_bytes: int = MAX_PATH_BYTES  # a path, hard link or symlink target
    name_bytes: int = MAX_NAME_BYTES  # one component of a path
    path_depth: int = MAX_PATH_DEPTH  # components in a path
    header_bytes: int = MAX_HEADER_BYTES  # one pax or GNU long-name header
    metadata_bytes: int = MAX_METADATA_BYTES  # all of those headers in the image
    header_chain: int = MAX_HEADER_CHAIN  # headers before one entry


LIMITS = Limits()


class LayerError(CapsaError):
    """A layer that would write outside the image, or that cannot be unpacked."""


class LayerLimitError(LayerError):
    """A layer that expands past one of the :class:`Limits` (``limit`` names the field)."""

    def __init__(self, what: str, exceeds: str, limit: str, value: int) -> None:
        super().__init__(f"{what}: {exceeds}, over the limit Limits.{limit} = {value:,}")
        self.limit = limit
        self.value = value


@dataclass
class Entry:
    info: tarfile.TarInfo
    layer: int  # index into the layer files, for the data


@dataclass
class _Budget:
    """What an image's layers have used so far of ``limits``."""

    limits: Limits
    entries: int = 0
    metadata_bytes: int = 0

    def count_entry(self, what: str) -> None:
        self.entries += 1
        if self.entries > self.limits.entries:
            raise LayerLimitError(
                what, "too many entries in the image", "entries", self.limits.entries
            )

    def charge_header(self, what: str, size: int) -> None:
        if size > self.limits.header_bytes:
            raise LayerLimitError(
                what,
                f"an extended header of {size:,} bytes",
                "header_bytes",
                self.limits.header_bytes,
            )
        self.metadata_bytes += size
        if self.metadata_bytes > self.limits.metadata_bytes:
            raise LayerLimitError(
                what,
                "too many bytes of extended headers in the image",
                "metadata_bytes",
                self.limits.metadata_bytes,
            )


_EXTENDED = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)
_PAX = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_CHECKED = (*_EXTENDED, tarfile.GNUTYPE_SPARSE)
# A pax record is "<length> <keyword>=<value>\n"; GNU.sparse.* keywords make a sparse file.
_PAX_SPARSE = re.compile(rb"(?:^|\n)[0-9]+ GNU\.sparse\.")


class _LayerTar(tarfile.TarFile):
    """A layer's tar whose headers are checked against the budget before tarfile reads them.

    tarfile reads a pax or long-name header whole into memory, a chain of them by
    recursion, and a sparse map of any length, all before it returns the entry: these
    have to be stopped on the way in, not found on the entry afterwards.
    """

    def __init__(self, layer: Path, budget: _Budget, what: str) -> None:
        self.budget = budget
        self.what = what
        self.chain = 0
        super().__init__(name=layer, mode="r", tarinfo=_LayerTarInfo)

    def check_next_header(self) -> None:
        """Refuse the header at the current offset if it is over a limit; then rewind."""
        start = self.fileobj.tell()
        block = self.fileobj.read(tarfile.BLOCKSIZE)
        if block[156:157] in _CHECKED:  # the type: most headers need no second parse
            try:
                header = tarfile.TarInfo.frombuf(block, self.encoding, self.errors)
            except tarfile.HeaderError:
                pass  # tarfile finds the same and decides (end of archive, bad header)
            else:
                self._check_header(header)
        self.fileobj.seek(start)

    def _check_header(self, header: tarfile.TarInfo) -> None:
        if header.type == tarfile.GNUTYPE_SPARSE:
            raise LayerError(f"{self.what}: {header.name!r} is a sparse file")
        if header.type not in _EXTENDED:
            return
        self.budget.charge_header(self.what, header.size)
        if header.type in _PAX and _PAX_SPARSE.search(self.fileobj.read(header.size)):
            raise LayerError(f"{self.what}: a pax header makes a sparse file")


# Python 3.12 and later read a chain of headers through TarInfo._fromtarfile, 3.11 through
# fromtarfile itself: the check sits on whichever one recurses.
_RECURSES_THROUGH_PRIVATE = hasattr(tarfile.TarInfo, "_fromtarfile")


class _LayerTarInfo(tarfile.TarInfo):
    """Checks each header of a :class:`_LayerTar` before tarfile reads it."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> Self:
        if _RECURSES_THROUGH_PRIVATE or not isinstance(tar, _LayerTar):
            return super().fromtarfile(tar)
        with _one_header(tar):
            return super().fromtarfile(tar)

    @classmethod
    def _fromtarfile(cls, tar: tarfile.TarFile, dircheck: bool = True) -> Self:
        read = getattr(super(), "_fromtarfile")  # noqa: B009 - private before 3.12
        if not isinstance(tar, _LayerTar):
            return read(tar, dircheck=dircheck)  # type: ignore[no-any-return]
        with _one_header(tar):
            return read(tar, dircheck=dircheck)  # type: ignore[no-any-return]


@contextlib.contextmanager
def _one_header(tar: _LayerTar) -> Iterator[None]:
    """One more header in a chain before an entry: refused past the limit, or over a size
    limit, before tarfile reads it."""
    tar.chain += 1
    try:
        if tar.chain > tar.budget.limits.header_chain:
            raise LayerLimitError(
                tar.what,
                "too many extended headers before one entry",
                "header_chain",
                tar.budget.limits.header_chain,
            )
        tar.check_next_header()
        yield
    finally:
        tar.chain -= 1


def _encoded_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))  # as tarfile decoded it


def _short(text: str) -> str:
    return repr(text) if len(text) <= 60 else f"{text[:60]!r}..."


def _check_path_size(path: str, parts: list[str], what: str, limits: Limits) -> None:
    if len(parts) > limits.path_depth:
        raise LayerLimitError(
            what, f"path {_short(path)} is too deep", "path_depth", limits.path_depth
        )
    if _encoded_len(path) > limits.path_bytes:
        raise LayerLimitError(
            what, f"path {_short(path)} is too long", "path_bytes", limits.path_bytes
        )
    for part in parts:
        if _encoded_len(part) > limits.name_bytes:
            raise LayerLimitError(
                what, f"name {_short(part)} is too long", "name_bytes", limits.name_bytes
            )


def _clean(name: str, what: str, limits: Limits = LIMITS) -> str:
    """The normalized relative path of a tar entry, or LayerError if it tries to escape."""
    if name.startswith("/"):
        raise LayerError(f"{what}: absolute path {_short(name)}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LayerError(f"{what}: path {_short(name)} climbs out with '..'")
    path = "/".join(parts)
    _check_path_size(path, parts, what, limits)
    return path


class _Tree:
    """The merged tree: entries by path, and the children of every directory (named by an
    entry or only implied by a longer path), so that removing a subtree costs its size,
    not a scan of the whole tree."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.children: dict[str, set[str]] = {}

    def get(self, path: str) -> Entry | None:
        return self.entries.get(path)

    def put(self, path: str, entry: Entry) -> None:
        self.entries[path] = entry
        child = path
        while child:
            parent = child.rpartition("/")[0]
            siblings = self.children.setdefault(parent, set())
            if child in siblings:
                break  # and so is every directory above it
            siblings.add(child)
            child = parent

    def remove(self, path: str) -> None:
        """``path`` and everything below it."""
        self.remove_below(path)
        self.entries.pop(path, None)
        if path:
            self.children.get(path.rpartition("/")[0], set()).discard(path)

    def remove_below(self, path: str) -> None:
        pending = [path]
        while pending:
            for child in self.children.pop(pending.pop(), ()):
                self.entries.pop(child, None)
                pending.append(child)


def merge(layers: list[Path], *, limits: Limits = LIMITS) -> dict[str, Entry]:
    """The merged tree of ``layers`` (uncompressed tar files, lowest first)."""
    tree = _Tree()
    budget = _Budget(limits)
    for index, layer in enumerate(layers):
        what = f"layer {index + 1}"
        members = _read_members(layer, budget, what)
        # Whiteouts hide lower layers only: apply them before this layer's own entries.
        for path, _ in members:
            _apply_whiteout(tree, path)
        for path, member in members:
            _add_entry(tree, path, Entry(member, index), what, limits)
    # A hard link whose target a later layer removed or replaced has nothing to point at.
    for path in [p for p, e in tree.entries.items() if e.info.islnk()]:
        target = tree.get(_clean(tree.entries[path].info.linkname, "link", limits))
        if target is None or not target.info.isreg():
            tree.remove(path)
    return tree.entries


def _read_members(layer: Path, budget: _Budget, what: str) -> list[tuple[str, tarfile.TarInfo]]:
    """The entries of one layer with their clean paths, each within the budget."""
    members = []
    try:
        with _LayerTar(layer, budget, what) as tar:
            for member in tar:
                budget.count_entry(what)
                _check_member(member, what, budget.limits)
                members.append((_clean(member.name, what, budget.limits), member))
    except tarfile.TarError as e:
        raise LayerError(f"{what}: not a valid tar file ({e})") from None
    return members


def _check_member(member: tarfile.TarInfo, what: str, limits: Limits) -> None:
    # Its size is the expanded one, and its holes would be written out as zeros.
    if member.sparse is not None or member.type == tarfile.GNUTYPE_SPARSE:
        raise LayerError(f"{what}: {_short(member.name)} is a sparse file")
    if member.issym() and _encoded_len(member.linkname) > limits.path_bytes:
        raise LayerLimitError(
            what,
            f"symlink {_short(member.name)} has too long a target",
            "path_bytes",
            limits.path_bytes,
        )


def _apply_whiteout(tree: _Tree, path: str) -> None:
    parent, _, base = path.rpartition("/")
    if base == OPAQUE:
        tree.remove_below(parent)
    elif base.startswith(WHITEOUT):
        hidden = base[len(WHITEOUT) :]
        tree.remove(f"{parent}/{hidden}" if parent else hidden)


def _add_entry(tree: _Tree, path: str, entry: Entry, what: str, limits: Limits) -> None:
    m = entry.info
    if not path or path.rpartition("/")[2].startswith(WHITEOUT):
        return
    if m.ischr() or m.isblk():
        return  # device nodes never come from an image
    _check_parents(tree, path, what)
    if not m.isdir():
        tree.remove_below(path)  # a file or link in place of a directory hides its content
    if m.islnk():
        linked = tree.get(_clean(m.linkname, what, limits))
        if linked is None or not linked.info.isreg():
            raise LayerError(
                f"{what}: hard link {path!r} to {m.linkname!r}, which is not a file of the image"
            )
    tree.put(path, entry)


def _check_parents(tree: _Tree, path: str, what: str) -> None:
    end = path.find("/")
    while end != -1:  # at most path_depth lookups of at most path_bytes each
        parent = tree.get(path[:end])
        end = path.find("/", end + 1)
        if parent is None:
            continue
        if parent.info.issym():
            raise LayerError(f"{what}: {path!r} lies below the symlink {parent.info.name!r}")
        if not parent.info.isdir():
            raise LayerError(f"{what}: {path!r} lies below the non-directory {parent.info.name!r}")


def decompress(
    blob: Path,
    media_type: str,
    dest: Path,
    *,
    limits: Limits = LIMITS,
    earlier_bytes: int = 0,
) -> Path:
    """An uncompressed copy of a layer blob (tarfile needs random access to read data).

    The layer may be at most ``limits.layer_bytes``, and no more than what
    ``limits.image_bytes`` leaves after the image's ``earlier_bytes`` (its lower layers,
    uncompressed). Inflating stops as soon as it passes that, and the copy is removed.
    """
    if media_type.endswith("zstd"):
        raise LayerError(f"zstd-compressed layers are not supported ({media_type})")
    cap, limit = _layer_cap(limits, earlier_bytes)
    over = f"more than {cap:,} bytes"
    if limit == "image_bytes":
        over = f"more than the {cap:,} bytes its lower layers leave of the image"
    what = f"layer {blob.name}"
    with open(blob, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    if not gz:
        if blob.stat().st_size > cap:
            raise LayerLimitError(what, over, limit, getattr(limits, limit))
        return blob
    try:
        if not _inflate_within(blob, dest, cap):
            raise LayerLimitError(what, f"inflates to {over}", limit, getattr(limits, limit))
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        dest.unlink(missing_ok=True)
        raise LayerError(f"{what}: not a valid gzip stream ({e})") from None
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return dest


def _layer_cap(limits: Limits, earlier_bytes: int) -> tuple[int, str]:
    """The most this layer may inflate to, and the limit that sets it."""
    left = max(0, limits.image_bytes - earlier_bytes)
    if limits.layer_bytes <= left:
        return limits.layer_bytes, "layer_bytes"
    return left, "image_bytes"


def _inflate_within(blob: Path, dest: Path, cap: int) -> bool:
    """Inflate ``blob`` into ``dest``; False, with no more than ``cap`` bytes written, if it
    inflates to more than ``cap``."""
    written = 0
    with gzip.open(blob, "rb") as src, open(dest, "wb") as out:
        while chunk := src.read(_CHUNK):  # GzipFile.read(n) inflates no more than n bytes
            written += len(chunk)
            if written > cap:
                return False
            out.write(chunk)
    return True


class _Writer:
    """Creates entries beneath ``root`` through directory descriptors, never a path walk.

    Only the most recently used directories stay open: one descriptor per directory of
    the image would run out of them (RLIMIT_NOFILE is often 1024).
    """

    def __init__(self, root: Path, keep_owners: bool) -> None:
        self.root_fd = os.open(root, os.O_DIRECTORY | os.O_NOFOLLOW)
        self.dirs: OrderedDict[str, int] = OrderedDict()
        self.keep_owners = keep_owners

    def close(self) -> None:
        for fd in self.dirs.values():
            os.close(fd)
        self.dirs.clear()
        os.close(self.root_fd)

    def parent(self, path: str) -> tuple[int, str]:
        """The open directory ``path`` is in, and its name there. The descriptor is the
        writer's and stays valid until the next call."""
        head, _, name = path.rpartition("/")
        return self._directory(head), name

    def _directory(self, path: str) -> int:
        missing = []
        while path and path not in self.dirs:
            missing.append(path)
            path = path.rpartition("/")[0]
        if path:
            self.dirs.move_to_end(path)
        fd = self.dirs[path] if path else self.root_fd
        for sub in reversed(missing):
            base = sub.rpartition("/")[2]
            with contextlib.suppress(FileExistsError):
                os.mkdir(base, 0o755, dir_fd=fd)
            fd = os.open(base, os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            self._keep(sub, fd)
        return fd

    def _keep(self, path: str, fd: int) -> None:
        self.dirs[path] = fd
        if len(self.dirs) > _OPEN_DIRS:
            os.close(self.dirs.popitem(last=False)[1])  # never the newest: fd stays open

    def meta(self, dirfd: int, name: str, info: tarfile.TarInfo, link: bool) -> None:
        if self.keep_owners:
            os.chown(name, info.uid, info.gid, dir_fd=dirfd, follow_symlinks=False)
        if not link:
            os.chmod(name, info.mode & 0o7777, dir_fd=dirfd)
        os.utime(name, (info.mtime, info.mtime), dir_fd=dirfd, follow_symlinks=False)


def write_tree(
    tree: dict[str, Entry], layers: list[Path], root: Path, *, limits: Limits = LIMITS
) -> None:
    """Write the merged ``tree`` into the empty directory ``root``."""
    writer = _Writer(root, keep_owners=os.geteuid() == 0)
    with contextlib.ExitStack() as stack:
        budget = _Budget(limits)  # only the first entry of each layer is read again
        tars = [
            stack.enter_context(_LayerTar(layer, budget, f"layer {i + 1}"))
            for i, layer in enumerate(layers)
        ]
        try:
            _write_entries(tree, tars, writer, limits)
        finally:
            writer.close()


def _write_entries(
    tree: dict[str, Entry], tars: Sequence[tarfile.TarFile], writer: _Writer, limits: Limits
) -> None:
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
        if tree[path].info.islnk():
            _write_hard_link(path, tree[path].info, writer, limits)
    for path in reversed(dirs):  # modes last: a read-only directory must be filled first
        dirfd, name = writer.parent(path)
        writer.meta(dirfd, name, tree[path].info, link=False)


def _write_hard_link(path: str, info: tarfile.TarInfo, writer: _Writer, limits: Limits) -> None:
    src_fd, src = writer.parent(_clean(info.linkname, "link", limits))
    src_fd = os.dup(src_fd)  # finding the link's own directory may close the writer's copy
    try:
        dirfd, name = writer.parent(path)
        os.link(src, name, src_dir_fd=src_fd, dst_dir_fd=dirfd, follow_symlinks=False)
    finally:
        os.close(src_fd)


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


def build_rootfs(blobs: list[tuple[Path, str]], out: Path, *, limits: Limits = LIMITS) -> None:
    """``out``: the ext4 image of the layers ``(blob, media type)``, lowest first."""
    with scratch(out.parent) as work:
        layers: list[Path] = []
        inflated = 0
        for i, (blob, media) in enumerate(blobs):
            layer = decompress(
                blob, media, work / f"layer{i}.tar", limits=limits, earlier_bytes=inflated
            )
            inflated += layer.stat().st_size
            layers.append(layer)
        tree = merge(layers, limits=limits)
        root = work / "root"
        root.mkdir()
        write_tree(tree, layers, root, limits=limits)
        make_ext4(root, out)
