from pathlib import Path

import pytest

import capsa
from capsa.api.builders import validate_config
from capsa.config import KernelCmdline, VmConfig


def test_kernel_cmdline_later_arg_replaces_earlier_and_moves_to_end() -> None:
    line = (
        KernelCmdline().with_arg("root", "/dev/vda").with_arg("quiet").with_arg("root", "/dev/vdb")
    )
    assert line.merged_over(KernelCmdline()) == "quiet root=/dev/vdb"


def test_user_args_win_over_defaults() -> None:
    defaults = KernelCmdline.parse("console=ttyS0 panic=-1 quiet")
    user = KernelCmdline().with_arg("panic", "5").with_arg("init", "/bin/sh")
    assert user.merged_over(defaults) == "console=ttyS0 quiet panic=5 init=/bin/sh"


def test_override_is_verbatim() -> None:
    user = KernelCmdline().with_override("console=hvc0 root=/dev/vda")
    assert user.merged_over(KernelCmdline.parse("console=ttyS0")) == "console=hvc0 root=/dev/vda"


@pytest.mark.parametrize("key", ["", "a b", "k=v"])
def test_bad_cmdline_keys_are_rejected(key: str) -> None:
    with pytest.raises(capsa.InvalidConfig):
        capsa.vm(capsa.LinuxDirectBoot("/nonexistent")).cmdline_arg(key, "x")


def test_disk_format_is_inferred_from_extension() -> None:
    assert capsa.DiskImage("a.qcow2").format is capsa.ImageFormat.QCOW2
    assert capsa.DiskImage("a.QCOW2").format is capsa.ImageFormat.QCOW2
    assert capsa.DiskImage("a.img").format is capsa.ImageFormat.RAW
    assert capsa.DiskImage("a.raw").read_only().is_read_only
    assert (
        capsa.DiskImage.with_format("x", capsa.ImageFormat.QCOW2).format is capsa.ImageFormat.QCOW2
    )


def test_with_format_rejects_unknown_format() -> None:
    with pytest.raises(capsa.InvalidConfig, match="unknown disk image format"):
        capsa.DiskImage.with_format("x", "vmdk")  # type: ignore[arg-type]


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "vmlinuz"
    k.write_bytes(b"\0" * 16)
    return k


def _config(kernel: Path, **kw: object) -> capsa.VmBuilder:
    b = capsa.vm(capsa.LinuxDirectBoot(kernel))
    for name, value in kw.items():
        getattr(b, name)(value)
    return b


def test_missing_kernel_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(capsa.InvalidConfig, match=r"kernel not found: .*/nope"):
        capsa.vm(capsa.LinuxDirectBoot(tmp_path / "nope")).config()


def test_missing_initrd_names_the_path(kernel: Path, tmp_path: Path) -> None:
    with pytest.raises(capsa.InvalidConfig, match=r"initrd not found: .*/initrd.cpio"):
        capsa.vm(capsa.LinuxDirectBoot(kernel, tmp_path / "initrd.cpio")).config()


def test_missing_disk_and_missing_read_only_disk(kernel: Path, tmp_path: Path) -> None:
    with pytest.raises(capsa.InvalidConfig, match=r"^disk not found: .*/d.img"):
        _config(kernel, disk=capsa.DiskImage(tmp_path / "d.img")).config()
    with pytest.raises(capsa.InvalidConfig, match=r"read-only disk not found: .*/r.img"):
        _config(kernel, disk=capsa.DiskImage(tmp_path / "r.img").read_only()).config()


def test_unwritable_disk_is_rejected(kernel: Path, tmp_path: Path) -> None:
    import os

    d = tmp_path / "d.img"
    d.write_bytes(b"\0" * 512)
    d.chmod(0o444)
    if os.access(d, os.W_OK):  # root ignores mode bits
        d.chmod(0o644)
        import subprocess

        subprocess.run(["chattr", "+i", str(d)], check=False)
        if os.access(d, os.W_OK) or not _immutable(d):
            pytest.skip("cannot make a file unwritable for this user")
    try:
        with pytest.raises(capsa.InvalidConfig, match=r"disk not writable: .*/d.img"):
            _config(kernel, disk=capsa.DiskImage(d)).config()
        # The same file is fine read-only.
        _config(kernel, disk=capsa.DiskImage(d).read_only()).config()
    finally:
        import subprocess

        subprocess.run(["chattr", "-i", str(d)], check=False)


