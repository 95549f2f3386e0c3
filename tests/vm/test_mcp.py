"""``capsa mcp`` driven by the official SDK's client over stdio, as an assistant would:
list the tools, create a sandbox, run code, read a file it wrote, destroy it; and the
operator's limits answered with tool errors while the server goes on."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

pytestmark = pytest.mark.vm


def _server(*args: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "capsa.cli", "mcp", "--image", "minimal", *args],
        env=dict(os.environ),
    )


def _data(result: Any) -> dict[str, Any]:
    assert not result.is_error, result.content
    if result.structured_content is not None:
        data: dict[str, Any] = result.structured_content
        return data.get("result", data) if set(data) == {"result"} else data
    return json.loads(result.content[0].text)  # type: ignore[no-any-return]


async def test_an_assistant_creates_runs_reads_and_destroys() -> None:
    async with Client(_server(), read_timeout_seconds=300) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert {
            "create_sandbox",
            "list_sandboxes",
            "destroy_sandbox",
            "run_command",
            "run_code",
            "read_file",
            "write_file",
            "list_files",
        } <= names
        created = _data(await client.call_tool("create_sandbox", {"name": "work"}))
        assert created["name"] == "work"
        ran = _data(
            await client.call_tool(
                "run_code",
                {"name": "work", "language": "bash", "code": "N=6; echo $((N * 7)) > /tmp/out"},
            )
        )
        assert ran["error"] is None and ran["exit_code"] == 0
        again = _data(
            await client.call_tool(
                "run_code", {"name": "work", "language": "bash", "code": "echo $N"}
            )
        )
        assert again["stdout"] == "6\n"  # the context kept its state
        read = _data(await client.call_tool("read_file", {"name": "work", "path": "/tmp/out"}))
        assert read["text"] == "42\n"
        _data(
            await client.call_tool(
                "write_file", {"name": "work", "path": "/tmp/in/a", "text": "hi"}
            )
        )
        command = _data(
            await client.call_tool(
                "run_command", {"name": "work", "command": "cat /tmp/in/a; exit 3"}
            )
        )
        assert (command["stdout"], command["exit_code"]) == ("hi", 3)
        listing = _data(await client.call_tool("list_files", {"name": "work", "path": "/tmp/in"}))
        assert [e["name"] for e in listing["entries"]] == ["a"]
        _data(await client.call_tool("destroy_sandbox", {"name": "work"}))
        assert _data(await client.call_tool("list_sandboxes", {}))["sandboxes"] == []


async def test_the_operators_limits_are_tool_errors() -> None:
    async with Client(
        _server("--max-sandboxes", "1", "--max-lifetime", "60"), read_timeout_seconds=300
    ) as client:
        too_long = await client.call_tool("create_sandbox", {"lifetime": 600})
        assert too_long.is_error and "lifetime" in too_long.content[0].text
        _data(await client.call_tool("create_sandbox", {"name": "only"}))
        second = await client.call_tool("create_sandbox", {"name": "two"})
        assert second.is_error and "at most 1" in second.content[0].text
        missing = await client.call_tool("read_file", {"name": "only", "path": "/no/such"})
        assert missing.is_error and "AgentError" in missing.content[0].text
        unknown = await client.call_tool("run_command", {"name": "nobody", "command": "true"})
        assert unknown.is_error and "no sandbox named" in unknown.content[0].text
        # Still serving after all of that.
        ok = _data(await client.call_tool("run_command", {"name": "only", "command": "echo fine"}))
        assert ok["stdout"] == "fine\n"


async def test_the_mcp_endpoint_of_capsa_serve(tmp_path: Path) -> None:
    from tests.vm.test_server import start_server, stop

    server = start_server(
        tmp_path, "--port", "0", "--mcp", "--mcp-image", "minimal", "--mcp-max-sandboxes", "1"
    )
    try:
        headers = {"Authorization": f"Bearer {server.token}"}
        async with httpx2.AsyncClient(headers=headers, timeout=300) as http:
            transport = streamable_http_client(f"{server.url}/mcp/", http_client=http)
            async with Client(transport, read_timeout_seconds=300) as client:
                assert "run_code" in {t.name for t in (await client.list_tools()).tools}
                _data(await client.call_tool("create_sandbox", {"name": "h"}))
                over = await client.call_tool("create_sandbox", {"name": "h2"})
                assert over.is_error and "at most 1" in over.content[0].text
                ran = _data(
                    await client.call_tool("run_command", {"name": "h", "command": "echo http"})
                )
                assert ran["stdout"] == "http\n"
        async with httpx2.AsyncClient(timeout=30) as anonymous:
            response = await anonymous.post(f"{server.url}/mcp/", json={})
            assert response.status_code == 401
    finally:
        stop(server)
