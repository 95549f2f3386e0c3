"""Hostile OCI layers that cost far more to unpack than they weigh: quadratic whiteouts, gzip
bombs, entry floods, long paths, oversized or chained tar headers, sparse files. Each is
refused (LayerError naming the limit) or handled in linear time, before it uses up time,
disk or memory. No VM: the layers are built here and fed to capsa.oci.layers directly."""

from __future__ import annotations

import gzip
import io
import os
import resource
import tarfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from capsa.oci.layers import (
    LayerError,
    LayerLimitError,
    Limits,
    build_rootfs,
    decompress,
    merge,
    write_tree,
)

MiB = 1 << 20
GiB = 1 << 30
GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
TAR = "application/vnd.oci.image.layer.v1.tar"


def _file(name: str, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _tar(path: Path, entries: Iterable[tarfile.TarInfo]) -> Path:
    """A tar of empty files, directories and links (PAX, so any name length fits)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info in entries:
            tar.addfile(info, io.BytesIO(bytes(info.size)) if info.size else None)
    return path


def _written() -> int:
    """Bytes this process has passed to write() so far (the kernel's count)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


# -- (a) whiteouts, opaque directories and replaced directories in linear time ---------------

DIRS, FILES = 500, 100  # a 50,000-file base


def _base() -> Iterator[tarfile.TarInfo]:
    for d in range(DIRS):
        yield _dir(f"d{d}")
        for f in range(FILES):
            yield _file(f"d{d}/f{f}")


def _whiteouts() -> tuple[list[tarfile.TarInfo], set[str]]:
    """~50,000 whiteouts: 100 whole directories, every odd file of the other 400, and as
    many of names that were never there."""
    upper = [_file(f".wh.d{d}") for d in range(100)]
    for d in range(100, DIRS):
        upper += [_file(f"d{d}/.wh.f{f}") for f in range(1, FILES, 2)]
        upper += [_file(f"d{d}/.wh.never{f}") for f in range(75)]
    kept = {f"d{d}" for d in range(100, DIRS)}
    kept |= {f"d{d}/f{f}" for d in range(100, DIRS) for f in range(0, FILES, 2)}
    return upper, kept


FLAT = 30_000  # directories of one file each


def _flat_base() -> Iterator[tarfile.TarInfo]:
    for d in range(FLAT):
        yield _dir(f"d{d}")
        yield _file(f"d{d}/f")


def _opaque_dirs() -> tuple[list[tarfile.TarInfo], set[str]]:
    """An opaque marker in each directory: the directories stay, emptied."""
    upper = [_file(f"d{d}/.wh..wh..opq") for d in range(FLAT)]
    return upper, {f"d{d}" for d in range(FLAT)}


def _directories_replaced() -> tuple[list[tarfile.TarInfo], set[str]]:
    """A file in place of each directory: what the directory held goes."""
    return [_file(f"d{d}") for d in range(FLAT)], {f"d{d}" for d in range(FLAT)}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("base", "shape"),
    [(_base, _whiteouts), (_flat_base, _opaque_dirs), (_flat_base, _directories_replaced)],
    ids=["whiteouts", "opaque-dirs", "dirs-replaced-by-files"],
)
def test_whiteouts_against_a_large_tree_merge_in_linear_time(
    tmp_path: Path,
    base: Callable[[], Iterator[tarfile.TarInfo]],
    shape: Callable[[], tuple[list[tarfile.TarInfo], set[str]]],
) -> None:
    upper, kept = shape()
    lower = _tar(tmp_path / "lower.tar", base())
    hostile = _tar(tmp_path / "upper.tar", upper)
    assert len(upper) >= FLAT and hostile.stat().st_size < 32 * MiB
    start = time.monotonic()
    tree = merge([lower, hostile])
    elapsed = time.monotonic() - start
    assert set(tree) == kept
    # ~3 s here on an idle machine, ~7 s with both cores busy; scanning the tree per
    # whiteout took minutes.
    assert elapsed < 20, f"merging took {elapsed:.1f} s"


# -- (b) what a layer may expand to -------------------------------------------------------------


def _gzip_bomb(path: Path, zeros: int) -> Path:
    """A gzip layer of one tar entry holding ``zeros`` zero bytes, a few MB on disk.

    Written as one gzip member for the tar header and then identical members of 16 MiB of
    zeros each (RFC 1952 allows any number): compressed once, never held whole in memory.
    """
    header = _file("zeros", zeros).tobuf(tarfile.GNU_FORMAT)
    block = 16 * MiB
    with open(path, "wb") as out:
        out.write(gzip.compress(header))
        compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip header and trailer
        member = compressor.compress(bytes(block)) + compressor.flush()
        for _ in range(zeros // block):
            out.write(member)
    return path


@pytest.mark.timeout(60)
def test_gzip_bomb_stops_at_the_layer_limit_and_leaves_nothing(tmp_path: Path) -> None:
    bomb = _gzip_bomb(tmp_path / "bomb.tar.gz", 2 * GiB)
    assert bomb.stat().st_size < 8 * MiB
    dest = tmp_path / "layer.tar"
    limit = 64 * MiB
    before = _written()
    start = time.monotonic()
    with pytest.raises(LayerLimitError, match=r"Limits\.layer_bytes") as refused:
        decompress(bomb, GZIP, dest, limits=Limits(layer_bytes=limit))
    written = _written() - before
    assert refused.value.limit == "layer_bytes"
    assert written <= limit + MiB, f"{written:,} bytes written for a {limit:,}-byte limit"
    assert not dest.exists()
    assert time.monotonic() - start < 10  # stopped early, not after inflating 2 GiB


@pytest.mark.timeout(60)
def test_image_limit_spans_the_layers(tmp_path: Path) -> None:
    """Each layer alone is under the per-layer limit; together they pass the image's."""
    blobs = [(_gzip_bomb(tmp_path / f"{i}.tar.gz", 48 * MiB), GZIP) for i in range(2)]
    out = tmp_path / "rootfs" / "image.ext4"
    out.parent.mkdir()
    limits = Limits(layer_bytes=64 * MiB, image_bytes=80 * MiB)
    before = _written()
    with pytest.raises(LayerLimitError, match=r"Limits\.image_bytes") as refused:
        build_rootfs(blobs, out, limits=limits)
    assert refused.value.limit == "image_bytes"
    assert _written() - before <= 80 * MiB + MiB
    assert list(out.parent.iterdir()) == []  # no image, no scratch left behind


def test_uncompressed_layer_over_the_limit_is_refused(tmp_path: Path) -> None:
    layer = _tar(tmp_path / "big.tar", [_file("big", 2 * MiB)])
    with pytest.raises(LayerLimitError, match=r"Limits\.layer_bytes"):
        decompress(layer, TAR, tmp_path / "copy.tar", limits=Limits(layer_bytes=MiB))


def test_too_many_entries_in_the_image_are_refused(tmp_path: Path) -> None:
    """Counted over all the layers, whiteouts included: each layer alone is under it."""
    lower = _tar(tmp_path / "1.tar", [_file(f"f{i}") for i in range(600)])
    upper = _tar(tmp_path / "2.tar", [_file(f".wh.g{i}") for i in range(600)])
    limits = Limits(entries=1000)
    assert len(merge([lower], limits=limits)) == 600
    with pytest.raises(LayerLimitError, match=r"layer 2: too many entries.*Limits\.entries"):
        merge([lower, upper], limits=limits)


@pytest.mark.parametrize(
    ("entry", "limit"),
    [
        (_file("/".join(["d" * 100] * 41)), "path_bytes"),
        (_file("a/" * 300 + "f"), "path_depth"),
        (_file("n" * 256), "name_bytes"),
        (_link("sym", "t" * 4096), "path_bytes"),
    ],
    ids=["long-path", "deep-path", "long-name", "long-symlink-target"],
)
def test_overlong_paths_are_refused(tmp_path: Path, entry: tarfile.TarInfo, limit: str) -> None:
    with pytest.raises(LayerLimitError, match=rf"Limits\.{limit}") as refused:
        merge([_tar(tmp_path / "l.tar", [entry])])
    assert refused.value.limit == limit


def test_overlong_hard_link_target_is_refused(tmp_path: Path) -> None:
    target = "x" * 200 + "/" + "/".join(["d" * 200] * 20) + "/f"
    layer = _tar(tmp_path / "l.tar", [_link("l", target, tarfile.LNKTYPE)])
    with pytest.raises(LayerLimitError, match=r"Limits\.path_bytes"):
        merge([layer])


# -- tar headers that tarfile would read whole, or follow by recursion ----------------------


def test_oversized_pax_header_is_refused(tmp_path: Path) -> None:
    info = _file("f")
    info.pax_headers = {"comment": "x" * (2 * MiB)}
    with pytest.raises(LayerLimitError, match=r"Limits\.header_bytes"):
        merge([_tar(tmp_path / "l.tar", [info])])


def test_extended_headers_of_the_image_are_bounded_together(tmp_path: Path) -> None:
    entries = []
    for i in range(100):
        entries.append(info := _file(f"f{i}"))
        info.pax_headers = {"comment": "x" * (10 * 1024)}
    layer = _tar(tmp_path / "l.tar", entries)
    assert len(merge([layer])) == 100
    with pytest.raises(LayerLimitError, match=r"Limits\.metadata_bytes"):
        merge([layer], limits=Limits(metadata_bytes=512 * 1024))


def _pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def _raw_pax_header(records: bytes) -> bytes:
    header = _file("././@PaxHeader", len(records))
    header.type = tarfile.XHDTYPE
    padding = -len(records) % tarfile.BLOCKSIZE
    return header.tobuf(tarfile.USTAR_FORMAT) + records + bytes(padding)


@pytest.mark.timeout(30)
def test_chained_pax_headers_are_refused(tmp_path: Path) -> None:
    """tarfile follows each header that modifies the next by recursion."""
    layer = tmp_path / "l.tar"
    with open(layer, "wb") as out:
        for _ in range(2000):
            out.write(_raw_pax_header(_pax_record("comment", "x")))
        out.write(_file("f").tobuf(tarfile.USTAR_FORMAT) + bytes(2 * tarfile.BLOCKSIZE))
    with pytest.raises(LayerLimitError, match=r"Limits\.header_chain"):
        merge([layer])


def _old_gnu_sparse(name: str, real_size: int) -> bytes:
    """A GNU 'S' entry: 512 bytes of data standing for ``real_size`` bytes, mostly hole."""
    header = bytearray(_file(name, tarfile.BLOCKSIZE).tobuf(tarfile.GNU_FORMAT))
    header[156:157] = tarfile.GNUTYPE_SPARSE
    header[386:398] = tarfile.itn(0, 12, tarfile.GNU_FORMAT)  # one chunk at offset 0...
    header[398:410] = tarfile.itn(tarfile.BLOCKSIZE, 12, tarfile.GNU_FORMAT)  # ...of 512
    header[483:495] = tarfile.itn(real_size, 12, tarfile.GNU_FORMAT)
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header) + b"x" * tarfile.BLOCKSIZE + bytes(2 * tarfile.BLOCKSIZE)


def _pax_sparse(path: Path, name: str, real_size: int) -> Path:
    """A pax GNU.sparse 1.0 entry: its data starts with the map, then one 512-byte chunk."""
    info = _file(name, 2 * tarfile.BLOCKSIZE)
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": name,
        "GNU.sparse.realsize": str(real_size),
    }
    data = b"1\n0\n512\n".ljust(tarfile.BLOCKSIZE, b"\0") + b"x" * tarfile.BLOCKSIZE
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("kind", ["old-gnu", "pax-1.0"])
def test_sparse_files_are_refused(tmp_path: Path, kind: str) -> None:
    """Their size is what they expand to (here 1 TiB), holes written out as zeros."""
    layer = tmp_path / "l.tar"
    if kind == "old-gnu":
        layer.write_bytes(_old_gnu_sparse("huge", 1 << 40))
    else:
        _pax_sparse(layer, "huge", 1 << 40)
    with tarfile.open(layer) as tar:  # tarfile itself reads it as a 1 TiB file
        assert tar.getmembers()[0].size == 1 << 40
    with pytest.raises(LayerError, match="sparse file"):
        merge([layer])


@pytest.mark.parametrize(
    ("data", "media"),
    [(b"\x1f\x8b" + b"junk" * 100, GZIP), (b"not a tar" * 100, TAR)],
    ids=["bad-gzip", "bad-tar"],
)
def test_layers_that_are_not_layers_raise_layer_error(
    tmp_path: Path, data: bytes, media: str
) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    with pytest.raises(LayerError, match="not a valid"):
        merge([decompress(blob, media, tmp_path / "layer.tar")])
    assert not (tmp_path / "layer.tar").exists()


# -- writing: one descriptor per directory would run out ------------------------------------


def test_many_directories_are_written_within_a_small_descriptor_limit(tmp_path: Path) -> None:
    layer = _tar(
        tmp_path / "l.tar",
        [e for d in range(2000) for e in (_dir(f"a/d{d}"), _file(f"a/d{d}/f", 1))],
    )
    tree = merge([layer])
    root = tmp_path / "root"
    root.mkdir()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 200, hard))
    try:
        write_tree(tree, [layer], root)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(list(root.glob("a/d*/f"))) == 2000
    assert (root / "a" / "d1999" / "f").read_bytes() == b"\0"
