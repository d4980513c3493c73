"""Typed errors of the querygate client, one class per kind of answer, chosen by the stable
code of the gateway's one error shape (docs/errors.md)::

    QuerygateError                       code, message, status, request_id, decision_id, body
     ├── TransportError                  the gateway could not be reached (httpx's error as cause)
     ├── BadRequest            400       invalid_json, sql_parse_error, …
     ├── Unauthenticated       401       missing_token, invalid_token, …
     │    └── TokenExpired               token_expired
     ├── Forbidden             403       function_denied, masked_column_predicate, …
     │    ├── PolicyDenied               policy_denied (``reasons``: the policy's)
     │    └── ApprovalNotAccepted        approval_not_accepted, approval_not_usable,
     │                                   approval_expired, approval_mismatch, approval_not_pending
     ├── NotFound              404       approval_not_found, not_found
     ├── RequestTimeout        408       statement_timeout
     ├── PayloadTooLarge       413       payload_too_large, sql_too_large, response_too_large
     ├── Unprocessable         422       unknown_object, invalid_parameters, …
     ├── TooManyRequests       429       ``retry_after_s``
     │    ├── RateLimited                rate_limited
     │    ├── TooManyConcurrent          too_many_concurrent
     │    └── RowBudgetExhausted         row_budget_exhausted
     ├── Unavailable           503       policy_unavailable, database_unavailable, audit_unavailable
     ├── GatewayTimeout        504       request_timeout
     └── ServerError           5xx       internal_error and anything else

The last line of an NDJSON stream that was cut carries a code but no status (the stream
began 200): its class is the one of the status that code has elsewhere (``STATUS_OF``).
"""

from __future__ import annotations

from typing import Any


class QuerygateError(Exception):
    """An answer of the gateway that is not a success, or no answer at all."""

    def __init__(self, code: str, message: str, status: int | None = None,
                 body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.body = body or {}
        error = self.body.get("error")
        self.detail: dict[str, Any] = error if isinstance(error, dict) else {}
        self.request_id: str | None = self.body.get("request_id")
        self.decision_id: str | None = self.body.get("decision_id")

    @property
    def reasons(self) -> list[dict[str, str]]:
        """The policy's reasons ({rule, message}), when the gateway gave them."""
        reasons = self.detail.get("reasons")
        return reasons if isinstance(reasons, list) else []


class TransportError(QuerygateError):
    """The gateway could not be reached, or did not answer in time."""


class BadRequest(QuerygateError):
    pass


class Unauthenticated(QuerygateError):
    pass


class TokenExpired(Unauthenticated):
    pass


class Forbidden(QuerygateError):
    pass


class PolicyDenied(Forbidden):
    pass


class ApprovalNotAccepted(Forbidden):
    pass


class NotFound(QuerygateError):
    pass


class RequestTimeout(QuerygateError):
    pass


class PayloadTooLarge(QuerygateError):
    pass


class Unprocessable(QuerygateError):
    pass


class TooManyRequests(QuerygateError):
    @property
    def retry_after_s(self) -> int | None:
        value = self.detail.get("retry_after_s")
        return value if isinstance(value, int) else None


class RateLimited(TooManyRequests):
    pass


class TooManyConcurrent(TooManyRequests):
    pass


class RowBudgetExhausted(TooManyRequests):
    pass


class Unavailable(QuerygateError):
    pass


class GatewayTimeout(QuerygateError):
    pass


class ServerError(QuerygateError):
    pass


BY_CODE: dict[str, type[QuerygateError]] = {
    "token_expired": TokenExpired,
    "policy_denied": PolicyDenied,
    "approval_not_accepted": ApprovalNotAccepted,
    "approval_not_usable": ApprovalNotAccepted,
    "approval_expired": ApprovalNotAccepted,
    "approval_mismatch": ApprovalNotAccepted,
    "approval_not_pending": ApprovalNotAccepted,
    "rate_limited": RateLimited,
    "too_many_concurrent": TooManyConcurrent,
    "row_budget_exhausted": RowBudgetExhausted,
}

BY_STATUS: dict[int, type[QuerygateError]] = {
    400: BadRequest, 401: Unauthenticated, 403: Forbidden, 404: NotFound, 408: RequestTimeout,
    413: PayloadTooLarge, 422: Unprocessable, 429: TooManyRequests, 503: Unavailable,
    504: GatewayTimeout,
}

# The status of the codes a stream's last line may carry (docs/errors.md).
STATUS_OF: dict[str, int] = {
    "response_too_large": 413, "statement_timeout": 408, "request_timeout": 504,
    "database_unavailable": 503, "audit_unavailable": 503, "database_error": 422,
    "result_not_representable": 422,
}


def error_from(status: int | None, body: Any) -> QuerygateError:
    """The typed error for an error body (``{"error": {"code", "message"}, …}``)."""
    if not isinstance(body, dict):
        body = {}
    error = body.get("error")
    code, message = "unexpected_answer", "the gateway's answer is not in its error shape"
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        code = error["code"]
        message = str(error.get("message", ""))
    kind = BY_CODE.get(code) or BY_STATUS.get(status or STATUS_OF.get(code, 0))
    if kind is None:
        kind = ServerError if status is None or status >= 500 else QuerygateError
    return kind(code, message, status, body)
