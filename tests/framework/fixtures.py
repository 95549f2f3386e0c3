"""Fixtures for tests that boot real VMs (tests/vm, tests/security): the default kernel, a
busybox shell initramfs, the VM factories, and the per-test leak check. Each such test
directory's conftest imports them all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import capsa
from capsa.images.kernel import KernelImage, default_kernel
from capsa.images.shell import MARKER, shell_initramfs
from tests.conftest import leftovers, qemu_children
from tests.framework.factory import VmFactory


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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[pytest.TestReport]:
    """A failed test's report carries the console tail of every VM it used (its own and
    its module's), as Firecracker's framework keeps a failed microVM's logs."""
    report = yield
    if report.failed:
        for node in (item, item.getparent(pytest.Module)):
            for factory in getattr(node, "capsa_factories", []):
                for name, tail in factory.keep_console_tails().items():
                    report.sections.append((f"console of {name}", tail))
    return report


async def _owned(request: pytest.FixtureRequest) -> AsyncIterator[VmFactory]:
    factory = VmFactory(request.node.nodeid, Path(tempfile.mkdtemp(prefix="capsa-factory-")))
    request.node.capsa_factories = [*getattr(request.node, "capsa_factories", []), factory]
    try:
        yield factory
    finally:
        await factory.close()
        shutil.rmtree(factory.scratch, ignore_errors=True)


@pytest.fixture
async def vm_factory(request: pytest.FixtureRequest) -> AsyncIterator[VmFactory]:
    """Builds this test's VMs and sandboxes, and kills them all when it ends."""
    async for factory in _owned(request):
        yield factory


@pytest.fixture(scope="module")
async def module_vm_factory(request: pytest.FixtureRequest) -> AsyncIterator[VmFactory]:
    """The same for VMs a module's tests share."""
    async for factory in _owned(request):
        yield factory


@pytest.fixture(autouse=True)
def no_new_leaks() -> Iterator[None]:
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
