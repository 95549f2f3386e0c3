"""The default userland: a Debian root built locally, where python3, pip, git and curl work
as typed. One sandbox serves every test: a loopback web server stands in for a package
index and a download site, and a host folder holds a git repository."""

from __future__ import annotations

import errno
import hashlib
import http.server
import os
import subprocess
import threading
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import capsa
from capsa import MountMode, NetworkPolicy
from tests.vm.netkit import guest_address

pytestmark = pytest.mark.vm

SITE = "203.0.113.9"  # what the guest dials; the gateway's alias sends it to 127.0.0.1


@dataclass
class Lab:
    sb: capsa.Sandbox
    agent: capsa.AgentClient
    port: int
    value: str  # what the wheel's module holds
    payload: bytes  # what the download site serves
    head: str  # the shared repository's HEAD commit


def make_wheel(folder: Path, value: str) -> Path:
    """A pure-Python wheel whose module holds ``value``."""
    wheel = folder / "demo_pkg-1.0-py3-none-any.whl"
    files = {
        "demo_pkg/__init__.py": f"VALUE = {value!r}\n",
        "demo_pkg-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n",
        "demo_pkg-1.0.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: capsa-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = "".join(f"{name},,\n" for name in files) + "demo_pkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr("demo_pkg-1.0.dist-info/RECORD", record)
    return wheel


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str, bytes]]:
    """A web server on 127.0.0.1: a simple package index with one wheel, and a payload."""
    root = tmp_path_factory.mktemp("site")
    value = os.urandom(8).hex()
    wheel = make_wheel(root, value)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (root / "simple" / "demo-pkg").mkdir(parents=True)
    (root / "simple" / "demo-pkg" / "index.html").write_text(
        f'<a href="/{wheel.name}#sha256={digest}">{wheel.name}</a>\n'
    )
    payload = os.urandom(3 << 20)
    (root / "payload.bin").write_bytes(payload)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], value, payload
    finally:
        server.shutdown()
        server.server_close()


