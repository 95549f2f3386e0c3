"""Choosing a QEMU accelerator that can really boot a standard Linux guest.

``/dev/kvm`` existing is not enough: on PVM-based nested hosts (module ``kvm_pvm``) the
device opens fine but a standard guest hangs forever. We therefore only pick KVM when a
hardware KVM module (``kvm_intel`` / ``kvm_amd``) is loaded and the device is usable.
"""

from __future__ import annotations

import enum
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from capsa.errors import InvalidConfig

_SYS_MODULE = Path("/sys/module")
_KVM_DEVICE = Path("/dev/kvm")


class Accel(enum.Enum):
    KVM = "kvm"
    HVF = "hvf"  # macOS Hypervisor.framework
    TCG = "tcg"


@dataclass(frozen=True)
class AccelChoice:
    accel: Accel
    reason: str
    forced: bool = False


class SlowAccelWarning(UserWarning):
    """Guests run under software emulation (TCG): expect seconds, not milliseconds."""


def kvm_usability(sys_module: Path = _SYS_MODULE, device: Path = _KVM_DEVICE) -> tuple[bool, str]:
    """Tell whether KVM can boot a standard guest here, and why (not)."""
    if not device.exists():
        return False, f"{device} does not exist"
    if not os.access(device, os.R_OK | os.W_OK):
        return False, f"{device} is not readable and writable by this user"
    if (sys_module / "kvm_pvm").exists():
        return False, "KVM is PVM-based (kvm_pvm): standard guests hang under it"
    for hw in ("kvm_intel", "kvm_amd"):
        if (sys_module / hw).exists():
            return True, f"hardware KVM ({hw}) is loaded"
    return False, "no hardware KVM module (kvm_intel/kvm_amd) is loaded"


def hvf_usability(sysctl: Callable[[str], str | None] | None = None) -> tuple[bool, str]:
    """Tell whether macOS's Hypervisor.framework is there (``kern.hv_support``)."""
    read = sysctl or _sysctl
    value = read("kern.hv_support")
    if value is None:
        return False, "sysctl kern.hv_support is not readable"
    if value.strip() == "1":
        return True, "Hypervisor.framework is supported (kern.hv_support=1)"
    return False, f"Hypervisor.framework is not supported (kern.hv_support={value.strip()})"


def _sysctl(name: str) -> str | None:
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def native_accel(host: str = sys.platform) -> tuple[Accel | None, str]:
    """The hardware accelerator this host offers a standard guest, if any, and why."""
    if host == "darwin":
        ok, why = hvf_usability()
        return (Accel.HVF if ok else None), why
    ok, why = kvm_usability()
    return (Accel.KVM if ok else None), why


def parse_forced(value: str) -> Accel:
    try:
        return Accel(value.strip().lower())
    except ValueError:
        choices = ", ".join(a.value for a in Accel)
        raise InvalidConfig(f"CAPSA_ACCEL={value!r} is not one of: {choices}") from None


@cache
def choose_accel() -> AccelChoice:
    """The accelerator for new VMs: ``CAPSA_ACCEL`` if set, else KVM where it really works."""
    forced = os.environ.get("CAPSA_ACCEL")
    if forced:
        return AccelChoice(parse_forced(forced), "forced by CAPSA_ACCEL", forced=True)
    accel, why = native_accel()
    if accel is not None:
        return AccelChoice(accel, why)
    warnings.warn(
        f"capsa: using QEMU TCG software emulation ({why}); VMs will be slow",
        SlowAccelWarning,
        stacklevel=2,
    )
    return AccelChoice(Accel.TCG, why)


@cache
def host_tsc_khz() -> int | None:
    """The host TSC frequency in kHz: under TCG the guest's rdtsc returns it.

    Passing it as ``tsc_early_khz`` keeps microvm guests from hanging in TSC
    calibration (there is no HPET or PM timer to fall back on).
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("cpu MHz"):
            try:
                return round(float(line.split(":", 1)[1]) * 1000)
            except ValueError:
                return None
    return None
