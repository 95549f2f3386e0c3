"""``capsa serve`` through real HTTP (httpx) on its Unix socket and on TCP with a token:
named sandboxes shared by clients, streamed exec, files, code, metrics, authentication, a
client that goes away mid-stream, and a server that dies (its sandboxes with it)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.vm


@dataclass
class Server:
    process: subprocess.Popen[str]
    runtime: Path
    socket: Path | None = None
    url: str = "http://capsa"
    token: str | None = None

    def client(self, token: str | None = None) -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(uds=str(self.socket)) if self.socket else None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(
            transport=transport, base_url=self.url, headers=headers, timeout=300
        )


# Every server a test starts; one a test left running is stopped when that test ends.
STARTED: list[subprocess.Popen[str]] = []


def _die_with_parent() -> None:
    """In the server's child process: end it with SIGTERM if the test process dies."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


@pytest.fixture(autouse=True)
def _no_server_outlives_its_test() -> Iterator[None]:
    before = len(STARTED)
    yield
    for process in STARTED[before:]:
        if process.poll() is None:
            process.terminate()
            process.wait(60)
    del STARTED[before:]


def start_server(runtime: Path, *args: str, share: Path | None = None) -> Server:
    (runtime / "rt").mkdir(exist_ok=True)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "CAPSA_RUNTIME_DIR": str(runtime / "rt")}
    extra = ["--allow-share", str(share)] if share else []
    process = subprocess.Popen(
        [sys.executable, "-m", "capsa.cli", "serve", *args, *extra],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=_die_with_parent,
    )
    STARTED.append(process)
    assert process.stderr is not None
    line = process.stderr.readline()  # "capsa: serving on ..."
    assert "serving on" in line, line
    server = Server(process, runtime)
    if "unix socket" in line:
        server.socket = Path(line.rsplit(" ", 1)[1].strip())
    else:
        server.url = line.split()[3]
        server.token = line.split("Bearer ")[1].rstrip(")\n")
    return server


