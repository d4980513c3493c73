"""/healthz, /readyz and /metrics: what probes and Prometheus read."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from app.errors import Unavailable
from app.http import models
from app.http.common import gateway_of, render, request_id
from app.http.openapi import errors, ok
from app.metrics import CONTENT_TYPE_LATEST

router = APIRouter()
metrics_router = APIRouter()


@router.get("/healthz", responses={**ok(models.Health, "Live"), **errors(503)})
async def healthz(request: Request) -> Response:
    """The process is alive: its event loop runs, and no pool is wedged (app/liveness.py)."""
    gateway = gateway_of(request)
    loop_problem = gateway.heartbeat.problem()
    wedged = gateway.executor.wedged_pools() if gateway.executor is not None else 0
    if loop_problem is None and not wedged:
        return render({"status": "ok"})
    checks = {
        "event_loop": loop_problem or "ok",
        "database_pools": f"{wedged} pool(s) with every connection in use past its "
        "deadline" if wedged else "ok",
    }
    error = Unavailable("not_live", "the gateway is not live", checks=checks)
    return render(error.body(request_id(request)), error.status)


@router.get("/readyz", responses={**ok(models.Ready, "Ready"), **errors(503)})
async def readyz(request: Request) -> Response:
    """OPA answers with a well-formed decision and the database answers."""
    gateway = gateway_of(request)
    checks: dict[str, str] = {}
    ok, detail = await gateway.policy.ready()
    checks["opa"] = detail
    db_ok = False
    if gateway.pool is None or gateway.catalog is None:
        checks["database"] = "not connected"
    else:
        try:
            timeout = gateway.settings.db_connect_timeout_ms / 1000
            async with gateway.pool.acquire(timeout=timeout) as conn:
                await conn.fetchval("SELECT 1")
            db_ok = True
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"unreachable: {type(exc).__name__}"
    # The spool must accept events; a sink outage alone only grows the spool.
    audit_ok, checks["audit"] = (
        gateway.audit.ready() if gateway.audit else (False, "audit log not started")
    )
    ready = ok and db_ok and audit_ok
    if not ready:
        error = Unavailable("not_ready", "the gateway is not ready", checks=checks)
        return render(error.body(request_id(request)), error.status)
    return render({"status": "ready", "checks": checks})


@metrics_router.get("/metrics", response_class=PlainTextResponse,
                    responses={200: {"description": "The Prometheus text format"}})
async def metrics(request: Request) -> Response:
    """Prometheus text exposition (docs/audit.md lists the series)."""
    return Response(gateway_of(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