def make_repository(folder: Path) -> str:
    """A git repository with one commit; its HEAD."""
    git = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(folder)], check=True)
    (folder / "hello.txt").write_text("cloned\n")
    subprocess.run([*git, "add", "hello.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    done = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True)
    return done.stdout.strip()


@pytest.fixture(scope="module")
async def lab(
    site: tuple[int, str, bytes], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Lab]:
    port, value, payload = site
    repo = tmp_path_factory.mktemp("repo")
    head = make_repository(repo)
    network = (
        capsa.NetworkMode.user_nat()
        .host_alias(SITE, "127.0.0.1")
        .policy(NetworkPolicy.deny_all().allow_ip(SITE))
    )
    builder = (
        capsa.sandbox()
        .image("debian")
        .network(network.build())
        .share(repo, "/srv/repo", MountMode.READ_ONLY)
    )
    async with await builder.build() as sb:
        agent = await sb.agent(timeout=300)
        await guest_address(agent)
        yield Lab(sb, agent, port, value, payload, head)


async def test_the_userland_has_python_pip_git_curl_and_bash(lab: Lab) -> None:
    r = await lab.agent.exec("python3 -c 'import json, importlib, sqlite3, ssl; print(6 * 7)'")
    assert r.exit_code == 0 and r.stdout == b"42\n"
    for command in ("bash -c 'exit 3'",):
        assert (await lab.agent.exec(command)).exit_code == 3
    for tool in ("pip3 --version", "git --version", "curl --version", "ps -e", "ip -br link"):
        r = await lab.agent.exec(tool)
        assert r.exit_code == 0, (tool, r.stderr)
    r = await lab.agent.exec("test -e /usr/lib/python3*/EXTERNALLY-MANAGED")
    assert r.exit_code == 1  # pip installs as typed
    r = await lab.agent.exec("python3 -m venv /tmp/venv && /tmp/venv/bin/python -c 'import sys'")
    assert r.exit_code == 0, r.stderr


async def test_commands_enter_the_image_as_its_user_in_their_directory(lab: Lab) -> None:
    agent = lab.agent
    # The image's root is where a command runs, in the directory asked for or the image's.
    assert (await agent.exec(["cat", "/etc/debian_version"])).stdout.strip()[:2] == b"13"
    assert (await agent.exec(["pwd"], cwd="/usr/share")).stdout == b"/usr/share\n"
    assert (await agent.exec("pwd")).stdout == b"/root\n"
    r = await agent.exec(["id", "-u"])
    assert (r.exit_code, r.stdout) == (0, b"0\n")
    assert (await agent.exec(["sh", "-c", "exit 5"])).exit_code == 5
    # The command is the process itself: nothing between the agent and it.
    r = await agent.exec(["cat", "/proc/self/cmdline"])
    assert r.stdout == b"cat\0/proc/self/cmdline\0"
    # An absolute symlink or `..` resolve inside the image, as chroot sees them.
    await agent.exec("ln -sfn /usr/share /tmp/abs && mkdir -p /tmp/d")
    assert (await agent.exec(["pwd", "-P"], cwd="/tmp/abs")).stdout == b"/usr/share\n"
    assert (await agent.exec(["pwd"], cwd="/../../tmp/d")).stdout == b"/tmp/d\n"
    # The image's own programs run, by name or through the shell (busybox has applets of
    # the same names: they must not stand in for them).
    for command in (["ls", "--version"], "ls --version", ["/usr/bin/ls", "--version"]):
        assert b"GNU coreutils" in (await agent.exec(command)).stdout, command
    # A program found through an absolute symlink (Debian's alternatives) runs.
    for awk in ("awk", "/usr/bin/awk"):
        assert (await agent.exec([awk, "BEGIN { exit 4 }"])).exit_code == 4
    # A missing program is an error, not a command that fails.
    with pytest.raises(capsa.AgentError) as missing:
        await agent.exec(["no-such-program"])
    assert missing.value.errno == errno.ENOENT
    # So is a program exec refuses: a missing interpreter (or "/bin/sh\r", from a CRLF
    # line), or no "#!" line at all.
    await agent.exec("cd /tmp && printf '#!/usr/bin/python9\\n' > s && echo 'exit 3' > t")
    await agent.exec("printf '#!/bin/sh\\r\\nexit 3\\r\\n' > /tmp/crlf")
    await agent.exec(["chmod", "+x", "/tmp/s", "/tmp/t", "/tmp/crlf"])
    refusals = (("/tmp/s", errno.ENOENT), ("/tmp/t", errno.ENOEXEC), ("/tmp/crlf", errno.ENOENT))
    for script, code in refusals:
        with pytest.raises(capsa.AgentError) as refused:
            await agent.exec([script])
        assert refused.value.errno == code, script


async def test_pip_installs_from_an_index_the_policy_allows(lab: Lab) -> None:
    index = f"http://{SITE}:{lab.port}/simple/"
    r = await lab.agent.exec(
        f"pip install -q --no-cache-dir --trusted-host {SITE} --index-url {index} demo-pkg",
        timeout=180,
    )
    assert r.exit_code == 0, r.stderr
    r = await lab.agent.exec("python3 -c 'import demo_pkg; print(demo_pkg.VALUE)'")
    assert r.exit_code == 0 and r.stdout.decode().strip() == lab.value
    # An index the policy does not name is unreachable.
    r = await lab.agent.exec(
        "pip install -q --timeout 3 --retries 0 --index-url http://203.0.113.10/simple/ x",
        timeout=120,
    )
    assert r.exit_code != 0


async def test_curl_downloads_and_git_clones_from_a_share(lab: Lab) -> None:
    r = await lab.agent.exec(f"curl -sf http://{SITE}:{lab.port}/payload.bin | sha256sum")
    assert r.exit_code == 0
    assert r.stdout.split()[0].decode() == hashlib.sha256(lab.payload).hexdigest()
    r = await lab.agent.exec(
        "git clone -q /srv/repo /root/clone && git -C /root/clone rev-parse HEAD"
    )
    assert r.exit_code == 0, r.stderr
    assert r.stdout.decode().strip() == lab.head
    assert await lab.agent.read_file("/root/clone/hello.txt") == b"cloned\n"


async def test_a_main_process_runs_in_the_image(tmp_path: Path) -> None:
    builder = capsa.sandbox().image("debian").run("/bin/bash", ["-c", "exit $((40 + 2))"])
    async with await builder.build() as sb:
        status = await sb.wait(timeout=120)
    assert status.exit_code == 42