def _immutable(path: Path) -> bool:
    try:
        with open(path, "r+b"):
            return False
    except OSError:
        return True


def test_qcow2_header_is_checked(kernel: Path, tmp_path: Path) -> None:
    d = tmp_path / "d.qcow2"
    d.write_bytes(b"\0" * 512)
    with pytest.raises(capsa.InvalidConfig, match="no qcow2 header"):
        _config(kernel, disk=capsa.DiskImage(d)).config()
    raw = tmp_path / "q.img"
    raw.write_bytes(b"QFI\xfb" + b"\0" * 508)
    with pytest.raises(capsa.InvalidConfig, match="is a qcow2 image"):
        _config(kernel, disk=capsa.DiskImage(raw)).config()


@pytest.mark.parametrize(
    ("method", "value", "message"),
    [
        ("cpus", 0, "cpus must be at least 1"),
        ("cpus", -2, "cpus must be at least 1"),
        ("memory_mb", 16, "memory too small"),
        ("timeout", 0, "timeout must be positive"),
    ],
)
def test_bad_resources(kernel: Path, method: str, value: int, message: str) -> None:
    with pytest.raises(capsa.InvalidConfig, match=message):
        _config(kernel, **{method: value}).config()


def test_override_conflicts_with_args(kernel: Path) -> None:
    b = capsa.vm(capsa.LinuxDirectBoot(kernel)).cmdline_arg("init", "/x").cmdline_override("quiet")
    with pytest.raises(capsa.InvalidConfig, match="cannot be combined"):
        b.config()


def test_vsock_port_zero_and_duplicates(kernel: Path) -> None:
    with pytest.raises(capsa.InvalidConfig, match="vsock port must be"):
        capsa.vm(capsa.LinuxDirectBoot(kernel)).vsock_listen(0).config()
    with pytest.raises(capsa.InvalidConfig, match="duplicate vsock port: 1024"):
        capsa.vm(capsa.LinuxDirectBoot(kernel)).vsock_listen(1024).vsock_connect(1024).config()


def test_uefi_rejects_kernel_cmdline(tmp_path: Path) -> None:
    disk = tmp_path / "esp.img"
    disk.write_bytes(b"\0" * 512)
    b = capsa.vm(capsa.UefiBoot(capsa.DiskImage(disk))).cmdline_flag("quiet")
    with pytest.raises(capsa.InvalidConfig, match="only be set for LinuxDirectBoot"):
        b.config()


def test_root_disk_comes_first(kernel: Path, tmp_path: Path) -> None:
    root, data = tmp_path / "root.img", tmp_path / "data.img"
    root.write_bytes(b"\0" * 512)
    data.write_bytes(b"\0" * 512)
    boot = capsa.LinuxDirectBoot(kernel).with_root_disk(capsa.DiskImage(root))
    config = capsa.vm(boot).disk(capsa.DiskImage(data)).config()
    assert [d.path for d in config.all_disks] == [root, data]
    validate_config(VmConfig(boot=boot))


