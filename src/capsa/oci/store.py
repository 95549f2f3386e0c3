"""The local image store under ``$XDG_CACHE_HOME/capsa/oci``, content-addressed.

    blobs/sha256/<hex>      manifests, configs and layers, shared between images
    images/<hex>.json       one pulled image: its name, manifest, config and layers
    rootfs/<hex>.ext4       its root file system, built once per image (manifest digest)
    refs.json               name -> manifest digest

An image already present is served from here without asking the registry.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsa.images.cache import cache_root, locked
from capsa.oci.layers import build_rootfs
from capsa.oci.reference import Reference, parse_reference
from capsa.oci.registry import Credentials, RegistryClient, RegistryError

Progress = Callable[[str, int, int | None], None]  # (what, bytes done, total)


def no_progress(what: str, done: int, total: int | None) -> None:
    pass


@dataclass(frozen=True)
class ImageConfig:
    """What the image's config says about running it."""

    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    workdir: str = "/"
    user: str = ""

    @classmethod
    def from_blob(cls, data: dict[str, Any]) -> ImageConfig:
        c = data.get("config") or {}
        return cls(
            entrypoint=list(c.get("Entrypoint") or []),
            cmd=list(c.get("Cmd") or []),
            env=list(c.get("Env") or []),
            workdir=c.get("WorkingDir") or "/",
            user=c.get("User") or "",
        )


@dataclass(frozen=True)
class Image:
    name: str
    digest: str  # of the image manifest
    config_digest: str
    layers: tuple[tuple[str, str, int], ...]  # (digest, media type, size)
    config: ImageConfig
    store: Store

    @property
    def size(self) -> int:
        return sum(size for _, _, size in self.layers)

    @property
    def rootfs(self) -> Path:
        return self.store.root / "rootfs" / f"{self.digest.split(':', 1)[1]}.ext4"


