"""/v1/admin: catalog refresh and the full classified listing (admin groups only)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.errors import Unavailable
from app.http import models
from app.http.common import audit_for, gateway_of, render, require_admin
from app.http.openapi import answers

log = logging.getLogger("querygate.http")

router = APIRouter()


@router.post("/v1/admin/catalog/refresh", responses=answers(models.RefreshAnswer, "Refreshed"))
async def refresh_catalog(request: Request) -> Response:
    """Re-read the catalog now (admin groups only); cached facts go stale with it."""
    gateway = gateway_of(request)
    audit = audit_for(request)
    identity = await require_admin(request, gateway, audit, "catalog_refresh")
    before = gateway.catalog.version if gateway.catalog else 0
    catalog = await gateway.refresh_catalog()
    log.info("catalog refreshed by %s: version %s -> %s", identity.sub, before, catalog.version)
    await audit.admin("catalog_refresh", "ok", {
        "version_before": before, "version_after": catalog.version,
    })
    return render(
        {
            "version": catalog.version,
            "changed": catalog.version != before,
            "relations": sum(len(t) for t in catalog.relations.values()),
        }
    )


@router.get("/v1/admin/catalog", responses=answers(models.AdminCatalogAnswer, "Every column and its class"))
async def catalog_listing(request: Request) -> Response:
    """Every visible column with its class and where the class came from (admin only)."""
    gateway = gateway_of(request)
    audit = audit_for(request)
    await require_admin(request, gateway, audit, "catalog_read")
    catalog = gateway.catalog
    if catalog is None:
        raise Unavailable("database_unavailable", "the catalog has not been read yet")
    await audit.admin("catalog_read", "ok", {"version": catalog.version})
    configured = await gateway.policy.data("querygate/config/classification")
    overrides = configured if isinstance(configured, dict) else {}
    columns = []
    for schema, tables in catalog.relations.items():
        for name, relation in tables.items():
            for column, type_name in relation.columns.items():
                qualified = f"{schema}.{name}.{column}"
                if qualified in overrides:
                    cls, source = overrides[qualified], "policy data"
                elif qualified in catalog.classes:
                    cls, source = catalog.classes[qualified], "column name"
                else:
                    cls, source = None, None
                columns.append({"column": qualified, "type": type_name,
                                "relation_kind": relation.kind, "class": cls,
                                "class_source": source})
    return render({"version": catalog.version, "columns": columns})
