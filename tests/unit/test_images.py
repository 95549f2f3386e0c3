import lzma
import shutil
import subprocess
from pathlib import Path

import pytest

import capsa.images.kernel as kernel_mod
import capsa.images.sandbox as sandbox_mod
from capsa.errors import ImageBuildError
from capsa.guest.init import describe_virtio
from capsa.images.cpio import CpioWriter
from capsa.images.kernel import KernelImage


def test_cpio_archive_unpacks_with_gnu_cpio(tmp_path: Path) -> None:
    if shutil.which("cpio") is None:
        pytest.skip("cpio not installed")
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"hello" * 1000)
    archive = tmp_path / "a.cpio"
    with open(archive, "wb") as f:
        w = CpioWriter(f)
        w.tree(src)
        w.symlink("link", "d/f")
        w.file_bytes("odd", b"xyz", mode=0o600)
        w.close()
    out = tmp_path / "out"
    out.mkdir()
    with open(archive, "rb") as f:
        subprocess.run(["cpio", "-idm", "--quiet"], stdin=f, cwd=out, check=True)
    assert (out / "d" / "f").read_bytes() == b"hello" * 1000
    assert (out / "link").readlink() == Path("d/f")
    assert (out / "odd").read_bytes() == b"xyz" and (out / "odd").stat().st_mode & 0o777 == 0o600


def test_duplicate_entries_are_refused(tmp_path: Path) -> None:
    with open(tmp_path / "a.cpio", "wb") as f:
        w = CpioWriter(f)
        w.directory("x")
        with pytest.raises(ValueError):
            w.directory("/x")


def test_image_key_changes_exactly_when_guest_code_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    guest = tmp_path / "guest"
    guest.mkdir()
    (guest / "agent.py").write_text("x = 1\n")
    monkeypatch.setattr(sandbox_mod, "_guest_sources", lambda: sorted(guest.glob("*.py")))
    monkeypatch.setattr(sandbox_mod, "SANDBOX_MODULES", ())
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "capsa.deps").write_text("")
    kernel = KernelImage(tmp_path / "vmlinuz", "1.0-test", mods)
    first = sandbox_mod.image_key(kernel)
    assert sandbox_mod.image_key(kernel) == first
    (guest / "agent.py").write_text("x = 2\n")
    assert sandbox_mod.image_key(kernel) != first


def _kernel_tree(root: Path, version: str, merged_usr: bool, modules: dict[str, str]) -> Path:
    """An unpacked kernel package: compressed modules, and modules.builtin naming the rest."""
    base = root / ("usr/lib/modules" if merged_usr else "lib/modules") / version
    for name, where in modules.items():
        if where == "builtin":
            with open(base / "modules.builtin", "a") as f:
                f.write(f"kernel/drivers/virtio/{name}.ko\n")
        else:
            path = base / "kernel" / f"{name}.ko.xz"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(lzma.compress(f"ELF {name}".encode()))
    return base


@pytest.mark.parametrize("merged_usr", [False, True], ids=["debian12", "debian13"])
def test_modules_are_found_in_either_layout_and_decompressed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, merged_usr: bool
) -> None:
    monkeypatch.setattr(kernel_mod, "_modinfo_depends", lambda path: [])
    version = "6.x-cloud-amd64"
    (tmp_path / "raw" / ("usr/lib/modules" if merged_usr else "lib/modules") / version).mkdir(
        parents=True
    )
    modules = {"virtio_mmio": "module", "virtio_net": "module", "virtio_console": "builtin"}
    _kernel_tree(tmp_path / "raw", version, merged_usr=merged_usr, modules=modules)
    src = kernel_mod._package_modules_dir(tmp_path / "raw", version, Path("k.deb"))
    dest = tmp_path / "out"
    dest.mkdir()
    kernel_mod._copy_modules(src, dest)
    assert (dest / "virtio_mmio.ko").read_bytes() == b"ELF virtio_mmio"
    assert (dest / "virtio_net.ko").read_bytes() == b"ELF virtio_net"
    image = KernelImage(tmp_path / "vmlinuz", version, dest)
    assert image.module_load_order(["virtio_mmio"]) == [dest / "virtio_mmio.ko"]


def test_a_kernel_without_the_agents_drivers_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernel_mod, "_modinfo_depends", lambda path: [])
    base = tmp_path / "usr/lib/modules/6.x"
    base.mkdir(parents=True)
    modules = {"virtio_net": "module", "virtio_console": "builtin"}
    _kernel_tree(tmp_path, "6.x", merged_usr=True, modules=modules)
    with pytest.raises(ImageBuildError, match="virtio_mmio are neither"):
        kernel_mod._copy_modules(base, tmp_path)
    with pytest.raises(ImageBuildError, match="no modules directory"):
        kernel_mod._package_modules_dir(tmp_path / "empty", "6.x", Path("k.deb"))


def test_a_missing_agent_port_names_the_devices_seen(tmp_path: Path) -> None:
    devices = tmp_path / "bus/virtio/devices"
    for dev, ident in (("virtio0", "0x0004"), ("virtio1", "0x0003")):
        (devices / dev).mkdir(parents=True)
        (devices / dev / "device").write_text(ident + "\n")
    port = tmp_path / "class/virtio-ports/vport1p1"
    port.mkdir(parents=True)
    (port / "name").write_text("org.other\n")
    assert describe_virtio(str(tmp_path)) == (
        "virtio devices: virtio0=rng, virtio1=console; virtio-serial ports: vport1p1=org.other"
    )
    assert "virtio devices: none" in describe_virtio(str(tmp_path / "nothing"))
    assert "virtio_mmio" in describe_virtio(str(tmp_path / "nothing"))
