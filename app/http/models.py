"""The HTTP contract: request and response bodies as Pydantic models.

Requests are validated with them. Responses are rendered with orjson straight from the
pipeline's values (no per-request validation of row payloads on the hot path); the models
document their shape in /openapi.json, and the schemathesis test holds the two together.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QueryRequest(_Model):
    """The body of /v1/query and /v1/explain."""

    sql: str = Field(min_length=1, description="Exactly one SQL statement; $1… placeholders.")
    params: list[JsonValue] = Field(
        default_factory=list, description="Values bound to $1, $2, … (never interpolated)."
    )
    approval_id: str | None = Field(
        default=None, max_length=64,
        description="The approval this re-submission uses (from a 202 answer to it).",
    )


class DecideRequest(_Model):
    """The optional body of an approve or reject."""

    comment: str | None = Field(default=None, description="Why; kept with the approval.")


class ErrorDetail(BaseModel):
    """A stable ``code`` (docs/errors.md), a message for people, and fields that help
    (``reasons``, ``sqlstate``, ``problems``, ``columns``, ``checks``, …)."""

    model_config = ConfigDict(extra="allow")

    code: str
    message: str


class ErrorBody(BaseModel):
    """The one error shape of every endpoint."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail
    decision_id: str | None = Field(default=None, description="Present when policy was asked.")
    request_id: str = Field(description="Also sent as the X-Request-Id header.")


class Reason(_Model):
    rule: str
    message: str


class ColumnOut(_Model):
    name: str
    type: str = Field(description="PostgreSQL's type name, as the answer reports it.")


class Notice(_Model):
    code: Literal["masked_predicate"]
    message: str


class DecisionSummary(_Model):
    """The decision an answer was given under: never a value."""

    id: str
    reasons: list[Reason]
    masked: dict[str, str] = Field(description="Masked output columns → strategy.")


class QueryAnswer(_Model):
    """A 200 JSON answer of /v1/query."""

    notices: list[Notice] | None = None
    columns: list[ColumnOut]
    rows: list[list[JsonValue]] = Field(description="One array per row, in column order.")
    row_count: int
    rows_affected: int | None
    truncated: bool
    truncated_reason: Literal["max_rows", "response_bytes"] | None
    decision: DecisionSummary


class StreamHeader(_Model):
    """NDJSON, first line: the columns and the decision."""

    columns: list[ColumnOut]
    decision: DecisionSummary
    notices: list[Notice] | None = None


class StreamEnd(_Model):
    """NDJSON, last line of a stream that ran to its end."""

    row_count: int
    complete: Literal[True]


class StreamError(_Model):
    """NDJSON, last line of a stream cut short (``response_too_large``, a deadline, a
    database error): the error shape plus how many rows were sent."""

    error: ErrorDetail
    decision_id: str | None = None
    request_id: str
    row_count: int
    complete: Literal[False]


class Requester(_Model):
    sub: str | None
    issuer: str | None


class Awaiting(_Model):
    approver_groups: list[str]


class ApprovalOut(_Model):
    """An approval as the API shows it (never the parameter values: only their hash)."""

    id: str
    status: Literal["pending", "approved", "rejected", "expired", "used"]
    requester: Requester
    environment: str
    sql: str
    params_sha256: str
    fingerprint: str
    tables: list[str]
    awaiting: Awaiting | None = Field(description="Who may decide, while pending.")
    reason: str
    decision_id: str
    created_at: str
    expires_at: str
    decided_by: str | None
    decided_at: str | None
    comment: str | None
    used_at: str | None


class ApprovalHeld(_Model):
    """A 202 answer of /v1/query: the statement waits for this approval."""

    approval: ApprovalOut
    decision_id: str


class ApprovalOne(_Model):
    approval: ApprovalOut


class ApprovalList(_Model):
    approvals: list[ApprovalOut]


class ExplainDecision(_Model):
    id: str
    allow: bool
    reasons: list[Reason]
    masks: dict[str, str]
    derived_mask: str
    masked_predicates_allowed: list[str]
    require_approval: dict[str, JsonValue] | None
    max_rows: int | None
    max_rows_affected: int | None
    rows_per_hour: int | None
    db_role: str | None


class ExplainAnswer(_Model):
    """The identity and facts as policy saw them (docs/decision-contract.md) and its
    decision; nothing executed."""

    identity: dict[str, JsonValue]
    facts: dict[str, JsonValue]
    decision: ExplainDecision


class CatalogColumnOut(_Model):
    name: str
    type: str
    mask: str | None = Field(description="The mask policy applies to this column now, if any.")


class CatalogTable(_Model):
    table: str = Field(description="schema.table")
    columns: list[CatalogColumnOut]


class CallerCatalogAnswer(_Model):
    """What this caller may read, and how each column would come back."""

    version: int
    tables: list[CatalogTable]


class RefreshAnswer(_Model):
    version: int
    changed: bool
    relations: int


class ClassifiedColumn(_Model):
    column: str
    type: str
    relation_kind: str
    class_: str | None = Field(alias="class")
    class_source: Literal["policy data", "column name"] | None


class AdminCatalogAnswer(_Model):
    version: int
    columns: list[ClassifiedColumn]


class Health(_Model):
    status: Literal["ok"]


class Ready(_Model):
    status: Literal["ready"]
    checks: dict[str, str]


NDJSON_DESCRIPTION = (
    "With `Accept: application/x-ndjson` a query is streamed, one JSON value per line: "
    "first a `StreamHeader`, then one JSON array per row, then a `StreamEnd` "
    "(`complete: true`) or, when the stream was cut short, a `StreamError` "
    "(`complete: false`)."
)
