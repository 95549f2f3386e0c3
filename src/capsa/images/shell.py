"""A busybox shell initramfs: a root shell on the serial console, for plain VMs and tests."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from capsa._util.host import host_arch
from capsa.errors import ImageBuildError
from capsa.images.cache import cache_root, locked
from capsa.images.cpio import CpioWriter
from capsa.images.kernel import KernelImage, foreign_suffix

MARKER = "CAPSA-SHELL-READY"
SHELL_MODULES = ("virtio_mmio", "virtio_pci", "virtio_blk", "evdev", "button")

DEFAULT_INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /etc/modules); do insmod $m; done
# Answer the ACPI power button the way a distribution would: power off.
for e in /dev/input/event*; do [ -e "$e" ] && (head -c 1 $e >/dev/null; poweroff -f) & done
echo {MARKER}
exec setsid cttyhack sh
"""


def find_static_busybox(arch: str | None = None) -> Path:
    """A static busybox for guests of ``arch``: the host's own for the host's architecture,
    else Debian's busybox-static for that architecture, fetched once into the cache."""
    if arch is not None and arch != host_arch():
        return _foreign_busybox(arch)
    for candidate in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        if candidate.is_file() and _is_static_elf(candidate):
            return candidate
    raise ImageBuildError(
        "a static busybox is needed for guest images: `sudo apt-get install busybox-static`"
    )


def _foreign_busybox(arch: str) -> Path:
    out = cache_root() / "busybox" / arch / "busybox"
    if out.is_file():
        return out
    package = "busybox-static" + foreign_suffix(arch)
    with locked("busybox"), tempfile.TemporaryDirectory() as tmp:
        if out.is_file():
            return out
        for argv in (["apt-get", "download", package], ["sh", "-c", "dpkg-deb -x *.deb x"]):
            proc = subprocess.run(argv, cwd=tmp, capture_output=True, text=True)
            if proc.returncode != 0:
                raise ImageBuildError(f"fetching {package} failed: {proc.stderr.strip()}")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(_unpacked_binary(Path(tmp) / "x", "busybox", package), out)
    return out


def _unpacked_binary(root: Path, name: str, package: str) -> Path:
    """``name`` in an unpacked package: /bin until Debian 12, /usr/bin from Debian 13 on."""
    for directory in ("usr/bin", "bin"):
        candidate = root / directory / name
        if candidate.is_file():
            return candidate
    raise ImageBuildError(f"{package} holds no {name} in /bin or /usr/bin")


def _is_static_elf(path: Path) -> bool:
    """True when the ELF file has no PT_INTERP program header (no dynamic loader)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    phoff = int.from_bytes(data[32:40], "little")
    phentsize = int.from_bytes(data[54:56], "little")
    phnum = int.from_bytes(data[56:58], "little")
    for i in range(phnum):
        off = phoff + i * phentsize
        if int.from_bytes(data[off : off + 4], "little") == 3:  # PT_INTERP
            return False
    return True


def shell_initramfs(
    kernel: KernelImage, out: Path, init: str = DEFAULT_INIT, arch: str | None = None
) -> Path:
    """Write a busybox initramfs whose init gives a root shell on the console and prints
    MARKER (``arch``: the guest's, default the host's)."""
    modules = kernel.module_load_order(SHELL_MODULES, missing_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        w = CpioWriter(f)
        for d in ("bin", "dev", "proc", "sys", "etc", "tmp", "lib", "lib/modules"):
            w.directory(d)
        w.char_device("dev/console", 5, 1)
        w.file_from("bin/busybox", find_static_busybox(arch), mode=0o755)
        for m in modules:
            w.file_from(f"lib/modules/{m.name}", m)
        w.file_bytes("etc/modules", "".join(f"/lib/modules/{m.name}\n" for m in modules).encode())
        w.file_bytes("init", init.encode(), mode=0o755)
        w.close()
    shutil.move(tmp, out)
    return out


def cached_shell_initramfs(kernel: KernelImage) -> Path:
    """The default shell initramfs for ``kernel``, built once into the cache."""
    busybox = find_static_busybox()
    key = hashlib.sha256(
        b"\0".join(
            [
                kernel.version.encode(),
                DEFAULT_INIT.encode(),
                busybox.read_bytes(),
                *(m.read_bytes() for m in kernel.module_load_order(SHELL_MODULES, missing_ok=True)),
            ]
        )
    ).hexdigest()[:16]
    with locked("images") as root:
        out = root / "images" / f"shell-{key}.cpio"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            shell_initramfs(kernel, out)
    return out
