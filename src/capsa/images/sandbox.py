"""The sandbox initramfs: busybox, kernel modules, a trimmed copy of the host's Python, and
capsa's guest code (init + agent), built once per set of inputs and cached.

Layout inside the image:
  /init                               Python script: starts capsa_guest.init as PID 1
  /bin/busybox + applet links         the userland
  /usr/lib/capsa/python/bin/python3   the host interpreter binary
  /usr/lib/capsa/python/lib/python3.11/   only the stdlib modules the guest imports (.pyc),
                                      lib-dynload/ extensions, and capsa_guest/
  /lib/x86_64-linux-gnu, /lib64       the shared libraries they link against
  /lib/modules/*.ko, /etc/capsa/modules   drivers, listed in load order
"""

from __future__ import annotations

import hashlib
import json
import os
import py_compile
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import capsa.guest
from capsa._util.host import host_arch
from capsa.errors import ImageBuildError
from capsa.images.cache import Progress, cache_root, locked, no_progress
from capsa.images.cpio import CpioWriter
from capsa.images.kernel import KernelImage, default_kernel, foreign_suffix
from capsa.images.shell import find_static_busybox

FORMAT = 4
PRUNE_AFTER = 24 * 3600  # seconds an image unused by any boot stays in the cache
# Driver groups: "base" is always loaded; the others only when the guest has a virtio
# device of that id (loading modules under emulation costs boot time).
MODULE_GROUPS: dict[str, tuple[str, ...]] = {
    "base": ("virtio_mmio", "virtio_console", "evdev", "button"),
    "1": ("virtio_net",),
    "2": ("virtio_blk",),
    "4": ("virtio_rng",),
    "19": ("vmw_vsock_virtio_transport",),
    "26": ("virtiofs",),
    "oci": ("overlay",),  # loaded by init when a container root is set up
}
SANDBOX_MODULES = tuple(m for group in MODULE_GROUPS.values() for m in group)
# Modules the guest code imports lazily (after the agent's hello), and modules small
# guest-side Python helpers commonly need (tests and users run them in the sandbox).
EXTRA_STDLIB = ("subprocess", "socket", "selectors", "base64", "argparse", "encodings.idna", "tty")
GUEST_PYTHON = "/usr/lib/capsa/python"
_VER = f"python{sys.version_info.major}.{sys.version_info.minor}"

INIT_SCRIPT = f"""#!{GUEST_PYTHON}/bin/python3 -ISB
from capsa_guest.init import main
main()
"""

UDHCPC_SCRIPT = """#!/bin/sh
# busybox udhcpc hook: apply the lease.
case "$1" in
  deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    # Name servers first: once the address shows, resolving works. Rewritten in place
    # (containers bind-mount the file) in one write, and only when it changes.
    conf=""
    for d in $dns; do conf="${conf}nameserver $d
"; done
    printf %s "$conf" | cmp -s - /etc/resolv.conf || printf %s "$conf" > /etc/resolv.conf
    # The default route before the address (onlink: it needs no address yet), so a
    # command that sees the address finds the route too.
    ip addr flush dev "$interface"
    [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
    ip link set "$interface" up
    for r in $router; do
      ip route replace default via "$r" dev "$interface" onlink; break
    done
    ip addr add "$ip/${mask:-24}" dev "$interface"
    ;;
esac
exit 0
"""


@dataclass(frozen=True)
class SandboxImage:
    kernel: Path
    initrd: Path
    kernel_version: str
    key: str

    @property
    def size(self) -> int:
        return self.initrd.stat().st_size


def _guest_sources() -> list[Path]:
    return sorted(Path(capsa.guest.__file__).parent.glob("*.py"))


def _stat_token(path: Path) -> str:
    st = path.stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


FOREIGN_PYTHON_PACKAGES = (
    f"{_VER}-minimal",
    f"lib{_VER}-minimal",
    f"lib{_VER}-stdlib",
    "libc6",
    "zlib1g",
    "libexpat1",
    "libffi8",
)


def _libdir(arch: str) -> str:
    return f"/lib/{arch}-linux-gnu"


