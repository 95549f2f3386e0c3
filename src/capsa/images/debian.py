"""The default sandbox userland: a Debian root file system built locally from the
distribution's packages with ``mmdebstrap``, cached as a read-only ext2 image.

The sandbox boots capsa's initramfs as always (its init and agent keep their own
interpreter); init mounts this image read-only under a private writable layer and runs
every command in it, as for OCI images. ``pip install`` works as typed: a sandbox is
disposable, so the image drops Debian's PEP 668 marker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from capsa._util.host import host_arch
from capsa._util.tools import find_tool
from capsa.errors import ImageBuildError, InvalidConfig
from capsa.images.cache import Progress, cache_root, locked, no_progress

FORMAT = 1
SUITE = "trixie"  # Debian stable
MIRROR = "http://deb.debian.org/debian"
PACKAGES = (
    "bash",
    "coreutils",
    "python3",
    "python3-pip",
    "python3-venv",
    "git",
    "curl",
    "ca-certificates",
    "procps",
    "less",
    "iproute2",
)
DEBIAN_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
_PACKAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
# Run inside the new root before it is packed: pip installs as typed (no PEP 668 refusal),
# and no stale apt lists or caches ship in the image.
_CUSTOMIZE = (
    'rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED; '
    'rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin; '
    "printf 'sandbox\\n' > \"$1\"/etc/hostname"
)
BUILD_TIMEOUT = 1800.0

log = logging.getLogger("capsa.image")


@dataclass(frozen=True)
class DebianImage:
    """A Debian root file system image: ``path`` is a read-only ext2 file."""

    path: Path
    suite: str
    arch: str
    packages: tuple[str, ...]


def check_packages(packages: Sequence[str]) -> tuple[str, ...]:
    """Package names as given, checked (a typo is caught here, not deep in a build)."""
    names = []
    for name in packages:
        if not isinstance(name, str) or not _PACKAGE_NAME.match(name):
            raise InvalidConfig(f"{name!r} is not a Debian package name")
        names.append(name)
    return tuple(names)


def image_key(suite: str, arch: str, packages: Sequence[str], mirror: str) -> str:
    identity = {
        "format": FORMAT,
        "suite": suite,
        "arch": arch,
        "packages": sorted({*PACKAGES, *packages}),
        "mirror": mirror,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def mirror() -> str:
    return os.environ.get("CAPSA_DEBIAN_MIRROR") or MIRROR


def debian_image(
    packages: Sequence[str] = (),
    *,
    arch: str | None = None,
    suite: str = SUITE,
    progress: Progress = no_progress,
) -> DebianImage:
    """The Debian image with the default packages plus ``packages``, built on first use."""
    arch = arch or host_arch()
    if arch not in DEBIAN_ARCH:
        raise InvalidConfig(f"no Debian image for architecture {arch!r}")
    extra = check_packages(packages)
    source = mirror()
    key = image_key(suite, arch, extra, source)
    wanted = sorted({*PACKAGES, *extra})
    name = f"debian-{suite}-{DEBIAN_ARCH[arch]}-{key}.ext2"
    out = cache_root() / "images" / name
    if out.is_file():  # published by an atomic rename: no lock needed to use it
        return DebianImage(out, suite, arch, tuple(wanted))
    with locked(f"debian-{key}") as root:
        images = root / "images"
        out = images / name
        if not out.is_file():
            images.mkdir(parents=True, exist_ok=True)
            what = f"building the Debian {suite} image ({len(wanted)} packages; first use)"
            log.info("%s", what)
            progress(what, None)
            _build(out, suite=suite, arch=arch, packages=wanted, source=source)
            progress(f"built the Debian {suite} image", 1.0)
    return DebianImage(out, suite, arch, tuple(wanted))


def _build(out: Path, *, suite: str, arch: str, packages: list[str], source: str) -> None:
    tool = find_tool("mmdebstrap")
    if tool is None:
        raise ImageBuildError(
            "building the Debian image needs mmdebstrap and genext2fs: "
            "`sudo apt-get install mmdebstrap genext2fs` (or use .image('minimal'))"
        )
    if find_tool("genext2fs") is None:
        raise ImageBuildError("building the Debian image needs `sudo apt-get install genext2fs`")
    fd, scratch = tempfile.mkstemp(prefix=out.name + ".", suffix=".ext2", dir=out.parent)
    os.close(fd)
    argv = [
        tool,
        "--variant=apt",
        f"--architectures={DEBIAN_ARCH[arch]}",
        f"--include={','.join(packages)}",
        "--format=ext2",
        f"--customize-hook={_CUSTOMIZE}",
        # The image's own apt points at the same mirror, so `apt-get install` works inside.
        suite,
        scratch,
        source,
    ]
    if os.geteuid() != 0:
        argv.insert(1, "--mode=unshare")
    try:
        # A session of its own: on failure mmdebstrap signals its whole process group,
        # which would otherwise be ours.
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
            start_new_session=True,
        )
        if done.returncode != 0:
            raise ImageBuildError(_failure(done.stderr, suite, packages))
        os.chmod(scratch, 0o644)
        os.replace(scratch, out)
    except subprocess.TimeoutExpired:
        raise ImageBuildError(
            f"building the Debian {suite} image took over {BUILD_TIMEOUT:.0f}s"
        ) from None
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)


def _failure(stderr: str, suite: str, packages: list[str]) -> str:
    """What went wrong, naming the package or step: apt's own error lines when there are
    any, else mmdebstrap's last words."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    missing = [
        p for p in packages if re.search(rf"Unable to locate package {re.escape(p)}\b", stderr)
    ]
    if missing:
        return f"building the Debian {suite} image: no package named {', '.join(missing)}"
    errors = [line for line in lines if line.startswith(("E:", "W: Failed", "mmdebstrap: error"))]
    detail = "; ".join((errors or lines)[-4:]) or "no output"
    return f"building the Debian {suite} image failed: {detail}"


def debian_images() -> list[Path]:
    images = cache_root() / "images"
    return sorted(images.glob("debian-*.ext2")) if images.is_dir() else []


def remove_debian_images() -> int:
    removed = 0
    for path in debian_images():
        path.unlink(missing_ok=True)
        removed += 1
    shutil.rmtree(cache_root() / "images" / "debian-scratch", ignore_errors=True)
    return removed
