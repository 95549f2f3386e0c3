"""QEMU capability detection: facts read from recorded QMP answers of QEMU 7.2 (Debian 12)
and 10.0 (Debian 13), the command lines chosen from them, and clear refusals."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest

import capsa
from capsa.backends.qemu import probe as probe_mod
from capsa.backends.qemu.accel import Accel
from capsa.backends.qemu.backend import find_qemu
from capsa.backends.qemu.cmdline import Firmware, HostFacts, build_argv
from capsa.backends.qemu.probe import (
    QemuInfo,
    feature_report,
    missing_parts,
    parse_transcript,
    probe,
    require_supported,
)
from capsa.backends.qemu.snapshot import QEMU_FILE, check_restorable, snapshot_blocker
from capsa.config import (
    MountMode,
    ResourceConfig,
    SharedDir,
    UserNatConfig,
    VmConfig,
    VsockPortConfig,
)
from capsa.errors import BackendUnavailable, SnapshotError

DATA = Path(__file__).parent.parent / "data" / "qemu"
RECORDINGS = ("7.2-x86_64", "10.0-x86_64", "7.2-aarch64", "10.0-aarch64")


def recorded(name: str) -> QemuInfo:
    data = json.loads((DATA / f"{name}.json").read_text())
    return QemuInfo.from_replies(data["binary"], data["replies"])


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def _full_config(tmp_path: Path, arch: str) -> VmConfig:
    """A VM using every part capsa can ask of QEMU: disks, agent port, vsock, shares, net."""
    return VmConfig(
        boot=capsa.LinuxDirectBoot("/k", "/i"),
        resources=ResourceConfig(2, 512),
        disks=(capsa.DiskImage("/d.img").read_only(),),
        serial_ports=("org.capsa.agent.0",),
        vsock_ports=(VsockPortConfig(port=1024),),
        shares=(SharedDir(tmp_path, "work", MountMode.READ_WRITE),),
        network=UserNatConfig(),
        arch=arch,
    )


def _facts(info: QemuInfo, arch: str, **kw: object) -> HostFacts:
    fields: dict[str, object] = {
        "qemu_binary": info.binary,
        "qemu": info,
        "accel": Accel.TCG,
        "arch": arch,
        "console_fd": 3,
        "qmp_fd": 4,
        "serial_port_fds": {"org.capsa.agent.0": 5},
        "vsock_fd": 7,
        "virtio_fs_fds": (8,),
        "net_fd": 9,
    }
    fields.update(kw)
    return HostFacts(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", RECORDINGS)
def test_recorded_qemus_are_read_and_supported(name: str) -> None:
    info = recorded(name)
    version, arch = name.split("-")
    assert info.version_text.startswith(version + ".")
    assert info.supported and info.package.startswith("Debian 1:" + version)
    assert {"stream", "dgram", "user"} <= info.netdevs
    assert "x-ignore-shared" in info.migration_capabilities
    assert {"vhost-user-fs-device", "vhost-user-vsock-device", "virtio-serial-device"} <= info.types
    # Aliases resolve to the versioned machine of that release, never to another's.
    alias = "virt" if arch == "aarch64" else "q35"
    expected = "virt-" if arch == "aarch64" else "pc-q35-"
    assert info.machine(alias) == expected + version
    require_supported(info, arch)


@pytest.mark.parametrize("name", RECORDINGS)
def test_every_part_of_a_full_command_line_is_found(name: str, tmp_path: Path) -> None:
    info = recorded(name)
    arch = name.split("-")[1]
    argv = build_argv(_full_config(tmp_path, arch), _facts(info, arch))
    assert missing_parts(info, argv) == []
    machine = _opt(argv, "-machine")[0]
    assert machine.split(",")[0] == (
        "virt-" + info.version_text.rsplit(".", 1)[0] if arch == "aarch64" else "microvm"
    )


@pytest.mark.parametrize("name", ["7.2-x86_64", "10.0-x86_64"])
def test_uefi_pins_the_q35_of_that_release(name: str) -> None:
    info = recorded(name)
    cfg = VmConfig(boot=capsa.UefiBoot(capsa.DiskImage("/esp.img")))
    fw = Firmware(Path("/code.fd"), Path("/vars.fd"))
    argv = build_argv(
        cfg,
        _facts(
            info,
            "x86_64",
            firmware=fw,
            efi_vars=Path("/v.fd"),
            vsock_fd=None,
            virtio_fs_fds=(),
            net_fd=None,
        ),
    )
    assert _opt(argv, "-machine") == [f"pc-q35-{name.split('-')[0]}"]
    assert missing_parts(info, argv) == []


def _without(info: QemuInfo, **drop: set[str]) -> QemuInfo:
    changes = {field: frozenset(getattr(info, field) - names) for field, names in drop.items()}
    return dataclasses.replace(info, **changes)  # type: ignore[arg-type]


def test_missing_parts_are_named_with_their_purpose(tmp_path: Path) -> None:
    full = recorded("10.0-x86_64")
    info = _without(
        full, types={"vhost-user-fs-device", "memory-backend-memfd"}, netdevs={"stream"}
    )
    argv = build_argv(_full_config(tmp_path, "x86_64"), _facts(info, "x86_64"))
    assert missing_parts(info, argv) == [
        "object memory-backend-memfd (vsock ports, shared folders)",
        "device vhost-user-fs-device (shared folders)",
        "netdev stream (capsa's userspace network)",
    ]
    no_microvm = dataclasses.replace(
        full, machines={k: v for k, v in full.machines.items() if v != "microvm"}
    )
    assert "machine microvm (direct kernel boots)" in missing_parts(no_microvm, argv)


def test_slirp_less_qemu_refuses_nat() -> None:
    info = _without(recorded("7.2-x86_64"), netdevs={"user"})
    cfg = VmConfig(boot=capsa.LinuxDirectBoot("/k"), network=capsa.NetworkMode.NAT)
    argv = build_argv(
        cfg,
        _facts(info, "x86_64", vsock_fd=None, virtio_fs_fds=(), net_fd=None),
    )
    assert missing_parts(info, argv) == ["netdev user (NetworkMode.NAT)"]


def test_a_qemu_older_than_7_2_is_refused_with_what_to_install() -> None:
    old = dataclasses.replace(recorded("7.2-x86_64"), version=(6, 2, 0), package="Ubuntu 6.2")
    with pytest.raises(BackendUnavailable) as err:
        require_supported(old, "x86_64")
    text = str(err.value)
    assert "QEMU 6.2.0 (Ubuntu 6.2)" in text and "7.2.0 or newer" in text
    assert "qemu-system-x86" in text


def test_snapshots_need_ignore_shared() -> None:
    cfg = VmConfig(boot=capsa.LinuxDirectBoot("/k"))
    info = recorded("7.2-x86_64")
    assert snapshot_blocker(cfg, info) is None
    lacking = _without(info, migration_capabilities={"x-ignore-shared"})
    assert "x-ignore-shared" in (snapshot_blocker(cfg, lacking) or "")


def test_a_snapshot_restores_only_under_the_qemu_that_made_it(tmp_path: Path) -> None:
    old, new = recorded("7.2-x86_64"), recorded("10.0-x86_64")
    (tmp_path / QEMU_FILE).write_text(
        json.dumps({"version": old.version_text, "package": old.package})
    )
    check_restorable(tmp_path, old)
    with pytest.raises(SnapshotError, match=r"made by QEMU 7\.2\.22 .*this is QEMU 10\.0\.13"):
        check_restorable(tmp_path, new)
    (tmp_path / QEMU_FILE).unlink()
    with pytest.raises(SnapshotError, match="does not say which QEMU"):
        check_restorable(tmp_path, old)


def test_transcript_errors_and_gaps_are_clear() -> None:
    with pytest.raises(BackendUnavailable, match="did not answer query-version"):
        parse_transcript("/q", '{"QMP": {}}\nnot json\n')
    bad = json.dumps({"id": "query-version", "error": {"class": "CommandNotFound"}})
    with pytest.raises(BackendUnavailable, match="refused query-version"):
        parse_transcript("/q", bad + "\n")
    with pytest.raises(BackendUnavailable, match="unexpected answer"):
        QemuInfo.from_replies("/q", {"query-version": {"qemu": {}}})


def _stand_in_qemu(tmp_path: Path, recording: str, calls: Path) -> Path:
    """An executable that answers the probe's QMP exactly as the recorded QEMU did."""
    script = tmp_path / "qemu-system-x86_64"
    script.write_text(f"""#!{sys.executable}
import json, sys
open({str(calls)!r}, "a").write("x")
replies = json.load(open({str(DATA / recording)!r}))["replies"]
print(json.dumps({{"QMP": {{"version": {{}}, "capabilities": []}}}}))
for line in sys.stdin:
    cmd = json.loads(line)
    print(json.dumps({{"return": replies.get(cmd["execute"], {{}}), "id": cmd["id"]}}))
""")
    script.chmod(0o755)
    return script


