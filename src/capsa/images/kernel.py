"""capsa's default guest kernel: Debian's cloud kernel, fetched with ``apt-get download``.

The package is unpacked once into ``$XDG_CACHE_HOME/capsa/kernels/<version>/``, keeping the
kernel image and only the modules capsa's guests load (with their dependencies), and an
index file names the current version so a warm lookup does no apt call at all.
"""

from __future__ import annotations

import gzip
import lzma
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from capsa._util.host import host_arch
from capsa._util.tools import find_tool
from capsa.errors import ImageBuildError
from capsa.images.cache import Progress, cache_root, locked, no_progress
from capsa.images.elf import modinfo

# Modules capsa's guests may need; dependencies are added from the modules' own metadata.
GUEST_MODULES = (
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "virtio_rng",
    "vmw_vsock_virtio_transport",
    "virtiofs",
    "evdev",
    "button",
    "overlay",
)
# Without these the agent cannot be reached: a kernel must have them, as modules or built in.
REQUIRED_MODULES = ("virtio_mmio", "virtio_console")
_META_PACKAGE = {"x86_64": "linux-image-cloud-amd64", "aarch64": "linux-image-cloud-arm64"}
_DEPS_FILE = "capsa.deps"
_WANTED_FILE = "capsa.wanted"  # the module list the cache was built for
# Bumped when the unpacked layout changes, so caches made by an older capsa are fetched anew
# (format 1 could silently hold no modules for merged-/usr kernel packages).
_CACHE_FORMAT = "format 2"


@dataclass(frozen=True)
class KernelImage:
    """A guest kernel and (optionally) a directory of its modules."""

    path: Path
    version: str
    modules_dir: Path | None = None

    def module_load_order(self, names: Iterable[str], missing_ok: bool = False) -> list[Path]:
        """Module files for ``names`` and their dependencies, each after what it depends on
        (``missing_ok``: skip names this kernel does not have, e.g. x86-only drivers)."""
        if self.modules_dir is None:
            raise ImageBuildError(f"kernel {self.path} has no module directory")
        files, deps = _read_deps(self.modules_dir)
        if missing_ok:
            names = [n for n in names if _module_name(n) in files]
        order: list[str] = []

        def visit(name: str, trail: tuple[str, ...]) -> None:
            if name in order:
                return
            if name in trail:
                raise ImageBuildError(f"module dependency cycle: {' -> '.join(trail)}")
            if name not in files:
                raise ImageBuildError(f"module {name} is not in {self.modules_dir}")
            for dep in deps.get(name, ()):
                visit(dep, (*trail, name))
            order.append(name)

        for n in names:
            visit(_module_name(n), ())
        return [self.modules_dir / files[n] for n in order]


def _module_name(name: str) -> str:
    return name.replace("-", "_")


