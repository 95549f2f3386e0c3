"""``capsa doctor``: what this host gives capsa, each finding with a fix when it is a problem.

Every fact comes from the same code the library runs (the QEMU probe, the accelerator
choice, the kernel and image caches), so the report cannot disagree with what a boot does.
"""

from __future__ import annotations

import enum
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import capsa
from capsa._util.host import RAM_DIR, has_room, host_arch
from capsa._util.tools import find_tool
from capsa.backends.qemu.accel import choose_accel, native_accel
from capsa.backends.qemu.backend import confinement_report, find_firmware, qemu_info
from capsa.backends.qemu.probe import MIN_VERSION, PACKAGES, QemuInfo, feature_report
from capsa.errors import CapsaError
from capsa.images.kernel import REQUIRED_MODULES, cached_kernel, kernel_package
from capsa.images.sandbox import guest_python, image_info
from capsa.images.shell import find_static_busybox

# Guest interpreters the sandbox image is tested with (the image ships the host's).
GUEST_PYTHONS = ((3, 11), (3, 12), (3, 13))
# Without these a boot cannot work at all; the other features are optional.
ESSENTIAL = ("direct kernel boots", "the sandbox agent", "capsa's userspace network")
INSTALL = "bash scripts/install.sh"


class Level(enum.Enum):
    OK = "ok"
    INFO = "info"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Finding:
    level: Level
    what: str
    fix: str = ""


def examine() -> list[Finding]:
    """Everything ``capsa doctor`` reports, in order."""
    arch = host_arch()
    findings = [*_installation(), *_qemu(arch), _accelerator(), *_confinement(arch)]
    findings += [*_tools(), *_kernel(arch), _guest_python(), _image(arch), _tmpfs()]
    findings += _other_arch("aarch64" if arch == "x86_64" else "x86_64")
    return findings


def _installation() -> list[Finding]:
    where = Path(capsa.__file__).resolve().parent
    env = "a virtual environment" if sys.prefix != sys.base_prefix else "the system Python"
    found = [Finding(Level.OK, f"capsa {capsa.__version__} at {where}, in {env} ({sys.prefix})")]
    command = shutil.which("capsa")
    if command is None:
        found.append(Finding(Level.WARN, "no `capsa` command on PATH", f"run `{INSTALL}`"))
    else:
        found.append(Finding(Level.OK, f"`capsa` command: {command}"))
    return found


def _qemu(arch: str) -> list[Finding]:
    package = PACKAGES.get(arch, "qemu-system")
    try:
        info = qemu_info(arch)
    except CapsaError as e:
        return [Finding(Level.FAIL, f"QEMU: {e}", f"`sudo apt-get install {package}`")]
    report = feature_report(info, arch)
    present = [feature for feature, missing in report.items() if not missing]
    found = [Finding(Level.OK, f"{info.describe()}: {', '.join(present)}")]
    for feature, missing in report.items():
        if missing:
            found.append(_missing_feature(feature, missing, package))
    return found


def _missing_feature(feature: str, missing: list[str], package: str) -> Finding:
    what = f"{feature}: not possible, this QEMU lacks {', '.join(missing)}"
    if feature == "KVM":
        return Finding(Level.INFO, what)
    if feature == "shared folders over 9p" and sys.platform.startswith("linux"):
        return Finding(Level.INFO, what + " (not needed on Linux: shares use virtio-fs)")
    level = Level.FAIL if feature in ESSENTIAL else Level.WARN
    minimum = ".".join(map(str, MIN_VERSION))
    return Finding(level, what, f"install Debian's or Ubuntu's {package} (QEMU {minimum}+)")


def _confinement(arch: str) -> list[Finding]:
    """What keeps a compromised QEMU or helper from being a compromised host."""
    try:
        info: QemuInfo | None = qemu_info(arch)
    except CapsaError:
        info = None
    found = []
    for layer, state in confinement_report(info).items():
        on = state.startswith("on") or state.startswith("read-only")
        what = f"confinement, {layer}: {state}"
        if on:
            found.append(Finding(Level.OK, what))
        elif layer == "identities" and os.geteuid() != 0:
            found.append(Finding(Level.INFO, what))
        else:
            found.append(Finding(Level.WARN, what, CONFINEMENT_FIXES.get(layer, "")))
    return found


CONFINEMENT_FIXES = {
    "identities": "unset CAPSA_CONFINE; install util-linux (setpriv)",
    "seccomp": "use Debian's or Ubuntu's QEMU (built with seccomp); unset CAPSA_CONFINE",
    "landlock": "a kernel with Landlock (5.13+, CONFIG_SECURITY_LANDLOCK, lsm=...,landlock)",
    "snapshot RAM": "QEMU 8.2 or newer (Debian 12: `bash scripts/install.sh --qemu-backports`)",
}


