"""A wheel of capsa, installed into a new virtual environment, boots a sandbox: the guest
code travels as package data, nothing is read from the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from capsa.images.kernel import default_kernel

pytestmark = pytest.mark.vm
ROOT = Path(__file__).resolve().parents[2]


def _run(*argv: str | Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=600, env=env, cwd="/"
    )
    return proc.returncode, proc.stdout.strip(), proc.stderr


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    dist, venv, project = work / "dist", work / "venv", work / "project"
    # A copy, so the build's scratch files stay out of the checkout.
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    # Offline: the test environment's setuptools builds it, no index is asked.
    code, _, err = _run(
        sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", dist, project
    )
    assert code == 0, err
    (wheel,) = dist.glob("capsa-*.whl")
    code, _, err = _run(getattr(sys, "_base_executable", sys.executable), "-m", "venv", venv)
    assert code == 0, err
    # capsa's dependencies come from the test environment, added as a path (so its editable
    # capsa finder is not loaded); capsa itself only from the wheel.
    _, site, _ = _run(venv / "bin/python", "-c", PURELIB)
    (Path(site) / "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code, _, err = _run(
        venv / "bin/python", "-m", "pip", "install", "--no-index", "--no-deps", wheel
    )
    assert code == 0, err
    return venv


PURELIB = "import sysconfig; print(sysconfig.get_paths()['purelib'])"


def test_the_wheel_runs_a_sandbox_from_its_own_files(wheel_venv: Path) -> None:
    _, where, _ = _run(wheel_venv / "bin/python", "-c", "import capsa; print(capsa.__file__)")
    assert Path(where).is_relative_to(wheel_venv)
    env = {**os.environ, "PATH": f"{wheel_venv / 'bin'}:{os.environ['PATH']}"}
    code, release, err = _run(wheel_venv / "bin/capsa", "exec", "--", "uname", "-r", env=env)
    assert code == 0, err
    assert release == default_kernel().version
    code, _, _ = _run(wheel_venv / "bin/capsa", "exec", "--", "sh", "-c", "exit 42", env=env)
    assert code == 42
