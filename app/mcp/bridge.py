"""``querygate mcp``: a stdio MCP server for desktop agents, forwarding to a gateway's /mcp.

The bridge is a relay, not a second gateway: ``tools/list`` and every ``tools/call`` go to
``<url>/mcp`` as they came, over streamable HTTP with the official SDK's client, so each call
is governed, limited and audited there on the ``mcp`` channel exactly as a remote agent's
is; the answer (a result or a tool error) comes back as the gateway gave it. The token is
read from a file before every request and read again whenever the file changes
(``querygate_client.TokenFile``), so a projected or rotated token keeps working. An
answer that is not MCP (a 401, a gateway that cannot be reached) becomes a tool error in
the one error shape, its code read by ``querygate_client.errors.error_from``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import mcp.types as types
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server

from app.mcp import tools
from app.mcp.server import INSTRUCTIONS, PATH
from querygate_client import BearerAuth, TokenFile
from querygate_client.errors import QuerygateError, error_from

log = logging.getLogger("querygate.mcp.bridge")


class _Answers:
    """The last error answer of the gateway that was not MCP (a 401, a 413, …)."""

    def __init__(self) -> None:
        self.error: QuerygateError | None = None

    async def hook(self, response: httpx.Response) -> None:
        if response.status_code >= 400:
            await response.aread()
            try:
                body = response.json()
            except ValueError:
                body = None
            self.error = error_from(response.status_code, body)


class Bridge:
    """The stdio server and its upstream gateway."""

    def __init__(self, url: str, token_file: Path, on_behalf_of_file: Path | None = None,
                 timeout_s: float = 120.0) -> None:
        self.url = url.rstrip("/") + PATH
        self.auth = BearerAuth(TokenFile(token_file),
                               TokenFile(on_behalf_of_file) if on_behalf_of_file else None)
        self.timeout_s = timeout_s
        self.server: Server[Any, Any] = Server("querygate", instructions=INSTRUCTIONS)
        self.server.list_tools()(self._list_tools)  # type: ignore[no-untyped-call]
        # The gateway checks the arguments (and never echoes a value); so does nothing here.
        self.server.call_tool(validate_input=False)(self._call_tool)

    @contextlib.asynccontextmanager
    async def _upstream(self, answers: _Answers) -> AsyncIterator[ClientSession]:
        async with httpx.AsyncClient(
            auth=self.auth, timeout=httpx.Timeout(self.timeout_s, connect=10),
            event_hooks={"response": [answers.hook]},
            headers={"user-agent": "querygate-mcp-bridge"},
        ) as http, streamable_http_client(self.url, http_client=http) as (read, write, _), \
                ClientSession(read, write) as session:
            await session.initialize()
            yield session

    async def _forward(self, name: str | None, arguments: dict[str, Any]) -> Any:
        answers = _Answers()
        try:
            with anyio.fail_after(self.timeout_s):
                async with self._upstream(answers) as session:
                    if name is None:
                        return (await session.list_tools()).tools
                    return await session.call_tool(name, arguments)
        except Exception as exc:
            error = answers.error or QuerygateError(
                "gateway_unreachable",
                f"the gateway at {self.url} did not answer ({type(exc).__name__})")
            if isinstance(exc, QuerygateError):  # the token file
                error = exc
            log.warning("forwarding to %s failed: %s", self.url, error.code)
            return error

    async def _list_tools(self) -> list[types.Tool]:
        listed = await self._forward(None, {})
        # Without the gateway the tools are still listed (their calls answer the error).
        return tools.TOOLS if isinstance(listed, QuerygateError) else list(listed)

    async def _call_tool(self, name: str, arguments: dict[str, Any]) -> types.CallToolResult:
        answer = await self._forward(name, arguments)
        if isinstance(answer, QuerygateError):
            body: dict[str, Any] = {"error": {**answer.detail, "code": answer.code,
                                              "message": answer.message}}
            if answer.request_id:
                body["request_id"] = answer.request_id
            return tools.failure(body)
        assert isinstance(answer, types.CallToolResult)
        return answer

    async def serve(self) -> None:
        """Serve MCP on stdin/stdout until the client closes it."""
        async with stdio_server() as (read, write):
            await self.server.run(read, write, self.server.create_initialization_options())


def run(url: str, token_file: Path, on_behalf_of_file: Path | None, timeout_s: float) -> None:
    anyio.run(Bridge(url, token_file, on_behalf_of_file, timeout_s).serve)
