"""What the gateway answers, as typed values (the JSON is kept in ``raw``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str


@dataclass(frozen=True, slots=True)
class QueryResult:
    """The rows of an allowed statement; ``masked`` maps output names to their mask."""

    columns: list[Column]
    rows: list[list[Any]]
    rows_affected: int | None
    truncated: bool
    truncated_reason: str | None
    decision_id: str | None
    masked: dict[str, str]
    notices: list[dict[str, str]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> QueryResult:
        decision = body.get("decision") or {}
        return cls(
            columns=[Column(c["name"], c["type"]) for c in body.get("columns", [])],
            rows=list(body.get("rows", [])),
            rows_affected=body.get("rows_affected"),
            truncated=bool(body.get("truncated")),
            truncated_reason=body.get("truncated_reason"),
            decision_id=decision.get("id"),
            masked=dict(decision.get("masked") or {}),
            notices=list(body.get("notices") or []),
            raw=body,
        )


@dataclass(frozen=True, slots=True)
class Approval:
    """An approval request (docs/approvals.md); ``status``: pending, approved, rejected, …"""

    id: str
    status: str
    reason: str | None
    tables: list[str]
    decided_by: str | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Approval:
        return cls(body["id"], body["status"], body.get("reason"), list(body.get("tables", [])),
                   body.get("decided_by"), body)


@dataclass(frozen=True, slots=True)
class ApprovalPending:
    """The statement waits for an approval: poll it, and run it again with ``approval_id``
    once it is approved."""

    approval: Approval
    decision_id: str | None


@dataclass(frozen=True, slots=True)
class Explanation:
    """The facts and the decision for a statement; nothing was run."""

    facts: dict[str, Any]
    decision: dict[str, Any]
    identity: dict[str, Any]

    @property
    def allow(self) -> bool:
        return bool(self.decision.get("allow"))


@dataclass(frozen=True, slots=True)
class CatalogTable:
    table: str
    columns: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Catalog:
    """The tables and columns the caller may read, each column with its mask (or None)."""

    version: int
    tables: list[CatalogTable]