class Store:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_root() / "oci"
        for d in ("blobs/sha256", "images", "rootfs"):
            (self.root / d).mkdir(parents=True, exist_ok=True)

    def blob_path(self, digest: str) -> Path:
        algo, _, hexdigest = digest.partition(":")
        if (
            algo != "sha256"
            or len(hexdigest) != 64
            or not all(c in "0123456789abcdef" for c in hexdigest)
        ):
            raise RegistryError(f"bad digest {digest!r}")
        return self.root / "blobs" / "sha256" / hexdigest

    # -- refs -------------------------------------------------------------------------------

    def _refs(self) -> dict[str, str]:
        try:
            data = json.loads((self.root / "refs.json").read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _save_refs(self, refs: dict[str, str]) -> None:
        tmp = self.root / "refs.json.tmp"
        tmp.write_text(json.dumps(refs, indent=1, sort_keys=True))
        tmp.rename(self.root / "refs.json")

    def _record_path(self, digest: str) -> Path:
        return self.root / "images" / f"{digest.split(':', 1)[1]}.json"

    def get(self, name: str) -> Image | None:
        """A pulled image by reference (tag or digest), or None."""
        ref = parse_reference(name)
        digest = ref.digest if ref.digest else self._refs().get(ref.name)
        if digest is None:
            return None
        try:
            record = json.loads(self._record_path(digest).read_text())
        except (OSError, ValueError):
            return None
        if not all(self.blob_path(d).exists() for d, _, _ in record["layers"]):
            return None
        return self._image(record)

    def _image(self, record: dict[str, Any]) -> Image:
        config = json.loads(self.blob_path(record["config"]).read_text())
        layers = tuple((str(d), str(m), int(s)) for d, m, s in record["layers"])
        return Image(
            name=record["name"],
            digest=record["digest"],
            config_digest=record["config"],
            layers=layers,
            config=ImageConfig.from_blob(config),
            store=self,
        )

    def images(self) -> list[Image]:
        out = []
        for path in sorted((self.root / "images").glob("*.json")):
            try:
                out.append(self._image(json.loads(path.read_text())))
            except (OSError, ValueError, KeyError, RegistryError):
                continue
        return out

    # -- pulling ----------------------------------------------------------------------------

    async def pull(
        self,
        name: str,
        *,
        insecure: bool = False,
        credentials: Credentials | None = None,
        refresh: bool = False,
        progress: Progress = no_progress,
    ) -> Image:
        """The image ``name``, from the store when present, else from its registry."""
        ref = parse_reference(name)
        if not refresh and (found := self.get(name)) is not None:
            return found
        async with RegistryClient(ref.registry, insecure=insecure, credentials=credentials) as reg:
            manifest, _index = await reg.image_manifest(ref)
            data = manifest.data
            config = data.get("config") or {}
            layers = [
                (str(x["digest"]), str(x.get("mediaType", "")), int(x.get("size", 0)))
                for x in data.get("layers", [])
            ]
            if not config.get("digest") or not layers:
                raise RegistryError(f"{ref.name}: the manifest has no config or no layers")
            await self._fetch(reg, ref, str(config["digest"]), int(config.get("size", 0)), progress)
            for digest, _, size in layers:
                await self._fetch(reg, ref, digest, size, progress)
        self.blob_path(manifest.digest).write_bytes(manifest.raw)
        record = {
            "name": ref.name,
            "digest": manifest.digest,
            "config": config["digest"],
            "layers": layers,
        }
        with locked("oci"):
            self._record_path(manifest.digest).write_text(json.dumps(record, indent=1))
            refs = self._refs()
            refs[ref.name] = manifest.digest
            refs[f"{ref.name.split('@')[0].rsplit(':', 1)[0]}@{manifest.digest}"] = manifest.digest
            self._save_refs(refs)
        return self._image(record)

    async def _fetch(
        self, reg: RegistryClient, ref: Reference, digest: str, size: int, progress: Progress
    ) -> None:
        dest = self.blob_path(digest)
        if dest.exists():
            progress(digest, size, size)
            return
        done = 0

        def step(n: int) -> None:
            nonlocal done
            done += n
            progress(digest, done, size or None)

        await reg.blob(ref.repository, digest, dest, size or None, step)

    # -- root file systems ------------------------------------------------------------------

    async def rootfs(self, image: Image) -> Path:
        """The image's ext4 root file system, built on first use and kept."""
        out = image.rootfs
        if out.exists():
            return out
        blobs = [(self.blob_path(d), m) for d, m, _ in image.layers]

        def build() -> None:
            with locked("oci-rootfs"):
                if not out.exists():
                    build_rootfs(blobs, out)

        await asyncio.to_thread(build)
        return out

    # -- removing ---------------------------------------------------------------------------

    def remove(self, name: str) -> bool:
        """Forget the reference ``name`` (blobs go at the next prune)."""
        ref = parse_reference(name)
        with locked("oci"):
            refs = self._refs()
            digest = ref.digest or refs.get(ref.name)
            if digest is None:
                return False
            refs = {k: v for k, v in refs.items() if v != digest}
            self._save_refs(refs)
            self._record_path(digest).unlink(missing_ok=True)
            (self.root / "rootfs" / f"{digest.split(':', 1)[1]}.ext4").unlink(missing_ok=True)
        return True

    def prune(self) -> int:
        """Delete blobs and root file systems no pulled image refers to; bytes freed."""
        freed = 0
        with locked("oci"):
            keep: set[str] = set()
            rootfs: set[str] = set()
            for image in self.images():
                keep |= {image.digest, image.config_digest, *(d for d, _, _ in image.layers)}
                rootfs.add(image.rootfs.name)
            for blob in (self.root / "blobs" / "sha256").iterdir():
                if f"sha256:{blob.name}" not in keep:
                    freed += blob.stat().st_size
                    blob.unlink()
            for fs in (self.root / "rootfs").iterdir():
                if fs.name not in rootfs:
                    freed += fs.stat().st_size
                    fs.unlink()
        return freed


def default_store() -> Store:
    return Store(Path(os.environ["CAPSA_OCI_STORE"]) if os.environ.get("CAPSA_OCI_STORE") else None)
