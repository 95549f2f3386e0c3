"""A client for the OCI distribution API (the Docker registry v2 protocol), on ``httpx``.

Anonymous access, Bearer token challenges (``WWW-Authenticate: Bearer realm=...``) and
Basic auth, with credentials from ``~/.docker/config.json`` when present. Every manifest
and blob is checked against its sha256 digest; a blob download that breaks resumes with a
``Range`` request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from capsa.errors import CapsaError
from capsa.oci.reference import DOCKER_HUB, Reference

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join((*INDEX_TYPES, *MANIFEST_TYPES))
MAX_MANIFEST = 4 << 20
RETRIES = 5


class RegistryError(CapsaError):
    """The registry refused, failed, or sent something that does not check out."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


def docker_credentials(registry: str, config_dir: Path | None = None) -> Credentials | None:
    """Credentials for ``registry`` from docker's config file (``$DOCKER_CONFIG``)."""
    base = config_dir or Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker")
    try:
        auths = json.loads((base / "config.json").read_text()).get("auths", {})
    except (OSError, ValueError):
        return None
    keys = [registry, f"https://{registry}", f"http://{registry}"]
    if registry == DOCKER_HUB:
        keys += ["https://index.docker.io/v1/", "index.docker.io", "docker.io"]
    for key in keys:
        entry = auths.get(key)
        if not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                continue
            return Credentials(user, password)
        if entry.get("username") and entry.get("password"):
            return Credentials(str(entry["username"]), str(entry["password"]))
    return None


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


def host_architecture() -> str:
    """This host's architecture in OCI's words."""
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Manifest:
    digest: str
    media_type: str
    raw: bytes

    @property
    def data(self) -> dict[str, Any]:
        value = json.loads(self.raw)
        if not isinstance(value, dict):
            raise RegistryError("manifest is not a JSON object")
        return value


