"""A real local registry (Debian's docker-registry) and OCI images assembled by the tests,
pushed with skopeo: everything on 127.0.0.1."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass
class Layer:
    """Tar entries, in order: (path, kind, content-or-target, mode, uid)."""

    entries: list[tuple[str, str, bytes | str, int, int]] = field(default_factory=list)

    def file(self, path: str, data: bytes, mode: int = 0o644, uid: int = 0) -> Layer:
        self.entries.append((path, "file", data, mode, uid))
        return self

    def dir(self, path: str, mode: int = 0o755, uid: int = 0) -> Layer:
        self.entries.append((path, "dir", b"", mode, uid))
        return self

    def symlink(self, path: str, target: str) -> Layer:
        self.entries.append((path, "symlink", target, 0o777, 0))
        return self

    def hardlink(self, path: str, target: str) -> Layer:
        self.entries.append((path, "hardlink", target, 0o644, 0))
        return self

    def tar_gz(self) -> bytes:
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path, kind, content, mode, uid in self.entries:
                info = tarfile.TarInfo(path)
                info.mode, info.uid, info.gid, info.mtime = mode, uid, uid, 1700000000
                if kind == "file":
                    assert isinstance(content, bytes)
                    info.size = len(content)
                    tar.addfile(info, io.BytesIO(content))
                    continue
                info.type = {
                    "dir": tarfile.DIRTYPE,
                    "symlink": tarfile.SYMTYPE,
                    "hardlink": tarfile.LNKTYPE,
                }[kind]
                if kind in ("symlink", "hardlink"):
                    assert isinstance(content, str)
                    info.linkname = content
                tar.addfile(info)
        return gzip.compress(raw.getvalue(), mtime=0)


def busybox_layer() -> Layer:
    """A minimal userland: static busybox and a passwd with an unprivileged user."""
    layer = Layer().dir("bin").dir("etc").dir("tmp", 0o1777).dir("home").dir("home/app", uid=1000)
    busybox = shutil.which("busybox") or "/bin/busybox"
    layer.file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    for applet in ("sh", "cat", "ls", "id", "pwd", "echo", "sleep", "env", "stat", "touch", "rm"):
        layer.symlink(f"bin/{applet}", "busybox")
    layer.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")
    layer.file("etc/group", b"root:x:0:\napp:x:1000:\n")
    return layer


def _blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def write_layout(
    layout: Path,
    tag: str,
    layers: list[Layer],
    config: dict[str, object],
    arches: tuple[str, ...] = ("amd64",),
) -> str:
    """An OCI image layout holding the image (an index when several arches); its digest."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    descriptors = []
    for arch in arches:
        layer_descs, diff_ids = [], []
        for layer in layers:
            gz = layer.tar_gz()
            digest, size = _blob(layout, gz)
            layer_descs.append({"mediaType": OCI_LAYER_GZ, "digest": digest, "size": size})
            diff_ids.append("sha256:" + hashlib.sha256(gzip.decompress(gz)).hexdigest())
        cfg = {
            "architecture": arch,
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
        cfg_digest, cfg_size = _blob(layout, json.dumps(cfg).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": cfg_digest, "size": cfg_size},
            "layers": layer_descs,
        }
        m_digest, m_size = _blob(layout, json.dumps(manifest).encode())
        descriptors.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": m_digest,
                "size": m_size,
                "platform": {"architecture": arch, "os": "linux"},
            }
        )
    if len(descriptors) == 1:
        top = {**descriptors[0], "annotations": {"org.opencontainers.image.ref.name": tag}}
        top.pop("platform")
    else:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
        i_digest, i_size = _blob(layout, json.dumps(index).encode())
        top = {
            "mediaType": OCI_INDEX,
            "digest": i_digest,
            "size": i_size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    return str(top["digest"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Registry:
    address: str
    creds: str | None  # "user:password" when auth is on

    def push(self, layout: Path, tag: str, repo: str, all_arches: bool = False) -> None:
        argv = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false"]
        if all_arches:
            argv.append("--all")
        if self.creds:
            argv += ["--dest-creds", self.creds]
        argv += [f"oci:{layout}:{tag}", f"docker://{self.address}/{repo}:{tag}"]
        subprocess.run(argv, check=True, capture_output=True, timeout=120)


@contextmanager
def registry(
    workdir: Path, user: str | None = None, password: str | None = None
) -> Iterator[Registry]:
    """docker-registry on 127.0.0.1 (with htpasswd auth when a user is given)."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    auth = ""
    if user and password:
        htpasswd = workdir / "htpasswd"
        subprocess.run(
            ["htpasswd", "-Bbc", str(htpasswd), user, password], check=True, capture_output=True
        )
        auth = f"auth:\n  htpasswd:\n    realm: capsa-test\n    path: {htpasswd}\n"
    config = workdir / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {workdir / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n{auth}"
    )
    proc = subprocess.Popen(
        ["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise RuntimeError(f"docker-registry did not start: {err}") from None
                time.sleep(0.1)
        yield Registry(f"127.0.0.1:{port}", f"{user}:{password}" if user else None)
    finally:
        proc.terminate()
        proc.wait(10)
