"""Image references and layer merging: hostile layers are refused before anything is written."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from capsa.errors import InvalidConfig
from capsa.oci.layers import LayerError, merge, write_tree
from capsa.oci.reference import DOCKER_HUB, parse_reference
from capsa.oci.registry import docker_credentials


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("python:3.11", DOCKER_HUB, "library/python", "3.11", None),
        ("busybox", DOCKER_HUB, "library/busybox", "latest", None),
        ("org/app", DOCKER_HUB, "org/app", "latest", None),
        ("ghcr.io/org/app:v1", "ghcr.io", "org/app", "v1", None),
        ("127.0.0.1:5000/app:tag", "127.0.0.1:5000", "app", "tag", None),
        ("localhost/x/y@sha256:" + "a" * 64, "localhost", "x/y", None, "sha256:" + "a" * 64),
    ],
)
def test_references(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry,
        repository,
        tag,
        digest,
    )


@pytest.mark.parametrize(
    "text", ["", "a b", "UPPER/x", "x:bad tag", "x@sha256:123", "x:" + "t" * 200]
)
def test_bad_references(text: str) -> None:
    with pytest.raises(InvalidConfig):
        parse_reference(text)


def _tar(path: Path, entries: list[tuple[str, str, str]]) -> Path:
    """entries: (name, kind, content or link target)."""
    with tarfile.open(path, "w") as tar:
        for name, kind, value in entries:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value.encode()))
                continue
            info.type = {
                "dir": tarfile.DIRTYPE,
                "sym": tarfile.SYMTYPE,
                "link": tarfile.LNKTYPE,
                "chr": tarfile.CHRTYPE,
            }[kind]
            info.linkname = value
            if kind == "dir":
                info.mode = 0o755
            tar.addfile(info)
    return path


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([("../escape", "file", "x")], "climbs out"),
        ([("a/../../escape", "file", "x")], "climbs out"),
        ([("/etc/passwd", "file", "x")], "absolute path"),
        ([("evil", "sym", "/etc"), ("evil/passwd", "file", "x")], "below the symlink"),
        ([("rel", "sym", "../.."), ("rel/x", "file", "x")], "below the symlink"),
        ([("f", "file", "x"), ("f/x", "file", "x")], "below the non-directory"),
        ([("l", "link", "/etc/shadow")], "absolute path"),
        ([("l", "link", "missing")], "not a file of the image"),
    ],
)
def test_hostile_layers_are_refused(
    tmp_path: Path, entries: list[tuple[str, str, str]], message: str
) -> None:
    with pytest.raises(LayerError, match=message):
        merge([_tar(tmp_path / "l.tar", entries)])


def test_symlinked_parent_from_a_lower_layer_is_refused(tmp_path: Path) -> None:
    lower = _tar(tmp_path / "1.tar", [("etc", "sym", "/etc")])
    upper = _tar(tmp_path / "2.tar", [("etc/cron.d/x", "file", "pwned")])
    with pytest.raises(LayerError, match="below the symlink"):
        merge([lower, upper])


def test_whiteouts_opaque_dirs_links_and_devices(tmp_path: Path) -> None:
    lower = _tar(
        tmp_path / "1.tar",
        [
            ("d", "dir", ""),
            ("d/old", "file", "1"),
            ("gone", "file", "2"),
            ("keep", "file", "3"),
            ("dev0", "chr", ""),
            ("link", "link", "keep"),
            ("sym", "sym", "/etc/passwd"),
        ],
    )
    upper = _tar(
        tmp_path / "2.tar",
        [
            ("d", "dir", ""),
            ("d/.wh..wh..opq", "file", ""),
            ("d/new", "file", "4"),
            (".wh.gone", "file", ""),
        ],
    )
    tree = merge([lower, upper])
    assert sorted(tree) == ["d", "d/new", "keep", "link", "sym"]
    root = tmp_path / "root"
    root.mkdir()
    write_tree(tree, [lower, upper], root)
    assert (root / "d" / "new").read_text() == "4" and not (root / "d" / "old").exists()
    assert os.path.samefile(root / "link", root / "keep")
    assert os.readlink(root / "sym") == "/etc/passwd"  # stored, never followed


def test_docker_config_credentials(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        '{"auths": {"127.0.0.1:5000": {"auth": "dXNlcjpzZWNyZXQ="},'
        ' "https://index.docker.io/v1/": {"username": "hub", "password": "pw"}}}'
    )
    creds = docker_credentials("127.0.0.1:5000", tmp_path)
    assert creds is not None and (creds.username, creds.password) == ("user", "secret")
    hub = docker_credentials(DOCKER_HUB, tmp_path)
    assert hub is not None and hub.username == "hub"
    assert docker_credentials("other:1", tmp_path) is None
