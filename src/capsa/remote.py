"""Sandboxes held by a ``capsa serve`` server, with the local API's shapes:

    server = await capsa.remote.connect()                 # the default Unix socket
    sb = await server.create(name="ci", labels={"job": "7"})
    agent = await sb.agent()
    result = await agent.exec("uname").arg("-a").run()    # an ExecResult, as locally
    await sb.kill()

``capsa.sync.remote_connect()`` is the same without ``await``. Results are the local API's
own types (``ExecResult``, ``FileStat``, ``DirEntry``, ``Execution``, ``Metrics``), and
the server's errors come back as capsa errors.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Mapping
from pathlib import Path
from typing import Any

import httpx

from capsa.api.agent import DirEntry, FileStat
from capsa.api.code import CodeError, Execution
from capsa.api.metrics import Metrics
from capsa.api.process import CommandOptions, ExecResult
from capsa.errors import (
    AgentError,
    CapsaError,
    InvalidConfig,
    NoCapacity,
    NotRunning,
    SandboxLost,
)
from capsa.server.paths import default_socket

MAX_OUTPUT = 64 << 20  # kept per stream of one exec, as locally


async def connect(
    socket: str | Path | None = None, *, url: str | None = None, token: str | None = None
) -> Remote:
    """A client of the server on ``socket`` (default: the user's), or at ``url`` (TCP,
    with its bearer ``token``)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if url is not None:
        client = httpx.AsyncClient(base_url=url, headers=headers, timeout=None)
    else:
        path = Path(socket) if socket is not None else default_socket()
        transport = httpx.AsyncHTTPTransport(uds=str(path))
        client = httpx.AsyncClient(
            transport=transport, base_url="http://capsa", headers=headers, timeout=None
        )
    remote = Remote(client)
    try:
        await remote.info()
    except httpx.TransportError as e:
        await client.aclose()
        raise NotRunning(
            f"no capsa server at {url or path}: {e} (start one: capsa serve)"
        ) from None
    return remote


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    message = f"server: {detail}"
    if response.status_code in (400, 409, 422):
        raise InvalidConfig(message)
    if response.status_code == 404:
        raise AgentError(message, errno=2)
    if response.status_code == 410:
        raise SandboxLost(message)
    if response.status_code == 503:
        raise NoCapacity(message)
    raise CapsaError(f"{message} (HTTP {response.status_code})")