def _read_deps(modules_dir: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    files: dict[str, str] = {}
    deps: dict[str, list[str]] = {}
    for line in (modules_dir / _DEPS_FILE).read_text().splitlines():
        rel, _, rest = line.partition(":")
        name = _module_name(Path(rel).name.split(".ko")[0])
        files[name] = rel
        deps[name] = [d for d in rest.split() if d]
    return files, deps


def kernel_from_path(path: str | Path) -> KernelImage:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ImageBuildError(f"kernel not found: {p}")
    return KernelImage(p, "custom")


def host_kernel() -> KernelImage | None:
    """The host's own kernel, when it is readable (it brings no modules here)."""
    p = Path("/boot") / f"vmlinuz-{platform.release()}"
    return KernelImage(p, platform.release()) if os.access(p, os.R_OK) else None


def _index_name(arch: str) -> str:
    return "current" if arch == host_arch() else f"current-{arch}"


def cached_kernel(arch: str | None = None) -> KernelImage | None:
    """The default kernel for ``arch`` (default: the host's) if cached (never fetches)."""
    arch = arch or host_arch()
    index = cache_root() / "kernels" / _index_name(arch)
    try:
        version = index.read_text().strip()
    except OSError:
        return None
    root = cache_root() / "kernels" / version
    vmlinuz = root / "vmlinuz"
    if not vmlinuz.is_file() or not (root / "modules" / _DEPS_FILE).is_file():
        return None
    try:
        wanted = (root / "modules" / _WANTED_FILE).read_text().splitlines()
    except OSError:
        wanted = []
    if wanted != _wanted_record():
        return None  # unpacked by a capsa that wanted other modules: fetch again
    return KernelImage(vmlinuz, version, root / "modules")


def default_kernel(progress: Progress = no_progress, arch: str | None = None) -> KernelImage:
    """capsa's guest kernel: ``CAPSA_KERNEL`` if set, else the cached Debian cloud kernel
    for ``arch`` (default: the host's).

    The first call downloads and unpacks the kernel package; later calls only read the cache.
    """
    arch = arch or host_arch()
    override = os.environ.get("CAPSA_KERNEL")
    if override and arch == host_arch():
        return kernel_from_path(override)
    found = cached_kernel(arch)
    if found is not None:
        return found
    with locked("kernels"):
        found = cached_kernel(arch)  # another process may have finished while we waited
        if found is not None:
            return found
        return _fetch_kernel(progress, arch)


def _run(argv: list[str], what: str, cwd: Path | None = None) -> str:
    return _run_bytes(argv, what, cwd).decode(errors="replace")


def _run_bytes(argv: list[str], what: str, cwd: Path | None = None) -> bytes:
    tool = find_tool(argv[0])
    if tool is None:
        raise ImageBuildError(f"{what}: `{argv[0]}` not found (capsa needs Debian's apt tools)")
    proc = subprocess.run([tool, *argv[1:]], cwd=cwd, capture_output=True)
    if proc.returncode != 0:
        stderr = proc.stderr.decode(errors="replace").strip()
        raise ImageBuildError(f"{what} failed: {' '.join(argv)}\n{stderr}")
    return proc.stdout


def debian_arch(arch: str) -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(arch, arch)


def foreign_suffix(arch: str) -> str:
    """``:arm64`` for a package of another architecture (Debian multiarch)."""
    return "" if arch == host_arch() else f":{debian_arch(arch)}"


def kernel_package(arch: str | None = None) -> str:
    """The concrete kernel package the cloud meta package points at."""
    arch = arch or host_arch()
    meta = _META_PACKAGE.get(arch)
    if meta is None:
        raise ImageBuildError(f"no default kernel for architecture {arch}")
    meta += foreign_suffix(arch)
    out = _run(["apt-cache", "depends", meta], f"looking up {meta}")
    m = re.search(r"Depends:\s*(linux-image-[^\s:]+)", out)
    if not m:
        hint = ""
        if foreign_suffix(arch):
            hint = f" (enable it: `sudo dpkg --add-architecture {debian_arch(arch)}`)"
        raise ImageBuildError(
            f"apt knows no package {meta}{hint}: run `sudo apt-get update` and try again"
        )
    return m.group(1) + foreign_suffix(arch)


def _fetch_kernel(progress: Progress, arch: str) -> KernelImage:
    package = kernel_package(arch)
    kernels = cache_root() / "kernels"
    kernels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=kernels, prefix=".fetch-") as tmp:
        work = Path(tmp)
        progress(f"downloading {package}", None)
        _run(["apt-get", "download", package], f"downloading {package}", cwd=work)
        debs = list(work.glob("*.deb"))
        if not debs:
            raise ImageBuildError(f"apt-get download produced no .deb for {package}")
        progress(f"unpacking {debs[0].name}", None)
        version, staged = _unpack_kernel_deb(debs[0], work / "stage")
        final = kernels / version
        if final.exists():
            shutil.rmtree(final)
        staged.rename(final)
    index = _index_name(arch)
    (kernels / f"{index}.tmp").write_text(version + "\n")
    (kernels / f"{index}.tmp").rename(kernels / index)
    progress(f"kernel {version} ready", 1.0)
    found = cached_kernel(arch)
    assert found is not None
    return found