def server_qemus(server: Server) -> set[int]:
    """The QEMU processes the server started."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)
                comm = (entry / "comm").read_text()
            except OSError:
                continue
            state, ppid = fields[1].split()[:2]
            if state != "Z" and int(ppid) == server.process.pid and "qemu" in comm:
                found.add(int(entry.name))
    return found


def stop(server: Server, sig: int = signal.SIGTERM) -> None:
    if server.process.poll() is None:
        server.process.send_signal(sig)
        server.process.wait(60)


@pytest.fixture(scope="module")
def unix_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    runtime = tmp_path_factory.mktemp("run")
    share = tmp_path_factory.mktemp("allowed")
    (share / "note.txt").write_text("shared\n")
    server = start_server(runtime, share=share)
    server.runtime = share  # where shares may come from
    yield server
    stop(server)


@pytest.fixture
async def client(unix_server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with unix_server.client() as c:
        yield c


async def _exec(client: httpx.AsyncClient, name: str, **body: object) -> tuple[str, str, dict]:
    out = err = ""
    end: dict = {}
    async with client.stream("POST", f"/sandboxes/{name}/exec", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            event = json.loads(line)
            if event["t"] == "stdout":
                out += event["text"]
            elif event["t"] == "stderr":
                err += event["text"]
            else:
                end = event
    return out, err, end


async def test_a_named_sandbox_shared_by_two_clients(unix_server: Server) -> None:
    assert stat.S_IMODE(unix_server.socket.stat().st_mode) == 0o600  # type: ignore[union-attr]
    async with unix_server.client() as a, unix_server.client() as b:
        assert (await a.get("/openapi.json")).json()["info"]["title"] == "capsa"
        created = await a.post(
            "/sandboxes",
            json={
                "name": "shared",
                "labels": {"team": "x"},
                "shares": [{"host_path": str(unix_server.runtime), "guest_path": "/mnt/in"}],
            },
        )
        assert created.status_code == 201, created.text
        assert (await a.post("/sandboxes", json={"name": "shared"})).status_code == 409
        put = await b.put("/sandboxes/shared/files", params={"path": "/tmp/d/f"}, content=b"x" * 3)
        assert put.status_code == 204
        got = await a.get("/sandboxes/shared/files", params={"path": "/tmp/d/f"})
        assert got.content == b"xxx"
        assert (await a.get("/sandboxes/shared/files", params={"path": "/nope"})).status_code == 404
        tar = await a.get("/sandboxes/shared/tar", params={"path": "/tmp/d"})
        put_tar = await b.put(
            "/sandboxes/shared/tar", params={"path": "/tmp/e"}, content=tar.content
        )
        assert put_tar.status_code == 204
        copied = await a.get("/sandboxes/shared/files", params={"path": "/tmp/e/f"})
        assert copied.content == b"xxx"  # through a tar stream both ways
        listing = (await b.get("/sandboxes/shared/ls", params={"path": "/tmp/d"})).json()
        assert [(e["name"], e["size"]) for e in listing] == [("f", 3)]
        out, err, end = await _exec(b, "shared", cmd="cat /mnt/in/note.txt; echo e >&2; exit 3")
        assert (out, err, end["exit_code"]) == ("shared\n", "e\n", 3)
        out, _, end = await _exec(a, "shared", argv=["wc", "-c"], stdin="12345")
        assert out.strip() == "5" and end["exit_code"] == 0
        names = [s["name"] for s in (await b.get("/sandboxes", params={"label": "team=x"})).json()]
        assert names == ["shared"]
        assert (await b.get("/sandboxes", params={"label": "team=y"})).json() == []
        code = await a.post(
            "/sandboxes/shared/code",
            json={"code": "X=4; echo $((X*X))", "language": "bash", "context": "c1"},
        )
        assert code.json()["stdout"] == "16\n"
        again = await b.post(
            "/sandboxes/shared/code", json={"code": "echo $X", "language": "bash", "context": "c1"}
        )
        assert again.json()["stdout"] == "4\n"  # one context, two clients
        usage = (await a.get("/sandboxes/shared/metrics")).json()
        assert usage["memory_total"] > 0 and usage["memory_used"] > 0
        assert len(server_qemus(unix_server)) == 1
        assert (await b.delete("/sandboxes/shared")).status_code == 204
        assert (await a.get("/sandboxes/shared")).status_code == 404
        assert server_qemus(unix_server) == set()


async def test_bad_requests_get_clear_statuses(client: httpx.AsyncClient) -> None:
    assert (await client.post("/sandboxes", json={"name": "Bad Name"})).status_code == 422
    assert (await client.post("/sandboxes", json={"cpus": 0})).status_code == 422
    outside = {"shares": [{"host_path": "/etc", "guest_path": "/mnt/etc"}]}
    response = await client.post("/sandboxes", json=outside)
    assert response.status_code == 403 and "outside its roots" in response.text
    assert (await client.post("/sandboxes/none/exec", json={"cmd": "true"})).status_code == 404


async def test_concurrent_clients_and_one_that_leaves_mid_stream(unix_server: Server) -> None:
    async with unix_server.client() as c:
        assert (await c.post("/sandboxes", json={"name": "busy"})).status_code == 201

    async def one(i: int) -> str:
        async with unix_server.client() as own:
            out, _, _ = await _exec(own, "busy", cmd=f"echo $(({i} * {i}))")
            return out

    results = await asyncio.gather(*(one(i) for i in range(10)))
    assert results == [f"{i * i}\n" for i in range(10)]
    async with unix_server.client() as leaving:
        body = {"cmd": "echo started; exec sleep 307"}
        async with leaving.stream("POST", "/sandboxes/busy/exec", json=body) as response:
            lines = response.aiter_lines()
            assert json.loads(await anext(lines))["text"] == "started\n"
        # closed mid-stream: the server kills the command
    async with unix_server.client() as c:
        for _ in range(50):
            out, _, _ = await _exec(c, "busy", cmd="ps -o args | grep -c '^sleep 307'")
            if out.strip() == "0":
                break
            await asyncio.sleep(0.2)
        assert out.strip() == "0"
        assert (await c.delete("/sandboxes/busy")).status_code == 204


async def test_tcp_needs_the_token(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--port", "0")
    try:
        async with server.client() as anonymous, server.client("wrong") as wrong:
            assert (await anonymous.get("/")).status_code == 401
            assert (await wrong.get("/sandboxes")).status_code == 401
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus

        with pytest.raises(InvalidStatus, match="401"):
            async with connect(server.url.replace("http", "ws") + "/sandboxes/t/shell"):
                pass
        async with server.client(server.token) as c:
            assert (await c.get("/")).json()["sandboxes"] == 0
            assert (await c.post("/sandboxes", json={"name": "t"})).status_code == 201
            out, _, end = await _exec(c, "t", cmd="echo over tcp")
            assert out == "over tcp\n" and end["exit_code"] == 0
    finally:
        stop(server)


async def test_sandboxes_die_with_the_server_and_a_restart_names_them(tmp_path: Path) -> None:
    mode = tmp_path.stat().st_mode
    server = start_server(tmp_path, "--socket", str(tmp_path / "s.sock"))
    assert tmp_path.stat().st_mode == mode  # a folder it did not make keeps its mode
    async with server.client() as c:
        assert (await c.post("/sandboxes", json={"name": "doomed"})).status_code == 201
    (qemu,) = server_qemus(server)
    stop(server, signal.SIGKILL)  # no chance to clean up
    deadline = time.monotonic() + 30
    while (Path(f"/proc/{qemu}").exists() or any((tmp_path / "rt").iterdir())) and (
        time.monotonic() < deadline
    ):
        await asyncio.sleep(0.2)
    assert not Path(f"/proc/{qemu}").exists()  # its QEMU went with it
    assert list((tmp_path / "rt").iterdir()) == []  # and its files
    again = start_server(tmp_path, "--socket", str(tmp_path / "s.sock"))
    try:
        async with again.client() as c:
            info = (await c.get("/")).json()
            assert info["lost"] == ["doomed"] and info["sandboxes"] == 0
    finally:
        stop(again)
    assert not (tmp_path / "s.sock").exists()


async def test_the_remote_client_has_the_local_shapes(unix_server: Server) -> None:
    import capsa
    import capsa.remote
    import capsa.sync

    remote = await capsa.remote.connect(unix_server.socket)
    try:
        sb = await remote.create(name="remote", labels={"via": "client"})
        agent = await sb.agent()
        result = await agent.exec("uname").arg("-m").run()
        assert isinstance(result, capsa.ExecResult) and result.stdout.strip() == b"x86_64"
        assert (await agent.exec("echo $V; exit 4", env={"V": "set"})).exit_code == 4
        with pytest.raises(capsa.ProcessError):
            await agent.exec("exit 9", check=True).run()
        await agent.write_file("/tmp/r/file", b"\x00\x01binary")
        assert await agent.read_file("/tmp/r/file") == b"\x00\x01binary"
        assert [e.name for e in await agent.list_dir("/tmp/r")] == ["file"]
        assert (await agent.stat("/tmp/r/file")).size == 8
        assert await agent.exists("/tmp/r/file") and not await agent.exists("/tmp/r/none")
        code = await sb.run_code("echo $((3 + 4))", "bash")
        assert isinstance(code, capsa.Execution) and code.stdout == "7\n"
        assert (await sb.metrics()).memory_total > 0
        assert [s["name"] for s in await remote.list(label="via=client")] == ["remote"]
        await sb.kill()
        with pytest.raises(capsa.AgentError):
            await remote.get("remote")
    finally:
        await remote.close()
    with pytest.raises(capsa.NotRunning, match="capsa serve"):
        await capsa.remote.connect(unix_server.socket.with_name("none.sock"))  # type: ignore[union-attr]

    def sync_use() -> bytes:
        server = capsa.sync.remote_connect(unix_server.socket)
        with server.create(name="from-sync") as sandbox:
            out: bytes = sandbox.agent().exec("echo sync").run().stdout
        server.close()
        return out

    import asyncio as _asyncio

    assert await _asyncio.to_thread(sync_use) == b"sync\n"


def test_the_cli_verbs_drive_the_server(unix_server: Server, tmp_path: Path) -> None:
    def capsa_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "capsa.cli", *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        if check:
            assert done.returncode == 0, done.stderr
        return done

    sock = ["--socket", str(unix_server.socket)]
    assert capsa_cli("create", "--name", "cli", "--label", "k=v", *sock).stdout == "cli\n"
    assert capsa_cli("ps", "--label", "k=v", *sock).stdout.split()[0] == "cli"
    ran = capsa_cli("exec", "--in", "cli", *sock, "--", "sh", "-c", "echo hi; exit 3", check=False)
    assert (ran.returncode, ran.stdout) == (3, "hi\n")
    (tmp_path / "up.txt").write_text("uploaded")
    capsa_cli("cp", str(tmp_path / "up.txt"), "cli:/root/up.txt", *sock)
    capsa_cli("cp", "cli:/root/up.txt", str(tmp_path / "down.txt"), *sock)
    assert (tmp_path / "down.txt").read_text() == "uploaded"
    capsa_cli("exec", "--in", "cli", *sock, "--", "sh", "-c", "echo console-mark > /dev/console")
    assert "console-mark" in capsa_cli("logs", "cli", *sock).stdout
    capsa_cli("rm", "cli", *sock)
    gone = capsa_cli("rm", "cli", *sock, check=False)
    assert gone.returncode != 0 and "no sandbox named 'cli'" in gone.stderr
    missing = capsa_cli("ps", "--socket", str(tmp_path / "none.sock"), check=False)
    assert missing.returncode != 0 and "capsa serve" in missing.stderr


async def test_an_interactive_shell_over_a_websocket(unix_server: Server) -> None:
    from websockets.asyncio.client import unix_connect

    async with unix_server.client() as c:
        assert (await c.post("/sandboxes", json={"name": "tty"})).status_code == 201
    uri = "ws://capsa/sandboxes/tty/shell?rows=33&cols=101"
    async with unix_connect(str(unix_server.socket), uri) as ws:
        await ws.send(b"stty size; echo $((6 * 7)); exit 3\n")
        screen, end = b"", {}
        async for message in ws:
            if isinstance(message, bytes):
                screen += message
            else:
                end = json.loads(message)
    assert b"33 101" in screen and b"42" in screen and end == {"exit_code": 3}
    async with unix_server.client() as c:
        assert (await c.delete("/sandboxes/tty")).status_code == 204


def test_capsa_shell_in_a_server_sandbox(unix_server: Server) -> None:
    sock = ["--socket", str(unix_server.socket)]
    argv = [sys.executable, "-m", "capsa.cli"]
    created = subprocess.run([*argv, "create", "--name", "sh", *sock], capture_output=True)
    assert created.returncode == 0, created.stderr
    # stdin is not a terminal here: keystrokes are piped, the exit code comes back.
    done = subprocess.run(
        [*argv, "shell", "--in", "sh", *sock],
        input=b"echo $((6 * 7)); exit 5\n",
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 5 and b"42" in done.stdout
    subprocess.run([*argv, "rm", "sh", *sock], check=True, capture_output=True)


async def test_pause_and_resume_keep_a_named_sandbox(client: httpx.AsyncClient) -> None:
    assert (await client.post("/sandboxes", json={"name": "nap"})).status_code == 201
    _, _, end = await _exec(
        client, "nap", cmd="echo kept > /tmp/s; (sleep 3600 & echo $! > /tmp/p)"
    )
    assert end["exit_code"] == 0
    paused = await client.post("/sandboxes/nap/pause")
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    refused = await client.post("/sandboxes/nap/exec", json={"cmd": "true"})
    assert refused.status_code == 409 and "resume it first" in refused.text
    resumed = await client.post("/sandboxes/nap/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "running"
    out, _, end = await _exec(client, "nap", cmd="cat /tmp/s && kill -0 $(cat /tmp/p) && echo up")
    assert (out, end["exit_code"]) == ("kept\nup\n", 0)
    assert (await client.post("/sandboxes/nap/resume")).status_code == 409
    assert (await client.delete("/sandboxes/nap")).status_code == 204
