"""`querygate mcp`, the stdio bridge, end to end (issue 18, acceptance 5): the official MCP
SDK's stdio client spawns the real `querygate mcp` process, which forwards to a live
gateway's /mcp with a token it reads from a file and reads again when the file changes."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from app.devstack import free_port
from tests.integration.mcp_client import text_of

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@contextlib.asynccontextmanager
async def bridge(url: str, token_file: Path, errlog: Path) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "app.cli", "mcp", "--url", url, "--token-file", str(token_file),
              "--timeout", "30"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=str(REPO),
    )
    with errlog.open("w") as err:
        async with stdio_client(params, errlog=err) as (read, write), \
                ClientSession(read, write) as client:
            await client.initialize()
            yield client


def _replace(path: Path, token: str) -> None:
    """A new file in place of the old (a new inode), as a kubelet rotates a projected token."""
    fresh = path.with_suffix(".new")
    fresh.write_text(token + "\n")
    os.replace(fresh, path)


async def test_the_bridge_forwards_tools_and_calls_to_the_gateway(gateway, keys, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(keys.token("alice", ["analysts"]))
    async with bridge(gateway.url, token_file, tmp_path / "bridge.log") as client:
        listed = {t.name: t for t in (await client.list_tools()).tools}
        assert set(listed) == {"catalog", "explain", "query", "approval_status"}
        assert listed["query"].outputSchema is not None
        result = await client.call_tool(
            "query", {"sql": "SELECT id, email FROM customers WHERE id = $1", "params": [2]})
        assert result.isError is False, text_of(result)
        assert result.structuredContent["masked"] == {"email": "email"}
        assert "email [masked:email]" in text_of(result)
        denied = await client.call_tool("query", {"sql": "DROP TABLE orders"})
        assert denied.isError is True
        assert denied.structuredContent["error"]["code"] == "policy_denied"


async def test_a_rotated_token_is_read_again(gateway, keys, tmp_path):
    token_file = tmp_path / "token"
    now = int(time.time())
    token_file.write_text(keys.token("alice", ["analysts"], iat=now - 7200, nbf=now - 7200,
                                     exp=now - 3600))
    async with bridge(gateway.url, token_file, tmp_path / "bridge.log") as client:
        expired = await client.call_tool("catalog", {})
        assert expired.isError is True
        assert expired.structuredContent["error"]["code"] == "token_expired"
        _replace(token_file, keys.token("alice", ["analysts"]))
        fresh = await client.call_tool("catalog", {})
        assert fresh.isError is False, text_of(fresh)
        # Rewritten in place (same inode, new contents) works as well.
        token_file.write_text(keys.token("dana", ["dba"]))
        again = await client.call_tool("explain", {"sql": "UPDATE orders SET status = status "
                                                          "WHERE id = 1"})
        assert again.structuredContent["decision"]["allow"] is True  # dana: a writer agent


async def test_a_gateway_that_cannot_be_reached_is_a_tool_error(tmp_path, keys):
    token_file = tmp_path / "token"
    token_file.write_text(keys.token("alice", ["analysts"]))
    url = f"http://127.0.0.1:{free_port()}"
    async with bridge(url, token_file, tmp_path / "bridge.log") as client:
        # The tools are listed all the same; their calls say what went wrong.
        assert len((await client.list_tools()).tools) == 4
        result = await client.call_tool("catalog", {})
    assert result.isError is True
    assert result.structuredContent["error"]["code"] == "gateway_unreachable"
