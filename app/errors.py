"""The one error type of the gateway, and the one JSON shape every error is rendered in.

Hierarchy::

    GatewayError                      status + stable code + message (+ extra fields)
     ├── BadRequest          400      the body is not JSON, or the SQL does not parse
     ├── Unauthenticated     401      no token, or a token that does not verify
     ├── Forbidden           403      policy or the gateway's allow-list said no
     ├── PayloadTooLarge     413      body or SQL over its limit
     ├── Unprocessable       422      well-formed but unusable (unknown table, bad parameter)
     ├── TooManyRequests     429      a limit per caller (rate, concurrency); Retry-After
     ├── Unavailable         503      a dependency (OPA, PostgreSQL) cannot answer: fail closed
     └── GatewayTimeout      504      the request ran past its deadline

Stages raise these; library errors (httpx, asyncpg, sqlglot, PyJWT) are translated at the
boundary of the stage that calls the library, with ``raise … from exc``, so the API layer
only ever renders a GatewayError. Anything else is a bug: it is rendered as 500
``internal_error`` with no detail, and logged.

Codes are a public API (docs/errors.md); never rename one.
"""

from __future__ import annotations

from typing import Any, ClassVar


class GatewayError(Exception):
    """An error with an HTTP status and a stable, documented code."""

    status: ClassVar[int] = 500

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        """Render the one error shape: ``{"error": {"code", "message", …}, "request_id"}``."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        top: dict[str, Any] = {}
        for key, value in self.extra.items():
            # decision_id sits beside "error" so clients find it in the same place on
            # success and on denial.
            (top if key == "decision_id" else error)[key] = value
        out: dict[str, Any] = {"error": error, **top}
        if request_id is not None:
            out["request_id"] = request_id
        return out


class BadRequest(GatewayError):
    status = 400


class Unauthenticated(GatewayError):
    status = 401


class Forbidden(GatewayError):
    status = 403


class NotFound(GatewayError):
    status = 404


class MethodNotAllowed(GatewayError):
    status = 405


class RequestTimeout(GatewayError):
    status = 408


class PayloadTooLarge(GatewayError):
    status = 413


class Unprocessable(GatewayError):
    status = 422


class TooManyRequests(GatewayError):
    status = 429

    def __init__(self, code: str, message: str, retry_after_s: int, **extra: Any) -> None:
        super().__init__(code, message, retry_after_s=retry_after_s, **extra)
        # Sent as they are with the error (the API's exception handler).
        self.headers = {"Retry-After": str(retry_after_s)}


class Unavailable(GatewayError):
    status = 503


class GatewayTimeout(GatewayError):
    status = 504


class Internal(GatewayError):
    status = 500
