"""The OpenAPI document: the models of app/http/models.py, the one error shape on every
status an endpoint can answer, an HTTP Bearer security scheme, and the NDJSON stream.

Routes read their bodies themselves (size limits before parsing, one error shape), so the
request bodies and the NDJSON content are added here rather than inferred by FastAPI.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app.config import Settings
from app.http import models
from app.http.common import NDJSON, audit_for, authenticate, gateway_of, render

REF = "#/components/schemas/{model}"

_STATUS_TEXT = {
    400: "Bad request (invalid_json, sql_parse_error, …)",
    401: "Not authenticated (missing_token, invalid_token, …)",
    403: "Refused (policy_denied and the gateway's own refusals)",
    404: "No such endpoint or approval",
    405: "Method not allowed",
    408: "The statement ran past the statement timeout",
    413: "The body or the SQL is too large",
    422: "The request does not match the schema (invalid_request, invalid_parameters, …)",
    429: "Rate or concurrency limit (Retry-After says when to retry)",
    500: "An unexpected error (logged with the request id)",
    503: "OPA, the database or the audit spool is unavailable",
    504: "The request ran past its deadline",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries: the error shape for each status (all of them by default)."""
    return {
        status: {"model": models.ErrorBody, "description": _STATUS_TEXT[status]}
        for status in (statuses or tuple(_STATUS_TEXT))
    }


def ok(model: type[BaseModel], description: str, status: int = 200) -> dict[int | str, Any]:
    return {status: {"model": model, "description": description}}


def answers(model: type[BaseModel], description: str) -> dict[int | str, Any]:
    """A 200 of ``model`` and the error shape on every error status."""
    return {**ok(model, description), **errors()}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json_body(model: type[BaseModel], required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": _ref(model)}}}


_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("/v1/query", "post"): _json_body(models.QueryRequest),
    ("/v1/explain", "post"): _json_body(models.QueryRequest),
    ("/v1/approvals/{approval_id}/approve", "post"): _json_body(models.DecideRequest, False),
    ("/v1/approvals/{approval_id}/reject", "post"): _json_body(models.DecideRequest, False),
}
_EXTRA_MODELS: tuple[type[BaseModel], ...] = (
    models.QueryRequest, models.DecideRequest, models.StreamHeader, models.StreamEnd,
    models.StreamError,
)
_PUBLIC = ("/healthz", "/readyz", "/metrics")


def document(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document of ``app`` (built once, then cached on it)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                         description="querygate: policy-as-code SQL gateway for PostgreSQL.")
    components = schema.setdefault("components", {})
    _, defs = models_json_schema([(m, "validation") for m in _EXTRA_MODELS], ref_template=REF)
    components.setdefault("schemas", {}).update(defs.get("$defs", {}))
    components["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                   "description": "A token of a trusted issuer (docs/identity.md)."},
    }
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            if path not in _PUBLIC:
                operation["security"] = [{"bearer": []}]
            if (path, method) in _BODIES:
                operation["requestBody"] = _BODIES[(path, method)]
    answer = schema["paths"]["/v1/query"]["post"]["responses"]["200"]
    answer["description"] = "The rows (JSON), or a stream (NDJSON). " + models.NDJSON_DESCRIPTION
    answer["content"][NDJSON] = {"schema": {
        "description": models.NDJSON_DESCRIPTION,
        "oneOf": [_ref(models.StreamHeader), {"type": "array", "description": "one row"},
                  _ref(models.StreamEnd), _ref(models.StreamError)],
    }}
    app.openapi_schema = schema
    return schema


def install(app: FastAPI, settings: Settings) -> None:
    """Serve the document: openly outside prod, to a verified caller in prod."""
    app.openapi = lambda: document(app)  # type: ignore[method-assign]
    if settings.environment != "prod":
        return

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_json(request: Request) -> Response:
        """The OpenAPI document, to a verified caller."""
        await authenticate(request, gateway_of(request), audit_for(request))
        return render(document(app))
