"""/v1/catalog: what the caller may read, with the masks policy would apply now."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app import pipeline
from app.http import models
from app.http.common import governed, meta_for, render
from app.http.openapi import answers

router = APIRouter()


@router.get(
    "/v1/catalog",
    responses=answers(models.CallerCatalogAnswer, "What you may read"),
)
async def caller_catalog(request: Request) -> Response:
    """The tables and columns you may read, each with the mask policy applies now."""
    async with governed(request) as call:
        listing = await pipeline.caller_catalog(
            call.gateway, call.audit, call.identity, meta_for(request, call.budget)
        )
        return render({
            "version": listing.version,
            "tables": [
                {"table": table,
                 "columns": [{"name": c.name, "type": c.type, "mask": c.mask} for c in columns]}
                for table, columns in listing.tables.items()
            ],
        })
    raise AssertionError("unreachable")