def _unpack_kernel_deb(deb: Path, stage: Path) -> tuple[str, Path]:
    """Extract vmlinuz and the guest modules (plus dependencies) from a kernel .deb."""
    raw = stage / "raw"
    raw.mkdir(parents=True)
    _run(["dpkg-deb", "-x", str(deb), str(raw)], f"unpacking {deb.name}")
    images = sorted((raw / "boot").glob("vmlinuz-*"))
    if not images:
        raise ImageBuildError(f"{deb.name} holds no /boot/vmlinuz-*")
    version = images[0].name.removeprefix("vmlinuz-")
    src_modules = _package_modules_dir(raw, version, deb)
    out = stage / "out"
    (out / "modules").mkdir(parents=True)
    shutil.copy2(images[0], out / "vmlinuz")
    _copy_modules(src_modules, out / "modules")
    shutil.rmtree(raw)
    return version, out


def _package_modules_dir(raw: Path, version: str, deb: Path) -> Path:
    """Where an unpacked kernel package keeps its modules: ``/lib/modules`` until Debian 12,
    ``/usr/lib/modules`` from Debian 13 on (merged /usr)."""
    for candidate in (raw / "usr" / "lib" / "modules" / version, raw / "lib" / "modules" / version):
        if (candidate / "modules.builtin").is_file() or candidate.is_dir():
            return candidate
    raise ImageBuildError(f"{deb.name} holds no modules directory for {version}")


def _builtin_modules(src: Path) -> set[str]:
    """Names of the modules compiled into the kernel (``modules.builtin``)."""
    try:
        text = (src / "modules.builtin").read_text()
    except OSError:
        return set()
    return {_module_name(Path(line).name.split(".ko")[0]) for line in text.split() if line}


def _wanted_record() -> list[str]:
    return [_CACHE_FORMAT, *sorted(GUEST_MODULES)]


def _index_modules(src: Path) -> dict[str, Path]:
    return {
        _module_name(p.name.split(".ko")[0]): p
        for p in src.rglob("*.ko*")
        if re.search(r"\.ko(\.xz|\.zst|\.gz)?$", p.name)
    }


def _module_depends(elf: bytes) -> list[str]:
    """The modules a module needs loaded first (its ``depends=`` entry)."""
    depends = ",".join(modinfo(elf).get("depends", []))
    return [_module_name(d) for d in depends.split(",") if d]


def _copy_modules(src: Path, dest: Path) -> None:
    available = _index_modules(src)
    builtin = _builtin_modules(src)
    absent = [m for m in REQUIRED_MODULES if m not in available and m not in builtin]
    if absent:
        raise ImageBuildError(
            f"kernel modules {', '.join(absent)} are neither in {src} nor built into the kernel"
        )
    wanted = [m for m in GUEST_MODULES if m in available]
    lines: list[str] = []
    seen: set[str] = set()
    while wanted:
        name = wanted.pop()
        if name in seen:
            continue
        seen.add(name)
        rel = Path(name + ".ko")
        elf = _decompressed_module(available[name])
        (dest / rel).write_bytes(elf)
        deps = _module_depends(elf)
        lines.append(f"{rel}: {' '.join(deps)}")
        wanted.extend(d for d in deps if d not in seen)
    (dest / _DEPS_FILE).write_text("\n".join(sorted(lines)) + "\n")
    (dest / _WANTED_FILE).write_text("\n".join(_wanted_record()) + "\n")


def _decompressed_module(src: Path) -> bytes:
    # Guests load modules with a bare init_module, which wants the plain ELF.
    if src.name.endswith(".ko.xz"):
        return lzma.decompress(src.read_bytes())
    if src.name.endswith(".ko.zst"):
        return _run_bytes(["zstd", "-dc", str(src)], f"unpacking {src.name}")
    if src.name.endswith(".ko.gz"):
        return gzip.decompress(src.read_bytes())
    return src.read_bytes()


def clean_kernels() -> int:
    """Remove every cached kernel; returns the bytes freed."""
    root = cache_root() / "kernels"
    freed = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.exists() else 0
    with locked("kernels"):
        shutil.rmtree(root, ignore_errors=True)
    return freed
