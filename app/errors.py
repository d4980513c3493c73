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

Codes are a public API (docs/errors.md); never rename one. On the PostgreSQL wire protocol
an error is an ErrorResponse whose SQLSTATE is ``sqlstate``: the database's own for an error
PostgreSQL raised, else the code's (``SQLSTATES``), else the class's (docs/pgwire.md).
"""

from __future__ import annotations

from typing import Any, ClassVar

# Codes whose SQLSTATE is not their class's. "QG" is an implementation-defined class (SQL
# reserves I-Z for those), for what PostgreSQL has no condition of: held for an approval.
SQLSTATES: dict[str, str] = {
    "sql_parse_error": "42601",  # syntax_error
    "unknown_object": "42P01",  # undefined_table (or column, function: the message says)
    "sql_too_complex": "54001",  # statement_too_complex
    "read_only_violation": "25006",  # read_only_sql_transaction
    "invalid_parameters": "22023",  # invalid_parameter_value
    "approval_required": "QG001",
    "approval_not_accepted": "QG002",
    "statement_timeout": "57014",  # query_canceled
    "query_cancelled": "57014",
    "request_timeout": "57014",
    "database_unavailable": "08006",  # connection_failure
    "policy_unavailable": "58000",  # system_error: OPA cannot answer, nothing runs
    "audit_unavailable": "58030",  # io_error: the spool cannot take the event
    "invalid_token": "28P01",  # invalid_password: the password is the token
    "token_expired": "28P01",
    "missing_token": "28P01",
    "tls_required": "28000",  # invalid_authorization_specification
    "user_mismatch": "28000",
    "rate_limited": "53400",  # configuration_limit_exceeded
    "too_many_concurrent": "53300",  # too_many_connections
}


class GatewayError(Exception):
    """An error with an HTTP status, a stable, documented code and a SQLSTATE."""

    status: ClassVar[int] = 500
    default_sqlstate: ClassVar[str] = "XX000"  # internal_error

    @property
    def sqlstate(self) -> str:
        """What the wire protocol answers with (the database's own for its errors)."""
        own = self.extra.get("sqlstate")
        if isinstance(own, str) and len(own) == 5:
            return own
        return SQLSTATES.get(self.code, self.default_sqlstate)

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
    default_sqlstate = "42601"  # syntax_error


class Unauthenticated(GatewayError):
    status = 401
    default_sqlstate = "28000"  # invalid_authorization_specification


class Forbidden(GatewayError):
    status = 403
    default_sqlstate = "42501"  # insufficient_privilege


class NotFound(GatewayError):
    status = 404
    default_sqlstate = "42704"  # undefined_object


class MethodNotAllowed(GatewayError):
    status = 405
    default_sqlstate = "0A000"  # feature_not_supported


class RequestTimeout(GatewayError):
    status = 408
    default_sqlstate = "57014"  # query_canceled


class PayloadTooLarge(GatewayError):
    status = 413
    default_sqlstate = "54000"  # program_limit_exceeded


class Unprocessable(GatewayError):
    status = 422
    default_sqlstate = "22023"  # invalid_parameter_value


class TooManyRequests(GatewayError):
    status = 429
    default_sqlstate = "53400"  # configuration_limit_exceeded

    def __init__(self, code: str, message: str, retry_after_s: int, **extra: Any) -> None:
        super().__init__(code, message, retry_after_s=retry_after_s, **extra)
        # Sent as they are with the error (the API's exception handler).
        self.headers = {"Retry-After": str(retry_after_s)}


class Unavailable(GatewayError):
    status = 503
    default_sqlstate = "58000"  # system_error


class GatewayTimeout(GatewayError):
    status = 504
    default_sqlstate = "57014"  # query_canceled


class Internal(GatewayError):
    status = 500
    default_sqlstate = "XX000"  # internal_error
