"""``capsa serve``: sandboxes owned by one server process, reached over HTTP+JSON.

Every sandbox has a name and dies with the server. The server keeps the names it holds
in a state file while it runs; a server that finds one from a server that did not shut
down cleanly reports those sandboxes as lost (``GET /``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response, WebSocket
from fastapi.requests import HTTPConnection
from fastapi.responses import StreamingResponse
from starlette.websockets import WebSocketDisconnect

import capsa
from capsa.api.code import CodeContext, Execution
from capsa.server.backing import Backing, local_only, node_of
from capsa.server.mcp import McpPolicy, create_mcp
from capsa.server.models import (
    CodeRequest,
    CodeResult,
    CreateRequest,
    ExecRequest,
    PolicySpec,
    SandboxInfo,
    ServerInfo,
)

if TYPE_CHECKING:
    from capsa.server.backing import AnySandbox

MAX_UPLOAD = 1 << 30
MAX_CONTEXTS = 16  # per sandbox


@dataclass
class Entry:
    name: str
    sandbox: AnySandbox
    labels: dict[str, str]
    image: str
    created: float
    contexts: dict[str, CodeContext] = field(default_factory=dict)
    paused: Path | None = None  # where pause() saved it, until resume

    def info(self) -> SandboxInfo:
        expired, status = None, "running"  # a cluster sandbox: its calls say if it is lost
        if isinstance(self.sandbox, capsa.Sandbox):
            status = self.sandbox.status().state.value
            expired = None if self.sandbox.expired is None else str(self.sandbox.expired)
        return SandboxInfo(
            name=self.name,
            labels=self.labels,
            image=self.image,
            created=self.created,
            status="paused" if self.paused else status,
            expired=expired,
            node=node_of(self.sandbox),
        )


@dataclass
class ServerOptions:
    token: str | None = None  # required as a bearer token when set (TCP)
    share_roots: tuple[Path, ...] = ()  # shares only below these host folders
    max_sandboxes: int = 64
    state_file: Path | None = None
    # Removed at shutdown, by the app: uvicorn re-raises the stopping signal afterwards.
    socket_path: Path | None = None
    mcp: McpPolicy | None = None  # serve MCP (streamable HTTP) at /mcp within these limits
    ray_address: str | None = None  # run the sandboxes on this Ray cluster ("auto": ours)
    ray_resource: str | None = None  # only on its nodes with this custom resource


class Registry:
    """The sandboxes this server owns, by name."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.entries: dict[str, Entry] = {}
        self.starting: set[str] = set()  # names reserved while their sandboxes start
        self.lock = asyncio.Lock()
        self.lost = self._lost_from_state()
        self.backing = Backing(options.ray_address, options.ray_resource)

    def _lost_from_state(self) -> list[str]:
        path = self.options.state_file
        if path is None or not path.exists():
            return []
        try:
            names = json.loads(path.read_text()).get("sandboxes", [])
        except (OSError, ValueError):
            return []
        return [str(n) for n in names]

    def save_state(self) -> None:
        path = self.options.state_file
        if path is not None:
            state = {"pid": os.getpid(), "sandboxes": sorted(self.entries)}
            scratch = path.with_suffix(".tmp")
            scratch.write_text(json.dumps(state))
            os.replace(scratch, path)

    def get(self, name: str) -> Entry:
        entry = self.entries.get(name)
        if entry is None:
            if name in self.starting:
                raise HTTPException(409, f"sandbox {name!r} is still starting")
            raise HTTPException(404, f"no sandbox named {name!r}")
        return entry

    async def create(self, request: CreateRequest) -> Entry:
        builder = self._builder(request)
        async with self.lock:
            held = len(self.entries) + len(self.starting)
            if held >= self.options.max_sandboxes:
                raise HTTPException(429, f"this server holds {held} sandboxes")
            name = request.name or f"sb-{secrets.token_hex(4)}"
            if name in self.entries or name in self.starting:
                raise HTTPException(409, f"a sandbox named {name!r} exists")
            self.starting.add(name)
        try:
            sandbox = await builder.build()
            await sandbox.agent()
        finally:
            self.starting.discard(name)
        entry = Entry(name, sandbox, request.labels, request.image or "default", time.time())
        self.entries[name] = entry
        self.save_state()
        return entry

    def _builder(self, request: CreateRequest) -> Any:
        builder = self.backing.builder().cpus(request.cpus).memory_mb(request.memory_mb)
        if request.image is not None:
            builder.image(request.image)
        if request.packages:
            builder.packages(*request.packages)
        for key, value in request.env.items():
            builder.env(key, value)
        if request.lifetime is not None:
            builder.lifetime(request.lifetime)
        if request.idle_timeout is not None:
            builder.idle_timeout(request.idle_timeout)
        if request.network == "user_nat":
            mode = capsa.NetworkMode.user_nat()
            if request.policy is not None:
                mode.policy(_policy(request.policy))
            builder.network(mode.build())
        if request.shares and self.backing.on_cluster:
            raise HTTPException(400, "shares name this machine's folders: not on a Ray cluster")
        for share in request.shares:
            host = self._allowed_share(share.host_path)
            mode_ = capsa.MountMode.READ_ONLY if share.read_only else capsa.MountMode.READ_WRITE
            builder.share(host, share.guest_path, mode_)
        return builder

    def _allowed_share(self, host_path: str) -> Path:
        path = Path(host_path).resolve()
        if not any(path == root or root in path.parents for root in self.options.share_roots):
            raise HTTPException(403, f"this server shares no folder outside its roots: {path}")
        return path

    async def delete(self, name: str) -> None:
        entry = self.get(name)
        self.entries.pop(name, None)
        await _end(entry)
        self.save_state()

    async def pause(self, name: str) -> Entry:
        entry = _ready(self, name)
        folder = self.paused_folder() / name
        for ctx in entry.contexts.values():
            with contextlib.suppress(Exception):
                await ctx.close()
        entry.contexts.clear()
        await local_only(entry.sandbox, "pause").pause(folder)
        entry.paused = folder
        return entry

    async def resume(self, name: str) -> Entry:
        entry = self.get(name)
        if entry.paused is None:
            raise HTTPException(409, f"sandbox {name!r} is not paused")
        resumed = await capsa.resume(entry.paused)
        assert isinstance(resumed, capsa.Sandbox)
        entry.sandbox, entry.paused = resumed, None
        return entry

    def paused_folder(self) -> Path:
        base = self.options.state_file.parent if self.options.state_file else Path("/tmp")
        folder = base / f"paused-{os.getpid()}"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        return folder

    async def close(self) -> None:
        for name in list(self.entries):
            await _end(self.entries.pop(name))
        path = self.options.state_file
        if path is not None:
            path.unlink(missing_ok=True)


