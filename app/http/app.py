"""``create_app(settings)``: the lifespan owns every client (through ``Gateway``); routers
per concern reach it through ``request.app.state.gateway``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.routing import Route

from app import tracing
from app.approvals import Notifier
from app.audit import AuditLog
from app.config import ConfigError, Settings
from app.facts import FactsExtractor
from app.gateway import Gateway
from app.http import admin, approvals, catalog, health, openapi, query, well_known
from app.http.common import install_error_handlers
from app.http.front import Front
from app.identity import Authenticator
from app.limits import CallerLimits
from app.liveness import Heartbeat
from app.mcp import McpFront
from app.mcp.server import PATH as MCP_PATH
from app.mcp.server import running
from app.metrics import Metrics, MetricsServer
from app.pgwire.server import PgServer
from app.policy import DecisionCache, PolicyClient

log = logging.getLogger("querygate.http")


def _mask_key(settings: Settings) -> bytes:
    if settings.mask_hmac_key is not None:
        return settings.mask_hmac_key.get_secret_value().encode()
    # Only outside prod (require_serving checked): hashes are stable for this process only.
    log.warning("QUERYGATE_MASK_HMAC_KEY is not set: hash masks change on restart")
    return secrets.token_bytes(32)


def create_app(settings: Settings) -> Front:
    """Build the application; nothing connects until the lifespan starts."""
    settings.require_serving()
    authenticator = Authenticator(settings)
    mask_key = _mask_key(settings)
    metrics = Metrics()
    mcp = McpFront("0.1.0")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        traced = tracing.configure(settings)  # a missing otel extra stops start-up here
        policy = PolicyClient(settings.opa_url, settings.opa_decision_path, settings.opa_timeout_ms)
        gateway = Gateway(
            mask_key=mask_key,
            settings=settings,
            authenticator=authenticator,
            extractor=FactsExtractor(settings.max_sql_bytes),
            policy=policy,
            decisions=DecisionCache(
                policy, settings.decision_cache_entries, settings.decision_cache_max_ttl_s,
                lambda result: metrics.child(metrics.decision_cache, result).inc(),
            ),
            metrics=metrics,
            limits=CallerLimits(settings.rate_limit_per_s, settings.rate_limit_burst,
                                settings.max_concurrent_per_identity),
            heartbeat=Heartbeat(settings.liveness_max_loop_lag_ms / 1000),
        )
        cap = settings.max_concurrent_per_identity
        if cap == 0 or cap >= min(settings.db_pool_max, settings.profile_pool_max):
            log.warning("QUERYGATE_MAX_CONCURRENT_PER_IDENTITY (%s) is not below the pool sizes: "
                        "one caller can hold every database connection", cap)
        # First: nothing is served that could not be audited. A spool that cannot be opened
        # (locked by another process, unwritable) stops start-up.
        audit = AuditLog(settings, metrics)
        await audit.start()
        gateway.audit = audit
        # The first JWKS fetch (bounded by QUERYGATE_JWKS_TIMEOUT_MS) happens before serving.
        await authenticator.start()
        gateway.notifier = Notifier(settings.approval_webhook_url)
        try:
            await gateway.connect()
        except ConfigError:
            # A misconfiguration is not a passing outage: refuse to start.
            await gateway.close()
            raise
        except Exception as exc:
            log.warning("database not reachable at start-up: %s", type(exc).__name__)
        gateway.tasks.append(asyncio.create_task(gateway.maintain()))
        gateway.tasks.append(asyncio.create_task(gateway.heartbeat.run()))
        app.state.gateway = gateway
        wire = None
        if settings.pg_port is not None:
            # The wire protocol's listener: the same gateway, the same pipeline.
            wire = PgServer(gateway, settings)
            await wire.start()
        app.state.pgwire = wire
        exporter = None
        if settings.metrics_enabled and settings.metrics_port is not None:
            exporter = MetricsServer(metrics, settings.host, settings.metrics_port,
                                     settings.workers)
        try:
            if exporter is not None:
                app.state.metrics_port = await asyncio.to_thread(exporter.start)
            # The MCP session manager (/mcp) runs for as long as the app does.
            async with running(mcp):
                yield
        finally:
            if traced:
                tracing.release()
            if exporter is not None:
                await asyncio.to_thread(exporter.close)
            if wire is not None:
                await wire.close()
            await gateway.close()

    # /docs in dev only; in prod the OpenAPI document needs a token (app/http/openapi.py).
    app = FastAPI(title="querygate", version="0.1.0", lifespan=lifespan, redoc_url=None,
                  docs_url="/docs" if settings.environment == "dev" else None,
                  openapi_url=None if settings.environment == "prod" else "/openapi.json")
    install_error_handlers(app)
    for router in (query.router, catalog.router, approvals.router, admin.router, health.router,
                   well_known.router):
        app.include_router(router)
    # The MCP endpoint (app/mcp/): an ASGI app of its own, which authenticates first.
    app.router.routes.append(Route(MCP_PATH, endpoint=mcp))
    if settings.metrics_enabled and settings.metrics_port is None:
        app.include_router(health.metrics_router)
    openapi.install(app, settings)
    # Request ids and metrics for every request, and POST /v1/query without FastAPI's
    # stack (app/http/front.py); FastAPI serves the rest.
    return Front(app, metrics, traced=settings.otel_enabled)
