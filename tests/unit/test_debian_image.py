"""The Debian userland's build inputs and errors (no network but this machine's loopback)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import capsa
from capsa._util.tools import find_tool
from capsa.images import debian
from capsa.images.debian import check_packages, debian_image, image_key

# What mmdebstrap 1.3.5 printed for a package apt does not know (trimmed).
MISSING_PACKAGE_OUTPUT = """\
I: installing remaining packages inside the chroot...
Reading package lists...
Building dependency tree...
E: Unable to locate package no-such-package-capsa
E: setup failed: E: apt-get ... --yes install bash no-such-package-capsa failed
W: creating tarball failed: E: invalid number of blocks: -1
E: mmdebstrap failed to run
"""


def test_package_names_are_checked_before_any_build() -> None:
    assert check_packages(["numpy", "python3-numpy", "g++", "libc6.1"]) == (
        "numpy",
        "python3-numpy",
        "g++",
        "libc6.1",
    )
    for bad in ("Numpy", "a b", "-x", "../etc", "x;rm", ""):
        with pytest.raises(capsa.InvalidConfig, match="not a Debian package name"):
            check_packages([bad])
    with pytest.raises(capsa.InvalidConfig, match="not a Debian package name"):
        capsa.sandbox().packages("ok", "no spaces")


def test_image_key_follows_every_input() -> None:
    base = image_key("trixie", "x86_64", [], "http://m/")
    assert base == image_key("trixie", "x86_64", [], "http://m/")
    assert image_key("trixie", "x86_64", ["git"], "http://m/") == base  # already a default
    others = {
        image_key("trixie", "x86_64", ["numpy"], "http://m/"),
        image_key("bookworm", "x86_64", [], "http://m/"),
        image_key("trixie", "aarch64", [], "http://m/"),
        image_key("trixie", "x86_64", [], "http://other/"),
    }
    assert base not in others and len(others) == 4


def test_image_choice_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(capsa.InvalidConfig, match="image 'ubuntu' is not one of"):
        capsa.sandbox().image("ubuntu")
    monkeypatch.setenv("CAPSA_SANDBOX_IMAGE", "fedora")
    with pytest.raises(capsa.InvalidConfig, match="CAPSA_SANDBOX_IMAGE='fedora'"):
        capsa.sandbox()
    monkeypatch.delenv("CAPSA_SANDBOX_IMAGE")
    assert capsa.sandbox()._image == "debian"  # the default


def test_a_missing_package_is_named() -> None:
    message = debian._failure(MISSING_PACKAGE_OUTPUT, "trixie", ["bash", "no-such-package-capsa"])
    assert message == "building the Debian trixie image: no package named no-such-package-capsa"


@pytest.fixture
def dead_mirror() -> Iterator[str]:
    """A 'mirror' on loopback that has nothing."""

    class Nothing(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Nothing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/debian"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(find_tool("mmdebstrap") is None, reason="mmdebstrap is not installed")
def test_a_failed_build_says_which_step_and_leaves_nothing(
    dead_mirror: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CAPSA_DEBIAN_MIRROR", dead_mirror)
    with pytest.raises(capsa.ImageBuildError, match=r"building the Debian trixie image failed: .*"):
        debian_image()
    images = tmp_path / "capsa" / "images"
    assert not images.exists() or list(images.iterdir()) == []
