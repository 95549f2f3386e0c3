import lzma
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

import capsa.images.kernel as kernel_mod
import capsa.images.sandbox as sandbox_mod
from capsa.errors import ImageBuildError
from capsa.guest.init import describe_virtio
from capsa.images import elf
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


def fake_module(depends: str, extra_sections: int = 0) -> bytes:
    """A minimal ELF64 kernel module: a .modinfo section (and a section-name table)."""
    modinfo = f"license=GPL\0depends={depends}\0name=x\0".encode()
    names = b"\0.shstrtab\0.modinfo\0"
    data_off = 64
    names_off, info_off = data_off, data_off + len(names)
    shoff = info_off + len(modinfo)
    header = b"\x7fELF\x02\x01\x01" + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 1)
    sections = bytes(64)  # the null section
    sections += struct.pack("<IIQQQQIIQQ", 1, 3, 0, 0, names_off, len(names), 0, 0, 1, 0)
    sections += struct.pack("<IIQQQQIIQQ", 11, 1, 0, 0, info_off, len(modinfo), 0, 0, 1, 0)
    return header + names + modinfo + sections


def _kernel_tree(
    root: Path, version: str, *, merged_usr: bool, modules: dict[str, str | None]
) -> Path:
    """An unpacked kernel package: xz-compressed modules (name: its depends= value), and
    modules.builtin naming the built-in ones (None)."""
    base = root / ("usr/lib/modules" if merged_usr else "lib/modules") / version
    base.mkdir(parents=True, exist_ok=True)
    for name, depends in modules.items():
        if depends is None:
            with open(base / "modules.builtin", "a") as f:
                f.write(f"kernel/drivers/virtio/{name}.ko\n")
        else:
            path = base / "kernel" / f"{name}.ko.xz"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(lzma.compress(fake_module(depends)))
    return base


@pytest.mark.parametrize("merged_usr", [False, True], ids=["debian12", "debian13"])
def test_modules_are_found_in_either_layout_with_their_dependencies(
    tmp_path: Path, merged_usr: bool
) -> None:
    version = "6.x-cloud-amd64"
    modules = {
        "virtio_mmio": "",
        "virtio_net": "net_failover",
        "net_failover": "failover",
        "failover": "",
        "virtio_console": None,
    }
    _kernel_tree(tmp_path / "raw", version, merged_usr=merged_usr, modules=modules)
    src = kernel_mod._package_modules_dir(tmp_path / "raw", version, Path("k.deb"))
    dest = tmp_path / "out"
    dest.mkdir()
    kernel_mod._copy_modules(src, dest)
    assert (dest / "virtio_mmio.ko").read_bytes() == fake_module("")
    image = KernelImage(tmp_path / "vmlinuz", version, dest)
    order = image.module_load_order(["virtio_net", "virtio_mmio"])
    assert [p.name for p in order] == [
        "failover.ko",
        "net_failover.ko",
        "virtio_net.ko",
        "virtio_mmio.ko",
    ]


def test_a_kernel_without_the_agents_drivers_is_refused(tmp_path: Path) -> None:
    modules: dict[str, str | None] = {"virtio_net": "", "virtio_console": None}
    base = _kernel_tree(tmp_path, "6.x", merged_usr=True, modules=modules)
    with pytest.raises(ImageBuildError, match="virtio_mmio are neither"):
        kernel_mod._copy_modules(base, tmp_path)
    with pytest.raises(ImageBuildError, match="no modules directory"):
        kernel_mod._package_modules_dir(tmp_path / "empty", "6.x", Path("k.deb"))


def test_modinfo_is_read_from_the_elf_and_malformed_files_are_refused() -> None:
    assert elf.modinfo(fake_module("a,b"))["depends"] == ["a,b"]
    with pytest.raises(ImageBuildError, match="not an ELF"):
        elf.modinfo(b"not an elf file at all" * 4)
    truncated = fake_module("a")[:-100]
    with pytest.raises(ImageBuildError, match="outside the file"):
        elf.modinfo(truncated)


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