@cache
def guest_python(arch: str | None = None) -> tuple[Path, Path]:
    """The interpreter the sandbox image ships and its stdlib directory: the host's own for
    the host's architecture, else Debian's for ``arch`` (the host's version: the guest code
    is byte-compiled here)."""
    if arch is not None and arch != host_arch():
        root = _foreign_python(arch)
        return root / "usr" / "bin" / _VER, root / "usr" / "lib" / _VER
    chosen = os.environ.get("CAPSA_GUEST_PYTHON")
    if not chosen:
        exe = Path(os.path.realpath(sys.executable))
        return exe, Path(sysconfig.get_paths()["stdlib"])
    exe = Path(os.path.realpath(chosen))
    probe = "import sysconfig; print(sysconfig.get_paths()['stdlib'])"
    out = subprocess.run([str(exe), "-I", "-S", "-c", probe], capture_output=True, text=True)
    if out.returncode != 0:
        raise ImageBuildError(f"CAPSA_GUEST_PYTHON={chosen} does not run: {out.stderr.strip()}")
    return exe, Path(out.stdout.strip())


def _foreign_python(arch: str) -> Path:
    """Debian's Python and the C libraries it needs, for ``arch``, unpacked once."""
    root = cache_root() / "python" / arch
    if (root / ".complete").exists():
        return root
    with locked("python"), tempfile.TemporaryDirectory() as tmp:
        if (root / ".complete").exists():
            return root
        packages = [p + foreign_suffix(arch) for p in FOREIGN_PYTHON_PACKAGES]
        proc = subprocess.run(
            ["apt-get", "download", *packages], cwd=tmp, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise ImageBuildError(f"fetching {arch} Python failed: {proc.stderr.strip()}")
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        for deb in sorted(Path(tmp).glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        (root / ".complete").write_text("\n".join(sorted(p.name for p in Path(tmp).glob("*.deb"))))
    return root


def _needed(binary: Path) -> list[str]:
    """DT_NEEDED entries of an ELF file of any architecture (readelf reads them all)."""
    out = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def _foreign_libs(binary: Path, root: Path, arch: str) -> set[Path]:
    """The shared libraries ``binary`` needs, found in the unpacked packages, transitively."""
    dirs = [
        root / "lib" / f"{arch}-linux-gnu",
        root / "usr" / "lib" / f"{arch}-linux-gnu",
        root / "lib",
    ]
    found: set[Path] = set()
    todo = [binary]
    while todo:
        for name in _needed(todo.pop()):
            path = next((d / name for d in dirs if (d / name).exists()), None)
            if path is not None and path not in found:
                found.add(path)
                todo.append(path)
    found.add(_foreign_loader(root, arch))
    return found


def _foreign_loader(root: Path, arch: str) -> Path:
    """The dynamic loader among unpacked packages: in /lib until Debian 12, in /usr/lib (and
    the multiarch directory) from Debian 13 on."""
    name = f"ld-linux-{arch.replace('_', '-')}.so.1"
    for lib in (root / "lib", root / "usr" / "lib"):
        for directory in (lib, lib / f"{arch}-linux-gnu"):
            if (directory / name).exists():
                return directory / name
    raise ImageBuildError(f"the unpacked {arch} libc has no {name}")


def image_key(kernel: KernelImage, arch: str | None = None) -> str:
    """A digest of every input: rebuild exactly when one of them changes."""
    arch = arch or host_arch()
    exe, stdlib = guest_python(arch)
    h = hashlib.sha256(f"format {FORMAT}\n".encode())
    for src in [*_guest_sources(), Path(__file__)]:
        h.update(src.name.encode() + b"\0" + src.read_bytes())
    tokens = [
        _stat_token(exe),
        _stat_token(stdlib / "os.py"),
        _stat_token(find_static_busybox(arch)),
        kernel.version,
        arch,
        *(_stat_token(m) for m in kernel.module_load_order(SANDBOX_MODULES, missing_ok=True)),
        repr(EXTRA_STDLIB),
        INIT_SCRIPT,
        UDHCPC_SCRIPT,
    ]
    h.update("\n".join(tokens).encode())
    return h.hexdigest()[:20]


def sandbox_image(
    kernel: KernelImage | None = None, progress: Progress = no_progress, arch: str | None = None
) -> SandboxImage:
    """The cached sandbox image for ``kernel`` (default: capsa's for ``arch``, by default
    the host's), built if missing."""
    arch = arch or host_arch()
    kernel = kernel or default_kernel(progress, arch=arch)
    key = image_key(kernel, arch)
    out = cache_root() / "images" / f"sandbox-{key}.cpio"
    with locked("images"):
        if not out.exists():
            _build(kernel, out, progress, arch)
        else:
            mark_used(out)
    return SandboxImage(kernel.path, out, kernel.version, key)


def mark_used(path: Path) -> None:
    """Record a use in the access time (not to be pruned as superseded for a while); the
    modification time stays, as templates made from the image are keyed by it."""
    st = path.stat()
    if time.time() - st.st_atime > 3600:
        os.utime(path, ns=(time.time_ns(), st.st_mtime_ns))


def _guest_module_set(guest_dir: Path) -> list[str]:
    """The modules the guest code loads, found by importing it in a clean interpreter."""
    probe = (
        "import sys\n"
        f"sys.path.insert(0, {str(guest_dir)!r})\n"
        "import capsa_guest.init\n"
        f"for m in {EXTRA_STDLIB!r}: __import__(m)\n"
        "import encodings.utf_8, encodings.latin_1, encodings.ascii, encodings.aliases\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageBuildError(f"the guest code does not import on this Python:\n{proc.stderr}")
    return proc.stdout.split()


def _shared_libs(binary: Path) -> list[Path]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
    libs = []
    for line in out.splitlines():
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def _build(kernel: KernelImage, out: Path, progress: Progress, arch: str) -> None:
    started = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="capsa-image-") as tmp:
        root = Path(tmp) / "root"
        progress("collecting the guest's Python runtime", 0.1)
        _stage_python(root, arch)
        progress("adding busybox and kernel modules", 0.5)
        _stage_userland(root, kernel, arch)
        progress("writing the initramfs", 0.8)
        part = out.with_name(out.name + f".{os.getpid()}.part")
        with open(part, "wb") as f:
            w = CpioWriter(f)
            w.tree(root)
            w.char_device("dev/console", 5, 1)
            w.char_device("dev/null", 1, 3, mode=0o666)
            # Python seeds its hash randomization before init can mount devtmpfs.
            w.char_device("dev/urandom", 1, 9, mode=0o666)
            w.close()
        part.rename(out)
    meta = {"kernel": kernel.version, "built": time.time(), "seconds": time.monotonic() - started}
    out.with_suffix(".json").write_text(json.dumps(meta))
    _prune_superseded(out, kernel.version)
    progress(f"sandbox image ready ({out.stat().st_size >> 20} MiB)", 1.0)


def _stage_python(root: Path, arch: str) -> None:
    foreign = arch != host_arch()
    exe, stdlib = guest_python(arch)
    guest_stdlib = root / GUEST_PYTHON.lstrip("/") / "lib" / _VER
    dynload_dest = guest_stdlib / "lib-dynload"
    dynload_dest.mkdir(parents=True)
    (root / GUEST_PYTHON.lstrip("/") / "bin").mkdir(parents=True)
    shutil.copy2(exe, root / GUEST_PYTHON.lstrip("/") / "bin" / "python3")
    package_root = _foreign_python(arch) if foreign else None

    def needs(binary: Path) -> set[Path]:
        if package_root is not None:
            return _foreign_libs(binary, package_root, arch)
        return set(_shared_libs(binary))

    libs = needs(exe)

    pkg = guest_stdlib / "capsa_guest"
    pkg.mkdir()
    for src in _guest_sources():
        py_compile.compile(str(src), cfile=str(pkg / (src.stem + ".pyc")), doraise=True)

    for name in _guest_module_set(guest_stdlib):
        # A foreign interpreter has other built-in modules: look for every one there.
        if name.startswith("capsa_guest") or (not foreign and name in sys.builtin_module_names):
            continue
        spec_file = _module_file(name, stdlib)
        if spec_file is None:
            continue
        rel = spec_file.relative_to(stdlib)
        dest = guest_stdlib / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if spec_file.suffix == ".py":
            # Sourceless .pyc next to where the .py would be: importable without the source.
            py_compile.compile(str(spec_file), cfile=str(dest.with_suffix(".pyc")), doraise=True)
        else:
            shutil.copy2(spec_file, dest)
            libs.update(needs(spec_file))
    # Python finds its prefix through this landmark (it accepts the compiled form).
    if not (guest_stdlib / "os.pyc").exists():
        py_compile.compile(str(stdlib / "os.py"), cfile=str(guest_stdlib / "os.pyc"))

    loader_dir = "lib64" if arch == "x86_64" else "lib"  # where PT_INTERP points
    for lib in libs:
        real = Path(os.path.realpath(lib))
        dest_dir = root / (loader_dir if lib.name.startswith("ld-linux") else _libdir(arch)[1:])
        dest_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(real, dest_dir / lib.name)
        _strip(dest_dir / lib.name)
    _strip(root / GUEST_PYTHON.lstrip("/") / "bin" / "python3")


def _strip(binary: Path) -> None:
    """Drop debug symbols: a smaller initramfs is a faster boot under emulation."""
    if shutil.which("strip") is not None:
        subprocess.run(["strip", "--strip-unneeded", str(binary)], capture_output=True)


def _module_file(name: str, stdlib: Path) -> Path | None:
    """Where ``name`` lives in the host stdlib (None for builtins/frozen)."""
    parts = name.split(".")
    base = stdlib.joinpath(*parts)
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.exists():
            return candidate
    dynload = stdlib / "lib-dynload"
    matches = sorted(dynload.glob(f"{name}.cpython-*.so")) + sorted(dynload.glob(f"{name}.so"))
    return matches[0] if matches else None


GUEST_DIRECTORIES = [
    "bin",
    "sbin",
    "usr/bin",
    "usr/sbin",
    "dev",
    "proc",
    "sys",
    "tmp",
    "run",
    "root",
    "mnt",
    "etc/capsa",
    "lib/modules",
    "var/tmp",
]


def _stage_userland(root: Path, kernel: KernelImage, arch: str) -> None:
    for d in GUEST_DIRECTORIES:
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(find_static_busybox(arch), root / "bin" / "busybox")
    # The applet list comes from the host's busybox (the guest's may not run here).
    applets = subprocess.run(
        [str(find_static_busybox()), "--list-full"], capture_output=True, text=True
    )
    for applet in applets.stdout.split():
        link = root / applet
        if not link.exists() and not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
    lines = []
    placed: set[Path] = set()
    for group, names in MODULE_GROUPS.items():
        for m in kernel.module_load_order(names, missing_ok=True):
            if m not in placed:
                placed.add(m)
                shutil.copy2(m, root / "lib" / "modules" / m.name)
            lines.append(f"{group} /lib/modules/{m.name}\n")
    (root / "etc" / "capsa" / "modules").write_text("".join(lines))
    (root / "etc" / "capsa" / "udhcpc.sh").write_text(UDHCPC_SCRIPT)
    (root / "etc" / "capsa" / "udhcpc.sh").chmod(0o755)
    (root / "etc" / "hostname").write_text("sandbox\n")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\ntty:x:5:\n")
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    (root / "init").write_text(INIT_SCRIPT)
    (root / "init").chmod(0o755)


def _prune_superseded(current: Path, kernel_version: str) -> None:
    """Drop images this one replaces (same kernel, older inputs) once nothing has used them
    for a day: the cache must not grow, and another capsa on this machine (a second
    installation, a checkout) may still be booting one of them."""
    unused_since = time.time() - PRUNE_AFTER
    for meta_file in current.parent.glob("sandbox-*.json"):
        img = meta_file.with_suffix(".cpio")
        if img == current:
            continue
        try:
            recent = img.exists() and max(img.stat().st_atime, img.stat().st_mtime) > unused_since
            if not recent and json.loads(meta_file.read_text()).get("kernel") == kernel_version:
                img.unlink(missing_ok=True)
                meta_file.unlink(missing_ok=True)
        except (OSError, ValueError):
            continue


def image_info() -> list[dict[str, object]]:
    """The cached sandbox images, newest first."""
    images = sorted(
        (cache_root() / "images").glob("sandbox-*.cpio"), key=lambda p: -p.stat().st_mtime
    )
    info = []
    for img in images:
        meta_file = img.with_suffix(".json")
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        info.append({"path": str(img), "size": img.stat().st_size, **meta})
    return info


def clean_images() -> int:
    """Remove every cached image; returns the bytes freed."""
    root = cache_root() / "images"
    if not root.exists():
        return 0
    with locked("images"):
        freed = sum(p.stat().st_size for p in root.iterdir() if p.is_file())
        shutil.rmtree(root)
    return freed
