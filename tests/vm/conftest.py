"""Fixtures that boot real VMs: the default kernel and a busybox shell initramfs."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import capsa
from capsa.images.kernel import KernelImage, default_kernel
from capsa.images.shell import MARKER, shell_initramfs
from tests.conftest import leftovers, qemu_children


@pytest.fixture(scope="session")
def kernel() -> KernelImage:
    return default_kernel()


@pytest.fixture(scope="session")
def shell_initrd(kernel: KernelImage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shell_initramfs(kernel, tmp_path_factory.mktemp("img") / "shell.cpio")


@pytest.fixture(scope="session")
def shell_boot(kernel: KernelImage, shell_initrd: Path) -> capsa.LinuxDirectBoot:
    return capsa.LinuxDirectBoot(kernel.path, shell_initrd)


async def boot_shell(builder: capsa.VmBuilder) -> tuple[capsa.VmHandle, capsa.Console]:
    vm = await builder.console_enabled().build()
    console = await vm.console()
    await console.wait_for(MARKER, timeout=60)
    await console.wait_for("# ", timeout=30)
    return vm, console


@pytest.fixture(scope="module")
async def shell_vm(
    shell_boot: capsa.LinuxDirectBoot,
) -> AsyncIterator[tuple[capsa.VmHandle, capsa.Console]]:
    """One booted shell VM shared by the tests of a module (they must leave it running)."""
    vm, console = await boot_shell(capsa.vm(shell_boot).timeout(60))
    yield vm, console
    await vm.kill()


@pytest.fixture(autouse=True)
def _no_new_leaks() -> Iterator[None]:
    before_procs, before_files = set(qemu_children()), set(leftovers())
    yield
    assert set(qemu_children()) <= before_procs, "a test leaked a QEMU process"
    assert set(leftovers()) <= before_files, "a test leaked files in the runtime dir"


def disk_file(path: Path, size: int = 1 << 20, content: bytes = b"") -> Path:
    with open(path, "wb") as f:
        f.write(content)
        f.truncate(size)
    return path


def skip_without(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")
