"""A real MCP client (the official SDK) for the tests: streamable HTTP to a gateway's /mcp,
or stdio to a spawned `querygate mcp` process."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client


class Traced:
    """The x-request-id of every MCP POST, by the JSON-RPC method and tool it carried."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None, str]] = []  # (method, tool, request id)

    async def hook(self, response: httpx.Response) -> None:
        try:
            message = json.loads(response.request.content or b"{}")
        except ValueError:
            return
        if isinstance(message, dict) and "x-request-id" in response.headers:
            tool = (message.get("params") or {}).get("name")
            self.calls.append((message.get("method", ""), tool, response.headers["x-request-id"]))


@contextlib.asynccontextmanager
async def session(url: str, headers: dict[str, str],
                  traced: Traced | None = None) -> AsyncIterator[ClientSession]:
    """An initialised MCP client session over streamable HTTP."""
    hooks: dict[str, list[Any]] = {"response": [traced.hook]} if traced else {}
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(30, read=60),
                                 event_hooks=hooks) as http, \
            streamable_http_client(url + "/mcp", http_client=http) as (read, write, _), \
            ClientSession(read, write) as client:
        await client.initialize()
        yield client


def text_of(result: Any) -> str:
    return "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")
