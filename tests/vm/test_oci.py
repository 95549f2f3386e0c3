"""OCI images against a real local registry (docker-registry on 127.0.0.1, images pushed
with skopeo), booted as sandboxes."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import capsa
from capsa.oci.layers import LayerError
from capsa.oci.registry import Credentials, RegistryError
from capsa.oci.store import Store
from tests.ocikit import Layer, Registry, busybox_layer, registry, write_layout

CONFIG = {
    "Env": ["PATH=/bin", "GREETING=hello from the image"],
    "WorkingDir": "/home/app",
    "User": "app",
    "Entrypoint": ["/bin/sh", "-c"],
    "Cmd": ["sleep 3600"],
}


@dataclass
class Images:
    reg: Registry
    work: Path
    app: str  # name of the two-layer test image
    app_digest: str
    multi: str


def app_layers() -> list[Layer]:
    lower = busybox_layer().file("etc/gone", b"x").dir("opq").file("opq/old", b"old")
    upper = (
        Layer()
        .file("etc/.wh.gone", b"")
        .dir("opq")
        .file("opq/.wh..wh..opq", b"")
        .file("opq/new", b"new")
        .file("home/app/hello.txt", b"hi\n", uid=1000)
    )
    return [lower, upper]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    root = tmp_path_factory.mktemp("ocistore")
    old = os.environ.get("CAPSA_OCI_STORE")
    os.environ["CAPSA_OCI_STORE"] = str(root)
    yield Store(root)
    if old is None:
        os.environ.pop("CAPSA_OCI_STORE")
    else:
        os.environ["CAPSA_OCI_STORE"] = old


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    work = tmp_path_factory.mktemp("oci")
    digest = write_layout(work / "app", "v1", app_layers(), CONFIG)
    write_layout(
        work / "multi",
        "v1",
        [busybox_layer()],
        {"Cmd": ["sleep", "3600"]},
        arches=("arm64", "amd64"),
    )
    with registry(work / "reg") as reg:
        reg.push(work / "app", "v1", "test/app")
        reg.push(work / "multi", "v1", "test/multi", all_arches=True)
        yield Images(
            reg, work, f"{reg.address}/test/app:v1", digest, f"{reg.address}/test/multi:v1"
        )


async def test_pull_by_tag_digest_and_index_then_from_cache(store: Store, images: Images) -> None:
    image = await store.pull(images.app, insecure=True)
    assert image.digest == images.app_digest
    assert image.config.user == "app" and len(image.layers) == 2
    by_digest = await store.pull(
        f"{images.reg.address}/test/app@{images.app_digest}", insecure=True
    )
    assert by_digest.digest == images.app_digest
    multi = await store.pull(images.multi, insecure=True)
    config = json.loads(store.blob_path(multi.config_digest).read_text())
    assert config["architecture"] == "amd64"  # picked from the index
    assert images.app in [i.name for i in store.images()]


async def test_cached_pull_needs_no_registry(tmp_path: Path, images: Images) -> None:
    store = Store(tmp_path / "store")
    with registry(tmp_path / "reg") as reg:
        reg.push(images.work / "app", "v1", "test/app")
        name = f"{reg.address}/test/app:v1"
        first = await store.pull(name, insecure=True)
    again = await store.pull(name, insecure=True)  # the registry is gone
    assert again.digest == first.digest
    with pytest.raises(RegistryError, match="cannot reach"):
        await store.pull(name, insecure=True, refresh=True)


async def test_corrupted_blob_is_rejected(tmp_path: Path, images: Images) -> None:
    layout = tmp_path / "bad"
    write_layout(layout, "v1", [busybox_layer(), Layer().file("x", b"intact")], {"Cmd": ["true"]})
    with registry(tmp_path / "reg") as reg:
        reg.push(layout, "v1", "test/bad")
        blobs = sorted(
            (tmp_path / "reg" / "data").rglob("blobs/sha256/*/*/data"),
            key=lambda p: p.stat().st_size,
        )
        data = blobs[-1]  # the busybox layer: the largest blob
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
        fresh = Store(tmp_path / "store")
        with pytest.raises(RegistryError, match="corrupted"):
            await fresh.pull(f"{reg.address}/test/bad:v1", insecure=True)
        assert not any((tmp_path / "store" / "blobs" / "sha256").glob("*.part"))


async def test_htpasswd_registry_needs_credentials(tmp_path: Path, images: Images) -> None:
    with registry(tmp_path / "reg", "capsa", "s3cret") as reg:
        reg.push(images.work / "app", "v1", "test/app")
        name = f"{reg.address}/test/app:v1"
        with pytest.raises(RegistryError, match=r"401|denied"):
            await Store(tmp_path / "s1").pull(name, insecure=True)
        image = await Store(tmp_path / "s2").pull(
            name, insecure=True, credentials=Credentials("capsa", "s3cret")
        )
        assert image.digest == images.app_digest
        docker = tmp_path / "docker"
        docker.mkdir()
        (docker / "config.json").write_text(
            json.dumps({"auths": {reg.address: {"auth": "Y2Fwc2E6czNjcmV0"}}})
        )
        os.environ["DOCKER_CONFIG"] = str(docker)
        try:
            assert (await Store(tmp_path / "s3").pull(name, insecure=True)).digest == image.digest
        finally:
            os.environ.pop("DOCKER_CONFIG")


async def test_hostile_layer_is_rejected_and_nothing_outside_changes(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    layout = tmp_path / "evil"
    evil = Layer().symlink("etc", str(outside)).file("etc/pwned", b"x")
    write_layout(layout, "v1", [busybox_layer(), evil], {"Cmd": ["true"]})
    with registry(tmp_path / "reg") as reg:
        reg.push(layout, "v1", "test/evil")
        store = Store(tmp_path / "store")
        image = await store.pull(f"{reg.address}/test/evil:v1", insecure=True)
        with pytest.raises(LayerError, match="below the symlink"):
            await store.rootfs(image)
    assert list(outside.iterdir()) == []
    assert not image.rootfs.exists()


@pytest.fixture(scope="module")
async def app_sandbox(store: Store, images: Images) -> AsyncIterator[capsa.Sandbox]:
    async with await capsa.sandbox().oci(images.app, insecure=True).build() as sb:
        yield sb


async def test_image_config_applies_inside_the_guest(app_sandbox: capsa.Sandbox) -> None:
    agent = await app_sandbox.agent()
    r = await agent.exec("id -u; id -g; pwd; echo $GREETING; cat hello.txt")
    assert r.exit_code == 0
    assert r.stdout.decode().splitlines() == [
        "1000",
        "1000",
        "/home/app",
        "hello from the image",
        "hi",
    ]
    r = await agent.exec("ls /etc; ls /opq")
    assert "gone" not in r.stdout.decode().split() and r.stdout.decode().split()[-1] == "new"
    assert "old" not in r.stdout.decode().split()
    # The entrypoint + cmd is the main process: `sh -c "sleep 3600"` (sh execs the sleep).
    r = await agent.exec("cat /proc/[0-9]*/cmdline")
    assert b"\0sleep\x003600\0" in r.stdout
    assert (await agent.read_file("/home/app/hello.txt")) == b"hi\n"


async def test_writable_layer_is_private_and_main_exit_code(
    store: Store, images: Images, app_sandbox: capsa.Sandbox
) -> None:
    agent = await app_sandbox.agent()
    assert (
        await agent.exec("echo mine > /home/app/private && cat /home/app/private")
    ).exit_code == 0
    other = await capsa.sandbox().oci(images.app, ["exit 7"], insecure=True).build()
    async with other:
        status = await other.wait(60)
    assert status.exit_code == 7  # cmd replaced by args, entrypoint kept: sh -c "exit 7"
    second = await capsa.sandbox().oci(images.app, insecure=True).build()
    async with second:
        r = await (await second.agent()).exec("ls /home/app")
        assert r.stdout.split() == [b"hello.txt"]  # nothing from the first sandbox


def test_cli_pull_ls_rm_prune(tmp_path: Path, images: Images) -> None:
    from click.testing import CliRunner

    from capsa.cli import main

    env = {"CAPSA_OCI_STORE": str(tmp_path / "store")}
    runner = CliRunner()
    pulled = runner.invoke(main, ["image", "pull", "--insecure", images.app], env=env)
    assert pulled.exit_code == 0, pulled.output
    assert images.app_digest in pulled.output
    listed = runner.invoke(main, ["image", "ls"], env=env)
    assert images.app in listed.output and "rootfs built" in listed.output
    assert runner.invoke(main, ["image", "rm", images.app], env=env).exit_code == 0
    assert runner.invoke(main, ["image", "rm", images.app], env=env).exit_code != 0
    assert runner.invoke(main, ["image", "prune"], env=env).exit_code == 0
    store = Store(tmp_path / "store")
    assert not any((store.root / "blobs" / "sha256").iterdir())
    assert not any((store.root / "rootfs").iterdir())