class Remote:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = await self._client.request(method, path, **kwargs)
        _raise_for(response)
        return response

    async def info(self) -> dict[str, Any]:
        data: dict[str, Any] = (await self._call("GET", "/")).json()
        return data

    async def create(self, name: str | None = None, **options: Any) -> RemoteSandbox:
        """A new sandbox; ``options`` are the server's create fields (image, cpus,
        memory_mb, env, labels, lifetime, idle_timeout, network, policy, shares)."""
        body = {"name": name, **options}
        created = (await self._call("POST", "/sandboxes", json=body)).json()
        return RemoteSandbox(self, created["name"])

    async def get(self, name: str) -> RemoteSandbox:
        await self._call("GET", f"/sandboxes/{name}")
        return RemoteSandbox(self, name)

    async def list(self, label: str | None = None) -> list[dict[str, Any]]:
        params = {"label": label} if label else {}
        found: list[dict[str, Any]] = (await self._call("GET", "/sandboxes", params=params)).json()
        return found

    async def close(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> Remote:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class RemoteSandbox:
    def __init__(self, remote: Remote, name: str) -> None:
        self.remote = remote
        self.name = name
        self._base = f"/sandboxes/{name}"

    async def agent(self) -> RemoteAgent:
        return RemoteAgent(self)

    async def status(self) -> dict[str, Any]:
        data: dict[str, Any] = (await self.remote._call("GET", self._base)).json()
        return data

    async def metrics(self) -> Metrics:
        data = (await self.remote._call("GET", f"{self._base}/metrics")).json()
        data.pop("memory_used", None)
        return Metrics(**data)

    async def run_code(
        self, code: str, language: str = "python", *, context: str | None = None
    ) -> Execution:
        body = {"code": code, "language": language, "context": context}
        data = (await self.remote._call("POST", f"{self._base}/code", json=body)).json()
        error = data["error"]
        return Execution(
            stdout=data["stdout"],
            stderr=data["stderr"],
            result=data["result"],
            displays=data["displays"],
            error=None if error is None else CodeError(**error),
            exit_code=data["exit_code"],
            truncated=data["truncated"],
        )

    async def logs(self, tail: int = 65536) -> str:
        """The end of the sandbox's console."""
        response = await self.remote._call("GET", f"{self._base}/logs", params={"tail": tail})
        return response.text

    async def kill(self) -> None:
        await self.remote._call("DELETE", self._base)

    async def __aenter__(self) -> RemoteSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()


class RemoteAgent:
    def __init__(self, sandbox: RemoteSandbox) -> None:
        self._sandbox = sandbox
        self._remote = sandbox.remote
        self._base = sandbox._base

    def exec(
        self,
        cmd: str,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
        *,
        check: bool = False,
    ) -> RemoteExec:
        return RemoteExec(self, cmd, env, cwd, timeout, stdin, check)

    async def read_file(self, path: str) -> bytes:
        response = await self._remote._call("GET", f"{self._base}/files", params={"path": path})
        return response.content

    async def write_file(self, path: str, data: bytes) -> None:
        await self._remote._call("PUT", f"{self._base}/files", params={"path": path}, content=data)

    async def list_dir(self, path: str) -> list[DirEntry]:
        entries = (
            await self._remote._call("GET", f"{self._base}/ls", params={"path": path})
        ).json()
        return [DirEntry(**entry) for entry in entries]

    async def stat(self, path: str) -> FileStat:
        data = (await self._remote._call("GET", f"{self._base}/stat", params={"path": path})).json()
        return FileStat(**data)

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
        except AgentError as e:
            if e.errno == 2:
                return False
            raise
        return True


class RemoteExec(CommandOptions):
    """``exec`` through the server, awaitable or refined first (``arg``, ``env``...)."""

    def __init__(
        self,
        agent: RemoteAgent,
        cmd: str,
        env: Mapping[str, str] | None,
        cwd: str | None,
        timeout: float | None,
        stdin: bytes | None,
        check: bool,
    ) -> None:
        super().__init__(cmd, env, cwd, timeout, stdin, check)
        self._agent = agent

    async def run(self) -> ExecResult:
        body: dict[str, Any] = {"env": self._env, "cwd": self._cwd, "timeout": self._timeout}
        body["stdin"] = self._stdin.decode()
        if self._args:
            body["argv"] = [self._cmd, *self._args]
        else:
            body["cmd"] = self._cmd
        out, err = bytearray(), bytearray()
        end: dict[str, Any] = {}
        remote = self._agent._remote
        async with remote._client.stream(
            "POST", f"{self._agent._base}/exec", json=body
        ) as response:
            if not response.is_success:
                await response.aread()
                _raise_for(response)
            async for line in response.aiter_lines():
                event = json.loads(line)
                kept = out if event["t"] == "stdout" else err if event["t"] == "stderr" else None
                if kept is None:
                    end = event
                elif len(kept) < MAX_OUTPUT:
                    kept += _bytes_of(event)
        if not end:
            raise CapsaError("server: the exec stream ended without an exit status")
        result = ExecResult(bytes(out), bytes(err), end["exit_code"], end["timed_out"])
        failure = self._failure(result)
        if failure is not None:
            raise failure
        return result

    def __await__(self) -> Generator[Any, None, ExecResult]:
        return self.run().__await__()


def _bytes_of(event: dict[str, Any]) -> bytes:
    import base64

    if "b64" in event:
        return base64.b64decode(event["b64"])
    return str(event.get("text", "")).encode()
