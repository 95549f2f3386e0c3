import shutil
import subprocess
from pathlib import Path

import pytest

import capsa.images.sandbox as sandbox_mod
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
