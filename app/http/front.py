"""The ASGI application uvicorn serves: request ids and metrics for every request, then
POST /v1/query straight to its handler and everything else to FastAPI.

The query route is the hot path, and FastAPI's stack costs a query more than it gives it:
its telemetry and body-limit wrappers, Starlette's error middlewares, the exit stack,
routing, and the dependency solving of an APIRoute (query parameters parsed, a dependency
graph walked), for a handler that takes the raw ``Request`` and reads its own body within
its own limits. make bench measured that stack at about a sixth of the gateway's CPU per
point query (docs/benchmarks.md). So the front calls the same handler with the same error
shape (``common.error_response``) itself; FastAPI still serves every other route and still
documents /v1/query in the OpenAPI document (its APIRoute is never reached for serving).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from app import tracing
from app.http import query
from app.http.common import RequestIdMiddleware, error_response
from app.metrics import Metrics, MetricsMiddleware


class _Route:
    """What the metrics read of a matched route (its path template)."""

    path = "/v1/query"


_QUERY = _Route()


class Front:
    """RequestIdMiddleware(MetricsMiddleware(lean /v1/query, else FastAPI))."""

    def __init__(self, api: FastAPI, metrics: Metrics, traced: bool = False) -> None:
        self.api = api
        # This gateway's requests are spans (QUERYGATE_OTEL_ENABLED): the tracer is the
        # process's, but another gateway in it may not trace.
        self.traced = traced
        self._http: ASGIApp = RequestIdMiddleware(  # type: ignore[assignment]
            MetricsMiddleware(self._route, metrics)  # type: ignore[arg-type]
        )

    @property
    def state(self) -> Any:
        """The FastAPI application's state (``state.gateway`` once the lifespan ran)."""
        return self.api.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # the lifespan
            await self.api(scope, receive, send)
        elif not (self.traced and tracing.enabled()):
            await self._http(scope, receive, send)
        else:
            with tracing.request_span(scope):
                try:
                    await self._http(scope, receive, send)
                finally:
                    state = scope.get("state") or {}
                    audit = state.get("audit")
                    route = scope.get("route")
                    tracing.set_attributes(**{
                        "http.route": getattr(route, "path", None) or "unmatched",
                        "querygate.decision": getattr(audit, "label", None) or "none",
                        "querygate.request_id": getattr(audit, "request_id", None) or "",
                        "querygate.code": state.get("error_code") or "ok",
                    })

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] != "/v1/query" or scope["method"] != "POST":
            await self.api(scope, receive, send)
            return
        scope["app"] = self.api
        scope["route"] = _QUERY
        request = Request(scope, receive, send)
        try:
            response = await query.query(request)
        except Exception as exc:  # the one error shape; an unexpected error is logged there
            response = await error_response(request, exc)
        await response(scope, receive, send)
