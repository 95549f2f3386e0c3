"""What a QEMU binary is and what it has, asked of QEMU itself and cached per binary.

capsa supports QEMU 7.2 (Debian 12) to 10.x (Debian 13), and distributions build QEMU
with different parts. Rather than parse ``--version`` text or trust one release's defaults,
a short-lived ``qemu-system-* -machine none`` is asked over QMP on stdio for its version,
its QOM types (devices, memory backends, chardevs, accelerators), machines (with the
versioned type an alias such as ``q35`` stands for), CPU models, migration capabilities
and, from the QAPI schema, its netdev back ends. Every command line capsa builds is
checked against these facts before QEMU starts, so a missing part is one clear error.

The answers are cached in memory and on disk, keyed by the binary's identity (path, size,
mtime, inode): an upgraded QEMU is asked again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsa.errors import BackendUnavailable
from capsa.images.cache import cache_root

MIN_VERSION = (7, 2, 0)
PROBE_TIMEOUT = 30.0
# No machine, no devices: QEMU only answers QMP on stdio.
PROBE_OPTIONS = [
    "-machine",
    "none",
    "-nodefaults",
    "-no-user-config",
    "-display",
    "none",
    "-S",
    "-qmp",
    "stdio",
]
_CACHE_FORMAT = 2
# The queries, in order; each reply is matched to its query by id.
QUERIES: tuple[tuple[str, dict[str, Any] | None], ...] = (
    ("query-version", None),
    ("qom-list-types", {"abstract": False}),
    ("query-machines", None),
    ("query-cpu-definitions", None),
    ("query-migrate-capabilities", None),
    ("query-qmp-schema", None),
    ("query-command-line-options", None),
    ("qom-list-properties", {"typename": "memory-backend-file"}),
)
PACKAGES = {"x86_64": "qemu-system-x86", "aarch64": "qemu-system-arm"}


@dataclass(frozen=True)
class QemuInfo:
    """One QEMU binary's version and parts."""

    binary: str
    version: tuple[int, int, int]
    package: str
    types: frozenset[str]
    machines: Mapping[str, str]
    """Every machine name, and each alias, mapped to the concrete (versioned) type."""
    cpu_models: frozenset[str]
    netdevs: frozenset[str]
    migration_capabilities: frozenset[str]
    options: frozenset[str]
    """Command-line options this build has (``sandbox`` needs seccomp support)."""
    ram_file_properties: frozenset[str]
    """Properties of ``memory-backend-file`` (``rom`` maps a read-only file privately)."""

    @property
    def version_text(self) -> str:
        return ".".join(str(n) for n in self.version)

    def describe(self) -> str:
        package = f" ({self.package})" if self.package else ""
        return f"QEMU {self.version_text}{package} at {self.binary}"

    @property
    def supported(self) -> bool:
        return self.version >= MIN_VERSION

    def machine(self, name: str) -> str | None:
        """The concrete machine type ``name`` stands for (None: this QEMU has no such machine)."""
        return self.machines.get(name)

    def to_json(self) -> dict[str, Any]:
        return {
            "binary": self.binary,
            "version": list(self.version),
            "package": self.package,
            "types": sorted(self.types),
            "machines": dict(sorted(self.machines.items())),
            "cpu_models": sorted(self.cpu_models),
            "netdevs": sorted(self.netdevs),
            "migration_capabilities": sorted(self.migration_capabilities),
            "options": sorted(self.options),
            "ram_file_properties": sorted(self.ram_file_properties),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QemuInfo:
        major, minor, micro = (int(n) for n in data["version"])
        return cls(
            binary=str(data["binary"]),
            version=(major, minor, micro),
            package=str(data["package"]),
            types=frozenset(map(str, data["types"])),
            machines={str(k): str(v) for k, v in data["machines"].items()},
            cpu_models=frozenset(map(str, data["cpu_models"])),
            netdevs=frozenset(map(str, data["netdevs"])),
            migration_capabilities=frozenset(map(str, data["migration_capabilities"])),
            options=frozenset(map(str, data["options"])),
            ram_file_properties=frozenset(map(str, data["ram_file_properties"])),
        )

    @classmethod
    def from_replies(cls, binary: str, replies: Mapping[str, Any]) -> QemuInfo:
        """Facts from the ``return`` values of :data:`QUERIES`, keyed by command name."""
        try:
            version = replies["query-version"]
            qemu = version["qemu"]
            machines: dict[str, str] = {}
            for m in replies["query-machines"]:
                machines[m["name"]] = m["name"]
            for m in replies["query-machines"]:
                if m.get("alias"):
                    machines[m["alias"]] = m["name"]
            return cls(
                binary=binary,
                version=(int(qemu["major"]), int(qemu["minor"]), int(qemu["micro"])),
                package=str(version.get("package", "")).strip(),
                types=frozenset(t["name"] for t in replies["qom-list-types"]),
                machines=machines,
                cpu_models=frozenset(c["name"] for c in replies["query-cpu-definitions"]),
                netdevs=frozenset(netdev_drivers(replies["query-qmp-schema"])),
                migration_capabilities=frozenset(
                    c["capability"] for c in replies["query-migrate-capabilities"]
                ),
                options=frozenset(o["option"] for o in replies["query-command-line-options"]),
                ram_file_properties=frozenset(p["name"] for p in replies["qom-list-properties"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BackendUnavailable(f"QEMU at {binary} gave an unexpected answer: {e!r}") from e


def netdev_drivers(schema: Iterable[Mapping[str, Any]]) -> list[str]:
    """The netdev back ends (``-netdev TYPE``) in a QAPI introspection schema: the values of
    the enum behind the ``type`` member of ``netdev_add``'s argument type.

    Introspection names most types by number, so they are followed by reference rather
    than looked up by their source names."""
    by_name = {entry["name"]: entry for entry in schema}
    arg_type = by_name["netdev_add"]["arg-type"]
    members = by_name[arg_type].get("members", [])
    tag = next(m["type"] for m in members if m["name"] == "type")
    return [str(v) for v in by_name[tag]["values"]]


def qmp_script() -> str:
    """The QMP input that asks every query and then quits."""
    commands: list[dict[str, Any]] = [{"execute": "qmp_capabilities", "id": "caps"}]
    for name, arguments in QUERIES:
        command: dict[str, Any] = {"execute": name, "id": name}
        if arguments:
            command["arguments"] = arguments
        commands.append(command)
    commands.append({"execute": "quit", "id": "quit"})
    return "".join(json.dumps(c) + "\n" for c in commands)


def parse_transcript(binary: str, output: str) -> dict[str, Any]:
    """The ``return`` of each query from QEMU's QMP output, keyed by command name."""
    replies: dict[str, Any] = {}
    for line in output.splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue  # not QMP (a warning QEMU printed to stdout)
        if not isinstance(message, dict) or message.get("id") not in dict(QUERIES):
            continue
        if "error" in message:
            error = message["error"]
            raise BackendUnavailable(f"QEMU at {binary} refused {message['id']}: {error}")
        replies[message["id"]] = message.get("return")
    missing = [name for name, _ in QUERIES if name not in replies]
    if missing:
        raise BackendUnavailable(f"QEMU at {binary} did not answer {', '.join(missing)}")
    return replies


def ask_qemu(binary: str) -> dict[str, Any]:
    """Run ``binary`` once with no machine and collect the raw answers to :data:`QUERIES`."""
    argv = [binary, *PROBE_OPTIONS]
    try:
        proc = subprocess.run(
            argv, input=qmp_script(), capture_output=True, text=True, timeout=PROBE_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        timeout = f"{PROBE_TIMEOUT:.0f} s"
        raise BackendUnavailable(f"QEMU at {binary} did not answer within {timeout}") from None
    except OSError as e:
        raise BackendUnavailable(f"QEMU at {binary} cannot be run: {e.strerror}") from e
    try:
        return parse_transcript(binary, proc.stdout)
    except BackendUnavailable as e:
        stderr = proc.stderr.strip()
        raise BackendUnavailable(f"{e}{f': {stderr}' if stderr else ''}") from None


def _identity(binary: str) -> str:
    real = os.path.realpath(binary)
    st = os.stat(real)
    key = f"{_CACHE_FORMAT}:{real}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


_known: dict[str, QemuInfo] = {}


def probe(binary: str) -> QemuInfo:
    """The facts of ``binary``: from memory, the disk cache, or QEMU itself."""
    try:
        identity = _identity(binary)
    except OSError as e:
        raise BackendUnavailable(f"QEMU at {binary} cannot be read: {e.strerror}") from e
    found = _known.get(identity)
    if found is not None:
        return found
    cached = cache_root() / "qemu" / f"{identity}.json"
    try:
        found = QemuInfo.from_json(json.loads(cached.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        found = QemuInfo.from_replies(binary, ask_qemu(binary))
        _store(cached, found)
    if found.binary != binary:
        found = QemuInfo.from_json({**found.to_json(), "binary": binary})
    _known[identity] = found
    return found


def _store(path: Path, info: QemuInfo) -> None:
    # A cache that cannot be written only costs the next process another probe.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(info.to_json()))
        tmp.rename(path)
    except OSError:
        pass


def require_supported(info: QemuInfo, arch: str) -> None:
    """Refuse a QEMU older than capsa supports, naming what to install instead."""
    if info.supported:
        return
    package = PACKAGES.get(arch, "qemu-system")
    minimum = ".".join(str(n) for n in MIN_VERSION)
    raise BackendUnavailable(
        f"{info.describe()} is too old: capsa needs QEMU {minimum} or newer. Install "
        f"{package} from Debian 12 or newer or Ubuntu 24.04 or newer, or point CAPSA_QEMU "
        "at a newer qemu-system binary"
    )


# What capsa does with QEMU, and the parts each needs ("kind:name"; kinds: machine, type
# (a QOM type: device, backend object, chardev, accelerator), netdev, migration).
FEATURES: dict[str, tuple[str, ...]] = {
    "direct kernel boots": (
        "machine:{direct}",
        "type:virtio-blk-device",
        "type:virtio-rng-device",
        "type:rng-random",
        "type:chardev-socket",
    ),
    "the sandbox agent": ("type:virtio-serial-device", "type:virtserialport"),
    "vsock ports": ("type:vhost-user-vsock-device", "type:memory-backend-memfd"),
    "shared folders": ("type:vhost-user-fs-device", "type:memory-backend-memfd"),
    "shared folders over 9p": ("type:virtio-9p-device",),
    "capsa's userspace network": ("netdev:stream", "netdev:dgram", "type:virtio-net-device"),
    "NetworkMode.NAT": ("netdev:user",),
    "UEFI boots": ("machine:{uefi}", "type:virtio-blk-pci"),
    "snapshots": ("type:memory-backend-file", "migration:x-ignore-shared"),
    "TCG": ("type:tcg-accel",),
    "KVM": ("type:kvm-accel",),
}


def feature_parts(arch: str) -> dict[str, tuple[str, ...]]:
    """:data:`FEATURES` with the machine names of ``arch`` filled in."""
    direct, uefi = ("virt", "virt") if arch == "aarch64" else ("microvm", "q35")
    return {
        feature: tuple(part.format(direct=direct, uefi=uefi) for part in parts)
        for feature, parts in FEATURES.items()
    }


def has_part(info: QemuInfo, part: str) -> bool:
    kind, _, name = part.partition(":")
    if kind == "machine":
        return _has_machine(info, name)
    if kind == "netdev":
        return name in info.netdevs
    if kind == "migration":
        return name in info.migration_capabilities
    return name in info.types


def feature_report(info: QemuInfo, arch: str) -> dict[str, list[str]]:
    """Each feature, with the parts this QEMU lacks for it (empty: it has them all)."""
    return {
        feature: [part for part in parts if not has_part(info, part)]
        for feature, parts in feature_parts(arch).items()
    }


def _purpose(name: str) -> str:
    """The features a part (named without its kind) serves, for error messages."""
    users: list[str] = []
    for arch in ("x86_64", "aarch64"):
        for feature, parts in feature_parts(arch).items():
            names = {part.partition(":")[2] for part in parts}
            if (name in names or f"{name}-accel" in names) and feature not in users:
                users.append(feature)
    return ", ".join(users)


def _has_machine(info: QemuInfo, name: str) -> bool:
    return name in info.machines or name in info.machines.values()


# Per option: what its first value names, and how to tell whether this QEMU has it.
_PART_CHECKS: dict[str, tuple[str, Callable[[QemuInfo, str], bool]]] = {
    "-machine": ("machine", _has_machine),
    "-device": ("device", lambda info, name: name in info.types),
    "-object": ("object", lambda info, name: name in info.types),
    "-chardev": ("chardev", lambda info, name: f"chardev-{name}" in info.types),
    "-netdev": ("netdev", lambda info, name: name in info.netdevs),
    "-accel": ("accelerator", lambda info, name: f"{name}-accel" in info.types),
    # "host" exists only under KVM/HVF, which a probe without a machine does not start.
    "-cpu": ("CPU model", lambda info, name: name == "host" or name in info.cpu_models),
}


def missing_parts(info: QemuInfo, argv: list[str]) -> list[str]:
    """Everything ``argv`` asks of QEMU that ``info`` says this binary lacks, in order, each
    as ``kind name (what it is for)``."""
    missing: list[str] = []
    for flag, value in itertools.pairwise(argv):
        check = _PART_CHECKS.get(flag)
        if check is None:
            continue
        kind, present = check
        name = value.split(",", 1)[0]
        if not present(info, name):
            purpose = _purpose(name)
            missing.append(f"{kind} {name}" + (f" ({purpose})" if purpose else ""))
    return list(dict.fromkeys(missing))