def _accelerator() -> Finding:
    choice = choose_accel()
    if choice.forced:
        return Finding(Level.INFO, f"accelerator: {choice.accel.value} (forced by CAPSA_ACCEL)")
    native, why = native_accel()
    if native is not None:
        return Finding(Level.OK, f"accelerator: {native.value} ({why})")
    return Finding(
        Level.INFO, f"accelerator: TCG emulation, VMs boot in seconds ({why})", "none needed"
    )


def _tools() -> list[Finding]:
    found = []
    try:
        found.append(Finding(Level.OK, f"static busybox: {find_static_busybox()}"))
    except CapsaError as e:
        fix = "`sudo apt-get install busybox-static`"
        found.append(Finding(Level.FAIL, f"static busybox: {e}", fix))
    for tool, package, purpose in (
        ("qemu-img", "qemu-utils", "qcow2 disks"),
        ("mke2fs", "e2fsprogs", "OCI images"),
        ("mmdebstrap", "mmdebstrap", "the default Debian userland"),
        ("genext2fs", "genext2fs", "the default Debian userland"),
    ):
        path = find_tool(tool)
        if path:
            found.append(Finding(Level.OK, f"{tool} ({purpose}): {path}"))
        else:
            fix = f"`sudo apt-get install {package}`"
            found.append(Finding(Level.WARN, f"{tool} ({purpose}): not found", fix))
    try:
        found.append(Finding(Level.OK, f"UEFI firmware: {find_firmware(host_arch()).code}"))
    except CapsaError as e:
        found.append(Finding(Level.WARN, f"UEFI firmware: {e}", "`sudo apt-get install ovmf`"))
    return found


def _kernel(arch: str) -> list[Finding]:
    override = os.environ.get("CAPSA_KERNEL")
    if override:
        needs = ", ".join(REQUIRED_MODULES)
        what = f"guest kernel: {override} (CAPSA_KERNEL; it must have {needs} built in)"
        return [Finding(Level.INFO, what)]
    cached = cached_kernel(arch)
    if cached is not None:
        return [Finding(Level.OK, f"guest kernel: Debian's {cached.version} ({cached.path})")]
    try:
        package = kernel_package(arch)
    except CapsaError as e:
        fix = "`sudo apt-get update`, or set CAPSA_KERNEL"
        return [Finding(Level.FAIL, f"guest kernel: {e}", fix)]
    what = f"guest kernel: {package}, downloaded on first use (apt-get download)"
    return [Finding(Level.OK, what)]


def _guest_python() -> Finding:
    try:
        exe, stdlib = guest_python()
    except CapsaError as e:
        return Finding(Level.FAIL, f"guest Python: {e}", "unset CAPSA_GUEST_PYTHON")
    version = sys.version_info[:2] if exe == Path(os.path.realpath(sys.executable)) else None
    what = f"guest Python: {exe} (stdlib {stdlib}) is shipped in the sandbox image"
    if version is not None and version not in GUEST_PYTHONS:
        tested = ", ".join(f"{a}.{b}" for a, b in GUEST_PYTHONS)
        what += f"; Python {version[0]}.{version[1]} is not one of the tested {tested}"
        return Finding(Level.WARN, what, "set CAPSA_GUEST_PYTHON")
    return Finding(Level.OK, what)


def _image(arch: str) -> Finding:
    kernel = cached_kernel(arch)
    version = kernel.version if kernel is not None else None
    ours = [i for i in image_info() if version is not None and i.get("kernel") == version]
    if not ours:
        return Finding(Level.INFO, "sandbox image: not built yet (built on first use, ~10 s)")
    return Finding(Level.OK, f"sandbox image: {ours[0]['path']} (kernel {version})")


def _tmpfs() -> Finding:
    if has_room(RAM_DIR, 512, 64):
        return Finding(Level.OK, f"{RAM_DIR}: room for snapshottable guest RAM")
    what = f"{RAM_DIR}: little room: VMs run on anonymous memory and cannot be snapshotted"
    return Finding(Level.WARN, what, f"make {RAM_DIR} larger")


def _other_arch(arch: str) -> list[Finding]:
    """Guests of the other architecture are optional: say whether they would work."""
    try:
        info = qemu_info(arch)
    except CapsaError:
        package = PACKAGES.get(arch, "qemu-system")
        what = f"{arch} guests: no QEMU for them (`sudo apt-get install {package}`)"
        return [Finding(Level.INFO, what)]
    return [Finding(Level.OK, f"{arch} guests: {info.describe()}")]


def has_failures(findings: list[Finding]) -> bool:
    return any(f.level is Level.FAIL for f in findings)