async def _end(entry: Entry) -> None:
    """A sandbox gone for good: its contexts, its VM, a paused copy."""
    for ctx in entry.contexts.values():
        with contextlib.suppress(Exception):
            await ctx.close()
    with contextlib.suppress(Exception):
        await entry.sandbox.kill()
    if entry.paused is not None:
        shutil.rmtree(entry.paused, ignore_errors=True)


def _policy(spec: PolicySpec) -> capsa.NetworkPolicy:
    policy = (
        capsa.NetworkPolicy.allow_all()
        if spec.default == "allow"
        else capsa.NetworkPolicy.deny_all()
    )
    if spec.allow_dns:
        policy = policy.allow_dns()
    if spec.allow_https:
        policy = policy.allow_https()
    for address in spec.allow_ips:
        policy = policy.allow_ip(address)
    if spec.allow_domains:
        policy = policy.allow_domain(*spec.allow_domains)
    return policy


def _chunk_event(stream: str, data: bytes) -> dict[str, Any]:
    try:
        return {"t": stream, "text": data.decode()}
    except UnicodeDecodeError:
        return {"t": stream, "b64": base64.b64encode(data).decode()}


def create_app(options: ServerOptions) -> FastAPI:
    registry = Registry(options)

    mcp_app = None
    if options.mcp is not None:
        mcp = create_mcp(options.mcp, registry.backing)
        mcp_app = mcp.streamable_http_app(streamable_http_path="/")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry.save_state()
        await registry.backing.start()
        try:
            if mcp_app is None:
                yield
            else:
                async with mcp_app.router.lifespan_context(mcp_app):
                    yield
        finally:
            await registry.close()
            await registry.backing.close()
            if options.socket_path is not None:
                options.socket_path.unlink(missing_ok=True)

    async def authorized(request: HTTPConnection) -> None:
        if options.token is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given, f"Bearer {options.token}"):
            raise HTTPException(401, "a bearer token is required", {"WWW-Authenticate": "Bearer"})

    app = FastAPI(
        title="capsa",
        version=capsa.__version__,
        lifespan=lifespan,
        dependencies=[Depends(authorized)],
    )
    app.state.registry = registry
    if mcp_app is not None:
        app.mount("/mcp", _guarded(mcp_app, options.token))

    @app.exception_handler(capsa.CapsaError)
    async def capsa_error(request: Request, error: capsa.CapsaError) -> Response:
        status = 500
        if isinstance(error, capsa.InvalidConfig | capsa.UnsupportedFeature):
            status = 400
        elif isinstance(error, capsa.SandboxLost):
            status = 410  # gone with its node
        elif isinstance(error, capsa.NoCapacity):
            status = 503
        elif isinstance(error, capsa.AgentError) and error.errno is not None:
            status = 404 if error.errno == 2 else 400  # the guest refused: the request's fault
        body = json.dumps({"detail": str(error), "error": type(error).__name__})
        return Response(body, status_code=status, media_type="application/json")

    @app.get("/")
    async def server_info() -> ServerInfo:
        return ServerInfo(
            version=capsa.__version__, sandboxes=len(registry.entries), lost=registry.lost
        )

    @app.post("/sandboxes", status_code=201)
    async def create(request: CreateRequest) -> SandboxInfo:
        return (await registry.create(request)).info()

    @app.get("/sandboxes")
    async def list_sandboxes(label: str | None = None) -> list[SandboxInfo]:
        key, _, value = (label or "").partition("=")
        return [
            e.info()
            for e in list(registry.entries.values())
            if not key or e.labels.get(key) == value
        ]

    @app.get("/sandboxes/{name}")
    async def inspect(name: str) -> SandboxInfo:
        return _ready(registry, name).info()

    @app.delete("/sandboxes/{name}", status_code=204)
    async def delete(name: str) -> None:
        await registry.delete(name)

    @app.post(
        "/sandboxes/{name}/exec",
        response_class=StreamingResponse,
        responses={200: {"content": {"application/x-ndjson": {}}}},
    )
    async def exec_command(name: str, body: ExecRequest) -> StreamingResponse:
        """Output as NDJSON while the command runs: ``{"t": "stdout"|"stderr", "text"}`` (or
        ``"b64"`` for bytes that are not UTF-8), then ``{"t": "exit", "exit_code",
        "timed_out"}``. A client that goes away kills the command."""
        agent = await _ready(registry, name).sandbox.agent()
        if (body.cmd is None) == (body.argv is None):
            raise HTTPException(422, "give exactly one of cmd and argv")
        command: str | list[str] = body.cmd if body.cmd is not None else list(body.argv or [])
        process = await agent.start(command, env=body.env, cwd=body.cwd, timeout=body.timeout)
        return StreamingResponse(
            _stream_process(process, body.stdin.encode()), media_type="application/x-ndjson"
        )

    @app.get("/sandboxes/{name}/files")
    async def download(name: str, path: str) -> StreamingResponse:
        agent = await _ready(registry, name).sandbox.agent()
        chunks = agent.iter_file(path)
        first = await _first(chunks)  # a missing file is an error status, not a broken body
        return StreamingResponse(_prepend(first, chunks), media_type="application/octet-stream")

    @app.put("/sandboxes/{name}/files", status_code=204)
    async def upload(name: str, path: str, request: Request) -> None:
        agent = await _ready(registry, name).sandbox.agent()
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_UPLOAD:
                raise HTTPException(413, f"uploads are at most {MAX_UPLOAD} bytes")
        await agent.write_file(path, bytes(data), make_parents=True)

    @app.post("/sandboxes/{name}/pause")
    async def pause(name: str) -> SandboxInfo:
        """Save the sandbox on the server's disk and stop it (where QEMU can: see
        ``Sandbox.pause``); it keeps its name until resumed or deleted."""
        return (await registry.pause(name)).info()

    @app.post("/sandboxes/{name}/resume")
    async def resume(name: str) -> SandboxInfo:
        return (await registry.resume(name)).info()

    @app.websocket("/sandboxes/{name}/shell")
    async def shell(websocket: WebSocket, name: str, rows: int = 24, cols: int = 80) -> None:
        """An interactive terminal: binary messages are keystrokes one way and screen
        output the other; a text message ``{"resize": [rows, cols]}`` resizes; the last
        message is ``{"exit_code": N}``. Closing the socket kills the shell."""
        agent = await _ready(registry, name).sandbox.agent()
        await websocket.accept()
        command = "command -v bash >/dev/null && exec bash; exec sh"
        process = await agent.start(["/bin/sh", "-c", command], pty=True, rows=rows, cols=cols)

        async def screen() -> None:
            async for chunk in process.stdout:
                await websocket.send_bytes(chunk)

        output = asyncio.ensure_future(screen())
        try:
            while not output.done():
                receiving = asyncio.ensure_future(websocket.receive())
                await asyncio.wait({receiving, output}, return_when=asyncio.FIRST_COMPLETED)
                if not receiving.done():
                    receiving.cancel()
                    break
                message = receiving.result()
                if message["type"] == "websocket.disconnect":
                    raise WebSocketDisconnect()
                if message.get("bytes"):
                    await process.write_stdin(message["bytes"])
                elif message.get("text"):
                    size = json.loads(message["text"]).get("resize")
                    if isinstance(size, list) and len(size) == 2:
                        await process.resize(int(size[0]), int(size[1]))
            code = await process.wait(30)
            await websocket.send_text(json.dumps({"exit_code": code}))
            await websocket.close()
        except WebSocketDisconnect:
            with contextlib.suppress(Exception):
                await process.kill()
        finally:
            output.cancel()

    @app.get("/sandboxes/{name}/tar")
    async def download_tar(name: str, path: str) -> StreamingResponse:
        """The folder ``path`` as a tar stream, made as it is sent."""
        agent = await _ready(registry, name).sandbox.agent()
        return StreamingResponse(agent.read_tar(path), media_type="application/x-tar")

    @app.put("/sandboxes/{name}/tar", status_code=204)
    async def upload_tar(name: str, path: str, request: Request) -> None:
        """Unpack the tar stream in the body into the folder ``path`` as it arrives."""
        agent = await _ready(registry, name).sandbox.agent()
        await agent.write_tar(path, request.stream())

    @app.get("/sandboxes/{name}/ls")
    async def list_dir(name: str, path: str) -> list[dict[str, Any]]:
        agent = await _ready(registry, name).sandbox.agent()
        return [_plain(entry) for entry in await agent.list_dir(path)]

    @app.get("/sandboxes/{name}/stat")
    async def stat(name: str, path: str) -> dict[str, Any]:
        agent = await _ready(registry, name).sandbox.agent()
        return _plain(await agent.stat(path))

    @app.get("/sandboxes/{name}/logs", response_class=Response)
    async def logs(name: str, tail: int = 65536) -> Response:
        """The end of the sandbox's console (its kernel and init say what they did)."""
        sandbox, size = _ready(registry, name).sandbox, max(1, min(tail, 1 << 20))
        if isinstance(sandbox, capsa.Sandbox):
            text = sandbox.vm.console_tail(size)
        else:
            text = await sandbox.console_tail(size)
        return Response(text, media_type="text/plain")

    @app.get("/sandboxes/{name}/metrics")
    async def metrics(name: str) -> dict[str, Any]:
        usage = await _ready(registry, name).sandbox.metrics()
        return {**_plain(usage), "memory_used": usage.memory_used}

    @app.post("/sandboxes/{name}/code")
    async def run_code(name: str, body: CodeRequest) -> CodeResult:
        entry = _ready(registry, name)
        sandbox = entry.sandbox
        if not isinstance(sandbox, capsa.Sandbox):  # its named contexts are held by its node
            run = await sandbox.run_code(
                body.code, body.language, context=body.context, timeout=body.timeout
            )
            return _code_result(body.context, run)
        if body.context is None:
            run = await sandbox.run_code(body.code, body.language, timeout=body.timeout)
            return _code_result(None, run)
        ctx = entry.contexts.get(body.context)
        if ctx is None:
            if len(entry.contexts) >= MAX_CONTEXTS:
                raise HTTPException(429, f"a sandbox has at most {MAX_CONTEXTS} contexts")
            ctx = await sandbox.code_context(body.language)
            entry.contexts[body.context] = ctx
        return _code_result(body.context, await ctx.run(body.code, timeout=body.timeout))

    return app