def test_shares_are_checked_at_build_time(kernel: Path, tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    vm = capsa.vm(capsa.LinuxDirectBoot(kernel))
    config = vm.share(folder, "src", capsa.MountMode.READ_WRITE).config()
    (share,) = config.shares
    assert share.tag == "src" and not share.read_only
    assert share.ownership == capsa.Ownership.squash_to_root()
    cases = [
        (tmp_path / "missing", "t", "does not exist"),
        (kernel, "t", "is not a directory"),
        (folder, "x" * 37, "1 to 36 bytes"),
        (folder, "", "1 to 36 bytes"),
        (folder, "a b", "may not contain"),
        (folder, "src", "used twice"),
    ]
    for path, tag, message in cases:
        builder = capsa.vm(capsa.LinuxDirectBoot(kernel)).share(folder, "src")
        with pytest.raises(capsa.InvalidConfig, match=message):
            builder.share(path, tag).config()


@pytest.mark.parametrize("guest_path", ["relative", "/a/../etc", "/", "/x\0y"])
def test_sandbox_share_guest_paths_must_be_absolute_and_plain(
    kernel: Path, tmp_path: Path, guest_path: str
) -> None:
    with pytest.raises(capsa.InvalidConfig, match="guest path"):
        capsa.sandbox().kernel(kernel).initrd(kernel).share(tmp_path, guest_path).config()


def test_sandbox_mounts_are_passed_to_init(kernel: Path, tmp_path: Path) -> None:
    sandbox = capsa.sandbox().kernel(kernel).initrd(kernel)
    sandbox.share(tmp_path, "/mnt/a b", capsa.MountMode.READ_WRITE).share(tmp_path, "/ro")
    sandbox.virtio_fs(tmp_path, "manual")
    config = sandbox.config()
    assert [s.tag for s in config.shares] == ["share0", "share1", "manual"]
    # Not on the kernel command line: it is set-up, sent to the agent after the start.
    assert not [a for a in config.cmdline.args if a.key.startswith("capsa.")]
    fields = sandbox.guest_setup().fields(config)
    assert fields["mounts"] == [
        ["share0", "/mnt/a b", "rw", "virtiofs"],
        ["share1", "/ro", "ro", "virtiofs"],
    ]


def test_sandbox_setup_carries_env_run_and_a_fresh_machine_id(kernel: Path) -> None:
    sandbox = capsa.sandbox().kernel(kernel).initrd(kernel).env("A", "1,2 3").hostname("h-1")
    sandbox.run("/bin/echo", ["x y"])
    config = sandbox.config()
    one, two = sandbox.guest_setup().fields(config), sandbox.guest_setup().fields(config)
    assert one["env"] == {"A": "1,2 3"} and one["hostname"] == "h-1"
    assert one["run"] == ["/bin/echo", "x y"]
    assert one["machine_id"] != two["machine_id"] and len(str(one["machine_id"])) == 32
    huge = capsa.sandbox().kernel(kernel).initrd(kernel).env("BIG", "x" * (2 << 20))
    with pytest.raises(capsa.InvalidConfig, match="at most"):
        huge.guest_setup().check_size(huge.config())


def test_ownership_round_trips_and_rejects_bad_ids() -> None:
    for o in (
        capsa.Ownership.passthrough(),
        capsa.Ownership.squash(7, 8),
        capsa.Ownership.dynamic_caller(),
    ):
        assert capsa.Ownership.from_arg(o.to_arg()) == o
    with pytest.raises(capsa.InvalidConfig, match="uid"):
        capsa.Ownership.squash(-1, 0)


def test_old_names_still_work(tmp_path: Path) -> None:
    import capsa.config as old

    # The seeds' names and the former module keep working.
    assert capsa.Protocol is capsa.IpProtocol
    assert old.VmConfig is capsa.VmConfig and old.NetworkMode is capsa.NetworkMode
    assert old.UserNatConfig().port().network.gateway is not None
    with pytest.warns(DeprecationWarning, match=r"use DiskImage\(...\).read_only\(\)"):
        disk = capsa.DiskImage(tmp_path / "d.img", read_only=True)
    assert disk == capsa.DiskImage(tmp_path / "d.img").read_only() and disk.is_read_only
    assert not capsa.DiskImage(tmp_path / "d.img").is_read_only


def test_sandbox_share_is_the_seeds_name_for_mount(kernel: Path, tmp_path: Path) -> None:
    shared = capsa.sandbox().kernel(kernel).initrd(kernel).share(tmp_path, "/work").config()
    mounted = capsa.sandbox().kernel(kernel).initrd(kernel).mount(tmp_path, "/work").config()
    assert shared == mounted and shared.shares[0].guest_path == "/work"
    with pytest.raises(capsa.InvalidConfig, match=r"virtio_fs\(host_path, tag\)"):
        capsa.sandbox().share(tmp_path, "a-tag")
