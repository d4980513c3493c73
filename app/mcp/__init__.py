"""The MCP front end (docs/agents.md): the four tools over streamable HTTP at /mcp, a thin
adapter over app/pipeline.py like app/http/ and app/pgwire/."""

from app.mcp.server import McpFront

__all__ = ["McpFront"]