def _guarded(inner: Any, token: str | None) -> Any:
    """An ASGI app that wants the bearer token first (mounted apps skip FastAPI's checks)."""
    if token is None:
        return inner
    expected = f"Bearer {token}".encode()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers", [])).get(b"authorization", b"")
            if not secrets.compare_digest(given, expected):
                await Response("a bearer token is required", status_code=401)(scope, receive, send)
                return
        await inner(scope, receive, send)

    return app


def _ready(registry: Registry, name: str) -> Entry:
    entry = registry.get(name)
    if entry.paused is not None:
        raise HTTPException(409, f"sandbox {name!r} is paused: resume it first")
    return entry


def _plain(value: Any) -> dict[str, Any]:
    return dataclasses.asdict(value)


def _code_result(context: str | None, run: Execution) -> CodeResult:
    error = None
    if run.error is not None:
        error = {"name": run.error.name, "value": run.error.value, "traceback": run.error.traceback}
    return CodeResult(
        context=context,
        stdout=run.stdout,
        stderr=run.stderr,
        result=run.result,
        displays=run.displays,
        error=error,
        exit_code=run.exit_code,
        truncated=run.truncated,
    )


async def _first(chunks: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await anext(chunks)
    except StopAsyncIteration:
        return None
    except capsa.AgentError as e:
        raise HTTPException(404 if e.errno == 2 else 400, str(e)) from None


async def _prepend(first: bytes | None, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first is None:
        return
    yield first
    async for chunk in rest:
        yield chunk


async def _stream_process(process: Any, stdin: bytes) -> AsyncIterator[bytes]:
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(64)

    async def pump(stream: str, chunks: AsyncIterator[bytes]) -> None:
        async for chunk in chunks:
            await queue.put(_chunk_event(stream, chunk))

    finished = False
    try:
        if stdin:
            await process.write_stdin(stdin)
        await process.close_stdin()

        async def pump_both() -> None:
            await asyncio.gather(pump("stdout", process.stdout), pump("stderr", process.stderr))
            await queue.put(None)

        pumping = asyncio.ensure_future(pump_both())
        while (event := await queue.get()) is not None:
            yield (json.dumps(event) + "\n").encode()
        code = await process.wait()
        finished = True
        end = {"t": "exit", "exit_code": code, "timed_out": process.timed_out}
        yield (json.dumps(end) + "\n").encode()
    finally:
        if "pumping" in locals():
            pumping.cancel()
        if not finished:  # the client went away: the command goes too
            with contextlib.suppress(Exception):
                await process.kill()
