"""The `capsa` command line, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm


def capsa(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "capsa.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_exec_streams_output_and_returns_the_exit_code() -> None:
    r = capsa("exec", "-e", "GREETING=hi", "--", "sh", "-c", 'echo "$GREETING $((6 * 7))"; exit 7')
    assert r.returncode == 7, r.stderr
    assert r.stdout == "hi 42\n"


def test_exec_makes_a_template_once_and_template_commands_manage_it(tmp_path: Path) -> None:
    env = {"CAPSA_TEMPLATE_DIR": str(tmp_path)}
    first = capsa("exec", "--", "cat", "/run/capsa/template", env=env)
    assert first.returncode == 0 and "making a template" in first.stderr
    second = capsa("exec", "--", "cat", "/run/capsa/template", env=env)
    assert second.returncode == 0 and "making a template" not in second.stderr
    (row,) = json.loads(capsa("template", "ls", "--json", env=env).stdout)
    # Both commands ran in memory saved once: the nonce the maker wrote is in each.
    assert first.stdout == second.stdout == row["nonce"] + "\n"
    assert row["size_bytes"] > 0 and row["identity"]["capsa"]
    assert capsa("template", "prune", env=env).stdout.startswith("removed 0 template")
    assert capsa("template", "rm", "nope", env=env).returncode != 0
    removed = capsa("template", "rm", "--all", env=env)
    assert removed.returncode == 0 and removed.stdout == "removed 1 template(s)\n"
    assert json.loads(capsa("template", "ls", "--json", env=env).stdout) == []


def test_exec_timeout_kills_the_command() -> None:
    r = capsa("exec", "--timeout", "1", "--", "sleep", "60")
    assert r.returncode == 137 and "timed out" in r.stderr


def test_backends_json_reports_the_accelerator_and_why() -> None:
    r = capsa("backends", "--json")
    assert r.returncode == 0
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    qemu, vfkit = rows["qemu"], rows["vfkit"]
    assert qemu["available"] and qemu["default"] and qemu["accelerator"] in ("kvm", "tcg")
    assert qemu["accelerator_reason"]
    # On Linux vfkit is listed, unavailable, and says why.
    assert not vfkit["available"] and "macOS" in vfkit["reason"] and not vfkit["default"]


def test_run_without_console_waits_for_the_guest(tmp_path: object) -> None:
    # busybox as init, told to power off at once: capsa run returns the exit status 0.
    r = capsa("run", "--no-console", "--cmdline", "rdinit=/bin/busybox -- poweroff -f")
    assert r.returncode == 0, r.stderr


def test_bad_memory_is_a_usage_error() -> None:
    r = capsa("run", "--memory", "lots")
    assert r.returncode != 0 and "invalid memory size" in r.stderr


def test_image_info_lists_the_cached_image() -> None:
    assert capsa("image", "build").returncode == 0
    r = capsa("image", "info")
    assert r.returncode == 0 and "sandbox-" in r.stdout
