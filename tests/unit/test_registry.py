"""The registry client against a small scripted registry on 127.0.0.1: the Bearer token
dance, and a blob download that breaks halfway and resumes with a Range request."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from capsa.oci.reference import parse_reference
from capsa.oci.registry import OCI_MANIFEST, RegistryClient, RegistryError

BLOB = bytes(range(256)) * 4096  # 1 MiB
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
DESCRIPTOR = {"digest": BLOB_DIGEST, "size": len(BLOB)}
MANIFEST = json.dumps(
    {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": DESCRIPTOR, "layers": [DESCRIPTOR]}
).encode()
TOKEN = "t0ken"


@dataclass
class Scripted:
    port: int = 0
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    break_first_blob: bool = True


async def _serve(
    state: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    request = (await reader.readuntil(b"\r\n\r\n")).decode()
    line, *lines = request.split("\r\n")
    path = line.split()[1]
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines if h)}
    state.seen.append((path, headers))

    def respond(status: str, body: bytes, extra: str = "") -> None:
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}"
            "Connection: close\r\n\r\n".encode()
            + body
        )

    if path.startswith("/token"):
        respond("200 OK", json.dumps({"token": TOKEN}).encode())
    elif headers.get("authorization") != f"Bearer {TOKEN}":
        realm = f"http://127.0.0.1:{state.port}/token"
        challenge = f'Bearer realm="{realm}",service="test",scope="repository:app:pull"'
        respond("401 Unauthorized", b"", f"WWW-Authenticate: {challenge}\r\n")
    elif "/manifests/" in path:
        respond("200 OK", MANIFEST, f"Content-Type: {OCI_MANIFEST}\r\n")
    elif "/blobs/" in path:
        start = int(headers.get("range", "bytes=0-")[6:].rstrip("-") or 0)
        part = BLOB[start:]
        status = "206 Partial Content" if start else "200 OK"
        if state.break_first_blob and not start:
            state.break_first_blob = False
            # Promise everything, deliver a third, hang up.
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(BLOB)}\r\n\r\n".encode())
            writer.write(BLOB[: len(BLOB) // 3])
            await writer.drain()
            writer.transport.abort()
            return
        respond(status, part)
    else:
        respond("404 Not Found", b"")
    await writer.drain()
    writer.close()


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    state = Scripted()
    server = await asyncio.start_server(lambda r, w: _serve(state, r, w), "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    async with server:
        yield state


async def test_bearer_challenge_then_resumed_blob(scripted: Scripted, tmp_path: Path) -> None:
    ref = parse_reference(f"127.0.0.1:{scripted.port}/app:v1")
    async with RegistryClient(ref.registry, insecure=True) as client:
        manifest, index = await client.image_manifest(ref)
        assert index is None and manifest.data["layers"][0]["digest"] == BLOB_DIGEST
        dest = tmp_path / "blob"
        await client.blob(ref.repository, BLOB_DIGEST, dest, len(BLOB))
    assert dest.read_bytes() == BLOB
    token_requests = [h for p, h in scripted.seen if p.startswith("/token")]
    assert len(token_requests) == 1  # one token, reused for every later request
    ranges = [h.get("range") for p, h in scripted.seen if "/blobs/" in p and "authorization" in h]
    assert ranges[0] is None and ranges[1] == f"bytes={len(BLOB) // 3}-"


async def test_blob_with_the_wrong_content_is_refused(scripted: Scripted, tmp_path: Path) -> None:
    scripted.break_first_blob = False
    ref = parse_reference(f"127.0.0.1:{scripted.port}/app:v1")
    wrong = "sha256:" + "0" * 64
    async with RegistryClient(ref.registry, insecure=True) as client:
        with pytest.raises(RegistryError, match="corrupted"):
            await client.blob(ref.repository, wrong, tmp_path / "blob", len(BLOB))
    assert not (tmp_path / "blob").exists() and not (tmp_path / "blob.part").exists()
