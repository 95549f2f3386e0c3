"""``capsa mcp``: sandboxes as Model Context Protocol tools (the official ``mcp`` SDK).

Every sandbox an assistant creates follows the operator's policy, fixed at start-up:
image, resources, network and egress policy, how many at once and for how long. A tool
that fails answers with a tool error; the server goes on.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

import capsa
from capsa.api.code import CodeContext, Execution
from capsa.server.backing import Backing

if TYPE_CHECKING:
    from capsa.server.backing import AnySandbox

T = TypeVar("T")
MAX_FILE_TEXT = 1 << 20  # what read_file hands an assistant


@dataclass(frozen=True)
class McpPolicy:
    """What the operator allows sandboxes created over MCP."""

    image: str = "debian"
    cpus: int = 1
    memory_mb: int = 512
    network: bool = False  # user NAT behind `allow_domains` (none: no network)
    allow_domains: tuple[str, ...] = ()
    max_sandboxes: int = 4
    max_lifetime: float = 3600.0
    idle_timeout: float | None = 600.0


class ToolFailure(ToolError):
    """A request the policy or the sandbox refused: the assistant sees the message."""


@dataclass
class _Held:
    sandbox: AnySandbox
    contexts: dict[str, CodeContext] = field(default_factory=dict)


class SandboxTools:
    """The sandboxes one MCP server holds, and the operations its tools perform."""

    def __init__(self, policy: McpPolicy, backing: Backing) -> None:
        self.policy = policy
        self.backing = backing
        self.held: dict[str, _Held] = {}

    def _get(self, name: str) -> _Held:
        held = self.held.get(name)
        if held is None:
            raise ToolFailure(f"no sandbox named {name!r} (list_sandboxes shows them)")
        return held

    async def create(self, name: str | None, lifetime: float | None) -> dict[str, Any]:
        policy = self.policy
        if len(self.held) >= policy.max_sandboxes:
            raise ToolFailure(f"the operator allows at most {policy.max_sandboxes} sandboxes")
        if lifetime is not None and not 0 < lifetime <= policy.max_lifetime:
            raise ToolFailure(f"lifetime must be between 0 and {policy.max_lifetime:g} seconds")
        name = name or f"sb-{secrets.token_hex(3)}"
        if name in self.held:
            raise ToolFailure(f"a sandbox named {name!r} exists")
        builder = self.backing.builder().image(policy.image).cpus(policy.cpus)
        builder.memory_mb(policy.memory_mb).lifetime(lifetime or policy.max_lifetime)
        if policy.idle_timeout is not None:
            builder.idle_timeout(policy.idle_timeout)
        if policy.network:
            rules = capsa.NetworkPolicy.deny_all().allow_dns()
            if policy.allow_domains:
                rules = rules.allow_domain(*policy.allow_domains)
            builder.network(capsa.NetworkMode.user_nat().policy(rules).build())
        sandbox = await builder.build()
        self.held[name] = _Held(sandbox)
        await sandbox.agent()
        return {"name": name, "image": policy.image, "lifetime": lifetime or policy.max_lifetime}

    def list_all(self) -> list[dict[str, Any]]:
        return [{"name": name, "status": _status(held.sandbox)} for name, held in self.held.items()]

    async def destroy(self, name: str) -> dict[str, Any]:
        held = self._get(name)
        del self.held[name]
        await held.sandbox.kill()
        return {"name": name, "destroyed": True}

    async def run_command(self, name: str, command: str, timeout: float) -> dict[str, Any]:
        agent = await self._get(name).sandbox.agent()
        result = await agent.exec(command, timeout=timeout, max_output=MAX_FILE_TEXT).run()
        return {
            "exit_code": result.exit_code,
            "stdout": result.stdout.decode(errors="replace"),
            "stderr": result.stderr.decode(errors="replace"),
            "timed_out": result.timed_out,
        }

    async def run_code(
        self, name: str, code: str, language: str, context: str, timeout: float
    ) -> dict[str, Any]:
        run = await self._run_in(self._get(name), code, language, context, timeout)
        error = None
        if run.error is not None:
            error = {
                "name": run.error.name,
                "value": run.error.value,
                "traceback": run.error.traceback,
            }
        return {
            "stdout": run.stdout,
            "stderr": run.stderr,
            "result": run.text,
            "error": error,
            "exit_code": run.exit_code,
            "truncated": run.truncated,
        }

    async def _run_in(
        self, held: _Held, code: str, language: str, context: str, timeout: float
    ) -> Execution:
        sandbox = held.sandbox
        if not isinstance(sandbox, capsa.Sandbox):  # its node holds its contexts
            return await sandbox.run_code(code, language, context=context, timeout=timeout)
        ctx = held.contexts.get(context)
        if ctx is None or not ctx.alive:
            ctx = await sandbox.code_context(language)
            held.contexts[context] = ctx
        if ctx.language != language:
            raise ToolFailure(f"context {context!r} runs {ctx.language}, not {language}")
        return await ctx.run(code, timeout=timeout)

    async def read_file(self, name: str, path: str) -> dict[str, Any]:
        agent = await self._get(name).sandbox.agent()
        data = await agent.read_file(path, max_size=MAX_FILE_TEXT)
        try:
            return {"path": path, "text": data.decode(), "size": len(data)}
        except UnicodeDecodeError:
            raise ToolFailure(f"{path} is not text ({len(data)} bytes)") from None

    async def write_file(self, name: str, path: str, text: str) -> dict[str, Any]:
        agent = await self._get(name).sandbox.agent()
        data = text.encode()
        await agent.write_file(path, data, make_parents=True)
        return {"path": path, "size": len(data)}

    async def list_files(self, name: str, path: str) -> list[dict[str, Any]]:
        agent = await self._get(name).sandbox.agent()
        return [
            {"name": e.name, "is_dir": e.is_dir, "size": e.size} for e in await agent.list_dir(path)
        ]

    async def close(self) -> None:
        held, self.held = self.held, {}
        for entry in held.values():
            with contextlib.suppress(Exception):
                await entry.sandbox.kill()


def _status(sandbox: AnySandbox) -> str:
    return sandbox.status().state.value if isinstance(sandbox, capsa.Sandbox) else "running"


def create_mcp(policy: McpPolicy, backing: Backing | None = None) -> MCPServer:
    tools = SandboxTools(policy, backing or Backing())

    @contextlib.asynccontextmanager
    async def lifespan(server: MCPServer) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await tools.close()

    server: MCPServer = MCPServer(
        name="capsa",
        version=capsa.__version__,
        instructions=(
            "Hardware-isolated Linux sandboxes (micro-VMs). Create one, run commands or "
            "code in it, read and write its files, destroy it when done."
        ),
        lifespan=lifespan,
    )

    async def guarded(action: Awaitable[T]) -> T:
        try:
            return await action
        except ToolFailure:
            raise
        except capsa.CapsaError as e:
            raise ToolFailure(f"{type(e).__name__}: {e}") from None

    @server.tool()
    async def create_sandbox(
        name: str | None = None, lifetime: float | None = None
    ) -> dict[str, Any]:
        """Create a sandbox (a Linux VM with bash, python3, pip, git, curl) and return its
        name. It ends after `lifetime` seconds (at most the operator's limit)."""
        return await guarded(tools.create(name, lifetime))

    @server.tool()
    async def list_sandboxes() -> dict[str, Any]:
        """The sandboxes this server holds."""
        return {"sandboxes": tools.list_all()}

    @server.tool()
    async def destroy_sandbox(name: str) -> dict[str, Any]:
        """Destroy a sandbox and everything in it."""
        return await guarded(tools.destroy(name))

    @server.tool()
    async def run_command(name: str, command: str, timeout: float = 120.0) -> dict[str, Any]:
        """Run a shell command in the sandbox; its exit code, stdout and stderr."""
        return await guarded(tools.run_command(name, command, timeout))

    @server.tool()
    async def run_code(
        name: str,
        code: str,
        language: str = "python",
        context: str = "default",
        timeout: float = 120.0,
    ) -> dict[str, Any]:
        """Run code in a persistent context (state kept between calls, like a notebook):
        output, the last expression's value, and the error with its traceback."""
        if language not in ("python", "bash"):
            raise ToolFailure("language is python or bash")
        return await guarded(tools.run_code(name, code, language, context, timeout))

    @server.tool()
    async def read_file(name: str, path: str) -> dict[str, Any]:
        """A text file's content from the sandbox (at most 1 MiB)."""
        return await guarded(tools.read_file(name, path))

    @server.tool()
    async def write_file(name: str, path: str, text: str) -> dict[str, Any]:
        """Write a text file in the sandbox (parent folders are made)."""
        return await guarded(tools.write_file(name, path, text))

    @server.tool()
    async def list_files(name: str, path: str) -> dict[str, Any]:
        """The entries of a folder in the sandbox."""
        return {"entries": await guarded(tools.list_files(name, path))}

    return server
