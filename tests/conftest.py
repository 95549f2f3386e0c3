"""Shared test set-up: a private runtime dir per worker, and a leak check around every test."""

from __future__ import annotations

import atexit
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

# Short and private: Unix socket paths must stay under 108 bytes, and the leak check
# looks for anything capsa left behind in here.
_worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
RUNTIME_DIR = Path(tempfile.mkdtemp(prefix=f"capsa-t-{_worker}-"))
RUNTIME_DIR.chmod(0o711)  # run as root, capsa's unprivileged helpers must get through
os.environ["CAPSA_RUNTIME_DIR"] = str(RUNTIME_DIR)
# Most VM tests are about capsa's own machinery and run on the busybox image, which boots
# fastest; tests/vm/test_debian_image.py covers the default Debian userland.
os.environ.setdefault("CAPSA_SANDBOX_IMAGE", "minimal")


def _remove_if_empty() -> None:
    # The xdist controller imports this file but runs no test; its directory stays empty.
    # A non-empty directory is a leak and is left for inspection.
    if RUNTIME_DIR.is_dir() and not any(RUNTIME_DIR.iterdir()):
        RUNTIME_DIR.rmdir()


atexit.register(_remove_if_empty)

from capsa.backends.qemu.accel import SlowAccelWarning  # noqa: E402

warnings.simplefilter("ignore", SlowAccelWarning)


def qemu_children() -> list[int]:
    """QEMU and the device and network helpers started by this test process (our children)."""
    me = str(os.getpid())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = stat.rsplit(")", 1)[1].split()[1]
        state = stat.rsplit(")", 1)[1].split()[0]
        ours = b"qemu-system" in cmd or b"capsa.devices." in cmd or b"capsa.net." in cmd
        if ppid == me and ours and state != "Z":
            found.append(int(entry.name))
    return found


def leftovers() -> list[str]:
    """What capsa left in our runtime dir, and RAM/snapshot dirs of ours on /dev/shm."""
    ours = [p.name for p in RUNTIME_DIR.iterdir()]
    shm = Path("/dev/shm")
    if shm.is_dir():
        mine = (f"capsa-ram-{os.getpid()}-", f"capsa-snap-{os.getpid()}-")
        ours += [p.name for p in shm.iterdir() if p.name.startswith(mine)]
    return sorted(ours)


@pytest.fixture(scope="session", autouse=True)
def _session_leak_check() -> Iterator[None]:
    yield
    # Every fixture is torn down by now: nothing of capsa's may remain.
    assert qemu_children() == [], "QEMU processes outlived the test session"
    assert leftovers() == [], f"files left in the runtime dir: {leftovers()}"