class RegistryClient:
    """One registry; use as an async context manager."""

    def __init__(
        self,
        registry: str,
        *,
        insecure: bool = False,
        credentials: Credentials | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.registry = registry
        self.base = f"{'http' if insecure else 'https'}://{registry}/v2"
        self.credentials = credentials or docker_credentials(registry)
        self.http = httpx.AsyncClient(timeout=timeout, follow_redirects=True)
        self._auth: str | None = None  # the Authorization header that worked last

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    # -- authentication ---------------------------------------------------------------------

    async def _authorize(self, response: httpx.Response) -> bool:
        """Answer a 401 challenge; False when there is nothing more to try."""
        scheme, params = _challenge(response.headers.get("www-authenticate", ""))
        if scheme == "basic":
            if self.credentials is None:
                return False
            pair = f"{self.credentials.username}:{self.credentials.password}".encode()
            auth = "Basic " + base64.b64encode(pair).decode()
        elif scheme == "bearer" and "realm" in params:
            query = {k: v for k, v in params.items() if k in ("service", "scope")}
            basic = None
            if self.credentials is not None:
                basic = (self.credentials.username, self.credentials.password)
            reply = await self.http.get(params["realm"], params=query, auth=basic)
            if reply.status_code != 200:
                raise RegistryError(f"token service {params['realm']}: HTTP {reply.status_code}")
            body = reply.json()
            token = body.get("token") or body.get("access_token")
            if not token:
                raise RegistryError("token service answered without a token")
            auth = f"Bearer {token}"
        else:
            return False
        if auth == self._auth:
            return False  # the same answer was refused already
        self._auth = auth
        return True

    async def _send(self, method: str, url: str, headers: dict[str, str]) -> httpx.Response:
        for _ in range(3):
            if self._auth:
                headers = {**headers, "Authorization": self._auth}
            request = self.http.build_request(method, url, headers=headers)
            try:
                response = await self.http.send(request, stream=True)
            except httpx.TransportError as e:
                raise RegistryError(f"cannot reach {self.registry}: {e}") from e
            if response.status_code != 401:
                return response
            await response.aclose()
            if not await self._authorize(response):
                raise RegistryError(f"{self.registry}: access denied (HTTP 401) for {url}")
        raise RegistryError(f"{self.registry}: authentication did not settle for {url}")

    # -- manifests ------------------------------------------------------------------------

    async def manifest(self, repository: str, wanted: str) -> Manifest:
        url = f"{self.base}/{repository}/manifests/{wanted}"
        response = await self._send("GET", url, {"Accept": ACCEPT})
        try:
            if response.status_code == 404:
                raise RegistryError(f"{self.registry}/{repository}:{wanted} not found")
            if response.status_code != 200:
                raise RegistryError(f"manifest {wanted}: HTTP {response.status_code}")
            raw = b""
            async for chunk in response.aiter_bytes():
                raw += chunk
                if len(raw) > MAX_MANIFEST:
                    raise RegistryError("manifest larger than 4 MiB")
        finally:
            await response.aclose()
        digest = sha256_of(raw)
        if wanted.startswith("sha256:") and digest != wanted:
            raise RegistryError(f"manifest digest {digest} does not match {wanted}")
        claimed = response.headers.get("docker-content-digest")
        if claimed and claimed.startswith("sha256:") and claimed != digest:
            raise RegistryError(f"manifest digest {digest} does not match the header {claimed}")
        media = response.headers.get("content-type", "").split(";")[0].strip()
        manifest = Manifest(digest, media, raw)
        media = manifest.data.get("mediaType") or media
        return Manifest(digest, str(media), raw)

    async def image_manifest(
        self, ref: Reference, platform: tuple[str, str] | None = None
    ) -> tuple[Manifest, Manifest | None]:
        """The image manifest for ``platform`` (default: linux on this host's architecture),
        following an index, and the index if there was one."""
        platform = platform or ("linux", host_architecture())
        top = await self.manifest(ref.repository, ref.wanted)
        data = top.data
        if top.media_type in MANIFEST_TYPES or "layers" in data:
            return top, None
        if top.media_type not in INDEX_TYPES and "manifests" not in data:
            raise RegistryError(f"unsupported manifest type {top.media_type!r}")
        for entry in data.get("manifests", []):
            p = entry.get("platform") or {}
            if (p.get("os"), p.get("architecture")) == platform:
                return await self.manifest(ref.repository, str(entry["digest"])), top
        platforms = [e.get("platform") or {} for e in data.get("manifests", [])]
        found = [f"{p.get('os')}/{p.get('architecture')}" for p in platforms]
        raise RegistryError(f"{ref.name} has no {platform[0]}/{platform[1]} image ({found})")

    # -- blobs ----------------------------------------------------------------------------

    async def blob(
        self,
        repository: str,
        digest: str,
        dest: Path,
        size: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Download blob ``digest`` into ``dest`` (written atomically, digest checked)."""
        if not digest.startswith("sha256:"):
            raise RegistryError(f"unsupported digest algorithm in {digest!r}")
        part = dest.with_name(dest.name + ".part")
        url = f"{self.base}/{repository}/blobs/{digest}"
        h = hashlib.sha256()
        done = 0
        with open(part, "wb") as f:
            for attempt in range(RETRIES):
                headers = {"Range": f"bytes={done}-"} if done else {}
                try:
                    response = await self._send("GET", url, headers)
                    try:
                        if done and response.status_code == 200:
                            f.seek(0)  # the server ignored Range: start over
                            f.truncate()
                            h, done = hashlib.sha256(), 0
                        elif response.status_code not in (200, 206):
                            raise RegistryError(f"blob {digest}: HTTP {response.status_code}")
                        async for chunk in response.aiter_bytes():
                            f.write(chunk)
                            h.update(chunk)
                            done += len(chunk)
                            if size is not None and done > size:
                                raise RegistryError(f"blob {digest} is larger than {size}")
                            if progress is not None:
                                progress(len(chunk))
                    finally:
                        await response.aclose()
                    break
                except (httpx.TransportError, httpx.StreamError) as e:
                    if attempt == RETRIES - 1:
                        raise RegistryError(f"blob {digest}: {e}") from e
        got = "sha256:" + h.hexdigest()
        if got != digest or (size is not None and done != size):
            part.unlink(missing_ok=True)
            raise RegistryError(f"blob {digest} arrived corrupted (got {got}, {done} bytes)")
        part.rename(dest)