def test_probe_asks_once_and_asks_again_after_an_upgrade(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = tmp_path / "calls"
    binary = _stand_in_qemu(tmp_path, "7.2-x86_64.json", calls)
    first = probe(str(binary))
    assert first.version == (7, 2, 22) and first.binary == str(binary)
    assert probe(str(binary)) is first
    monkeypatch.setattr(probe_mod, "_known", {})  # a new process: the disk cache answers
    assert probe(str(binary)) == first
    assert calls.read_text() == "x"
    # An upgraded binary (new size and mtime) is asked again.
    text = binary.read_text().replace("7.2-x86_64.json", "10.0-x86_64.json")
    binary.write_text(text + "\n")
    os.utime(binary, ns=(1, 1))
    assert probe(str(binary)).version == (10, 0, 13)
    assert calls.read_text() == "xx"


def test_a_binary_that_is_not_qemu_is_unavailable(tmp_path: Path) -> None:
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\necho 'not qemu' >&2\n")
    fake.chmod(0o755)
    with pytest.raises(BackendUnavailable, match=r"did not answer.*not qemu"):
        probe(str(fake))


def test_capsa_qemu_chooses_the_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for arch in ("x86_64", "aarch64"):
        (tmp_path / f"qemu-system-{arch}").write_text("")
        (tmp_path / f"qemu-system-{arch}").chmod(0o755)
    monkeypatch.setenv("CAPSA_QEMU", str(tmp_path / "qemu-system-x86_64"))
    assert find_qemu("x86_64") == str(tmp_path / "qemu-system-x86_64")
    # The same installation's binary for the other architecture.
    assert find_qemu("aarch64") == str(tmp_path / "qemu-system-aarch64")
    monkeypatch.setenv("CAPSA_QEMU", str(tmp_path))
    assert find_qemu("aarch64") == str(tmp_path / "qemu-system-aarch64")
    monkeypatch.setenv("CAPSA_QEMU", str(tmp_path / "nowhere"))
    with pytest.raises(BackendUnavailable, match=r"CAPSA_QEMU=.*not an executable"):
        find_qemu("x86_64")


@pytest.mark.parametrize("name", ["7.2-x86_64", "10.0-x86_64"])
def test_debian_qemus_have_every_feature_but_kvm_here(name: str) -> None:
    report = feature_report(recorded(name), "x86_64")
    assert {feature for feature, missing in report.items() if missing} <= {"KVM"}
    assert report["shared folders"] == [] and report["snapshots"] == []


def _doctor(monkeypatch: pytest.MonkeyPatch, qemu: Path) -> dict[str, list[str]]:
    """`capsa doctor --json` with CAPSA_QEMU set: findings grouped by level."""
    from click.testing import CliRunner

    from capsa.cli import main

    monkeypatch.setenv("CAPSA_QEMU", str(qemu))
    result = CliRunner().invoke(main, ["doctor", "--json"])
    rows = json.loads(result.output)
    by_level: dict[str, list[str]] = {}
    for row in rows:
        by_level.setdefault(row["level"], []).append(row["what"] + " | " + row["fix"])
    by_level["exit"] = [str(result.exit_code)]
    return by_level


def test_doctor_reports_the_qemu_and_its_features(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    report = _doctor(monkeypatch, _stand_in_qemu(tmp_path, "10.0-x86_64.json", tmp_path / "n"))
    qemu = next(line for line in report["ok"] if line.startswith("QEMU 10.0.13 (Debian"))
    assert "the sandbox agent" in qemu and "shared folders" in qemu and "snapshots" in qemu
    assert any(line.startswith("guest Python: ") for line in report["ok"] + report.get("warn", []))


def test_doctor_fails_an_old_qemu_naming_version_and_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = json.loads((DATA / "7.2-x86_64.json").read_text())
    old = {"qemu": {"major": 6, "minor": 2, "micro": 0}, "package": "Debian 1:6.2+dfsg-2"}
    data["replies"]["query-version"] = old
    (tmp_path / "old.json").write_text(json.dumps(data))
    qemu = _stand_in_qemu(tmp_path, str(tmp_path / "old.json"), tmp_path / "n")
    report = _doctor(monkeypatch, qemu)
    assert report["exit"] == ["1"]
    failure = next(line for line in report["FAIL"] if line.startswith("QEMU:"))
    assert "QEMU 6.2.0 (Debian 1:6.2+dfsg-2)" in failure and "7.2.0 or newer" in failure
    assert "apt-get install qemu-system-x86" in failure


def test_doctor_fails_a_qemu_without_the_agents_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = json.loads((DATA / "7.2-x86_64.json").read_text())
    types = data["replies"]["qom-list-types"]
    data["replies"]["qom-list-types"] = [t for t in types if "virtio-serial" not in t["name"]]
    (tmp_path / "lacking.json").write_text(json.dumps(data))
    qemu = _stand_in_qemu(tmp_path, str(tmp_path / "lacking.json"), tmp_path / "n")
    report = _doctor(monkeypatch, qemu)
    assert report["exit"] == ["1"]
    expected = "the sandbox agent: not possible, this QEMU lacks type:virtio-serial-device"
    assert any(line.startswith(expected) for line in report["FAIL"])
