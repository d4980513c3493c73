"""/.well-known/oauth-protected-resource: how an MCP client finds the issuers of the tokens
/mcp accepts (RFC 9728; docs/agents.md). Public, as discovery documents are."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.http.common import gateway_of, render
from app.mcp.server import PATH, RESOURCE_METADATA, base_url, resource_metadata

router = APIRouter()


@router.get(RESOURCE_METADATA, include_in_schema=False)
@router.get(RESOURCE_METADATA + PATH, include_in_schema=False)
async def protected_resource(request: Request) -> Response:
    """The protected-resource metadata of /mcp; the root and the path-suffixed form."""
    issuers = sorted(gateway_of(request).authenticator.issuers)
    return render(resource_metadata(base_url(request), issuers))
