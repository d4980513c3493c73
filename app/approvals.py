"""Approvals: a query the policy holds until someone else says yes.

An approval lives in the gateway's own schema (``querygate_internal``, never visible through
the gateway because only the configured schemas are). It is bound to exactly what was asked:
the requester (issuer + subject), the SQL text byte for byte, a SHA-256 of the parameters and
the environment. It expires, and it is used at most once: the re-submission claims it with
one conditional UPDATE, so of two concurrent submissions exactly one gets it.

Lifecycle: pending → approved | rejected | expired; approved → used | expired.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg
import httpx
import orjson

from app.errors import Forbidden, NotFound, Unprocessable
from app.identity import Identity

log = logging.getLogger("querygate.approvals")

Status = Literal["pending", "approved", "rejected", "expired", "used"]
SCHEMA = "querygate_internal"

# Each entry moves the schema one version forward; start-up applies the missing ones.
MIGRATIONS: tuple[str, ...] = (
    f"""
    CREATE TABLE {SCHEMA}.approvals (
        id              uuid PRIMARY KEY,
        status          text NOT NULL CHECK (status IN
                            ('pending', 'approved', 'rejected', 'expired', 'used')),
        requester_iss   text NOT NULL,
        requester_sub   text NOT NULL,
        requester       jsonb NOT NULL,
        environment     text NOT NULL,
        sql_text        text NOT NULL,
        params_sha256   text NOT NULL,
        fingerprint     text NOT NULL,
        tables          text[] NOT NULL,
        approver_groups text[] NOT NULL,
        reason          text NOT NULL,
        decision_id     text NOT NULL,
        created_at      timestamptz NOT NULL DEFAULT now(),
        expires_at      timestamptz NOT NULL,
        decided_by      text,
        decided_at      timestamptz,
        comment         text,
        used_at         timestamptz
    );
    CREATE INDEX approvals_status ON {SCHEMA}.approvals (status, expires_at);
    """,
)


def params_hash(params: list[Any]) -> str:
    """SHA-256 of the parameters in a canonical JSON form (types and order matter)."""
    return hashlib.sha256(orjson.dumps(params, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(frozen=True, slots=True)
class Approval:
    """One approval record as the API shows it (never the parameter values)."""

    id: str
    status: Status
    requester: dict[str, Any]
    environment: str
    sql: str
    params_sha256: str
    fingerprint: str
    tables: tuple[str, ...]
    approver_groups: tuple[str, ...]
    reason: str
    decision_id: str
    created_at: dt.datetime
    expires_at: dt.datetime
    decided_by: str | None
    decided_at: dt.datetime | None
    comment: str | None
    used_at: dt.datetime | None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Approval:
        status = row["status"]
        if status in ("pending", "approved") and row["expires_at"] <= dt.datetime.now(dt.UTC):
            status = "expired"  # the stored row catches up on the next write
        return cls(
            id=str(row["id"]),
            status=status,
            requester=orjson.loads(row["requester"]),
            environment=row["environment"],
            sql=row["sql_text"],
            params_sha256=row["params_sha256"],
            fingerprint=row["fingerprint"],
            tables=tuple(row["tables"]),
            approver_groups=tuple(row["approver_groups"]),
            reason=row["reason"],
            decision_id=row["decision_id"],
            created_at=row["created_at"],
            expires_at=row["expires_at"],
            decided_by=row["decided_by"],
            decided_at=row["decided_at"],
            comment=row["comment"],
            used_at=row["used_at"],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "requester": {"sub": self.requester.get("sub"), "issuer": self.requester.get("issuer")},
            "environment": self.environment,
            "sql": self.sql,
            "params_sha256": self.params_sha256,
            "fingerprint": self.fingerprint,
            "tables": list(self.tables),
            "awaiting": {"approver_groups": list(self.approver_groups)}
            if self.status == "pending" else None,
            "reason": self.reason,
            "decision_id": self.decision_id,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "decided_by": self.decided_by,
            "decided_at": self.decided_at.isoformat() if self.decided_at else None,
            "comment": self.comment,
            "used_at": self.used_at.isoformat() if self.used_at else None,
        }

    def requested_by(self, identity: Identity) -> bool:
        """Whether ``identity`` made this request: the same subject of the same issuer."""
        return (self.requester.get("issuer"), self.requester.get("sub")) == (
            identity.issuer, identity.sub
        )

    def to_policy_input(self) -> dict[str, Any]:
        """The approval as policy sees it (for approvers, and on the re-submission)."""
        return {
            "id": self.id,
            "status": self.status,
            "requester": self.requester,
            "approver_groups": list(self.approver_groups),
            "tables": list(self.tables),
            "fingerprint": self.fingerprint,
            "decided_by": self.decided_by,
            "environment": self.environment,
        }


class ApprovalStore:
    """Approvals in PostgreSQL, created and migrated at start-up."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def migrate(self) -> None:
        """Create the schema and apply missing migrations, once, under an advisory lock."""
        async with self._pool.acquire() as conn, conn.transaction():
            # Several gateways may start at once: serialise the migration.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('querygate.migrate'))")
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_version (version int NOT NULL)"
            )
            version = await conn.fetchval(f"SELECT max(version) FROM {SCHEMA}.schema_version")
            for number, migration in enumerate(MIGRATIONS, start=1):
                if version is None or number > version:
                    await conn.execute(migration)
                    await conn.execute(
                        f"INSERT INTO {SCHEMA}.schema_version VALUES ($1)", number
                    )

    async def create(
        self,
        identity: Identity,
        environment: str,
        sql: str,
        params: list[Any],
        fingerprint: str,
        request: dict[str, Any],
        decision_id: str,
    ) -> Approval:
        approval_id = uuid.uuid4()
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=int(request["ttl_s"]))
        row = await self._pool.fetchrow(
            f"""INSERT INTO {SCHEMA}.approvals (id, status, requester_iss, requester_sub,
                    requester, environment, sql_text, params_sha256, fingerprint, tables,
                    approver_groups, reason, decision_id, expires_at)
                VALUES ($1, 'pending', $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                RETURNING *""",
            approval_id, identity.issuer, identity.sub,
            orjson.dumps(identity.to_input()).decode(), environment, sql, params_hash(params),
            fingerprint, list(request.get("tables") or []), list(request["approver_groups"]),
            str(request.get("message") or "the policy requires an approval"), decision_id,
            expires,
        )
        return Approval.from_row(row)

    async def get(self, approval_id: str) -> Approval:
        try:
            key = uuid.UUID(approval_id)
        except ValueError as exc:
            raise NotFound("approval_not_found", "no such approval") from exc
        row = await self._pool.fetchrow(f"SELECT * FROM {SCHEMA}.approvals WHERE id = $1", key)
        if row is None:
            raise NotFound("approval_not_found", "no such approval")
        return Approval.from_row(row)

    async def visible_to(self, identity: Identity, status: str | None) -> list[Approval]:
        """The caller's own requests and those awaiting one of the caller's groups."""
        rows = await self._pool.fetch(
            f"""SELECT * FROM {SCHEMA}.approvals
                WHERE (requester_iss = $1 AND requester_sub = $2) OR approver_groups && $3
                ORDER BY created_at DESC LIMIT 200""",
            identity.issuer, identity.sub, list(identity.groups),
        )
        approvals = [Approval.from_row(r) for r in rows]
        return [a for a in approvals if status is None or a.status == status]

    async def decide(
        self, approval: Approval, approver: Identity, status: Literal["approved", "rejected"],
        comment: str | None,
    ) -> Approval:
        """Record the approver's verdict; only a pending, unexpired approval can be decided."""
        row = await self._pool.fetchrow(
            f"""UPDATE {SCHEMA}.approvals
                SET status = $2, decided_by = $3, decided_at = now(), comment = $4
                WHERE id = $1 AND status = 'pending' AND expires_at > now()
                RETURNING *""",
            uuid.UUID(approval.id), status, approver.sub, comment,
        )
        if row is None:
            await self.expire(approval.id)
            current = await self.get(approval.id)
            raise Forbidden(
                "approval_not_pending", f"the approval is {current.status}, not pending"
            )
        return Approval.from_row(row)

    async def expire(self, approval_id: str) -> bool:
        """Mark an approval expired if its time has passed; True when this call did it."""
        result = await self._pool.execute(
            f"""UPDATE {SCHEMA}.approvals SET status = 'expired'
                WHERE id = $1 AND status IN ('pending', 'approved') AND expires_at <= now()""",
            uuid.UUID(approval_id),
        )
        return str(result).endswith(" 1")

    async def verify(
        self, approval_id: str, identity: Identity, environment: str, sql: str,
        params: list[Any],
    ) -> Approval:
        """The approval, if it is approved and bound to exactly this request."""
        approval = await self.get(approval_id)
        if not approval.requested_by(identity):
            raise Forbidden("approval_mismatch", "the approval belongs to another requester")
        if approval.environment != environment:
            raise Forbidden("approval_mismatch", "the approval is for another environment")
        if approval.sql != sql:
            raise Forbidden("approval_mismatch", "the SQL differs from what was approved")
        if approval.params_sha256 != params_hash(params):
            raise Forbidden("approval_mismatch", "the parameters differ from what was approved")
        if approval.status == "expired":
            await self.expire(approval_id)
            raise Forbidden("approval_expired", "the approval has expired")
        if approval.status != "approved":
            raise Forbidden(
                "approval_not_usable", f"the approval is {approval.status}, not approved"
            )
        return approval

    async def claim(self, approval: Approval, params: list[Any]) -> Approval:
        """Use a verified approval, once: of concurrent claims exactly one succeeds."""
        row = await self._pool.fetchrow(
            f"""UPDATE {SCHEMA}.approvals SET status = 'used', used_at = now()
                WHERE id = $1 AND status = 'approved' AND expires_at > now()
                  AND requester_iss = $2 AND requester_sub = $3 AND environment = $4
                  AND sql_text = $5 AND params_sha256 = $6
                RETURNING *""",
            uuid.UUID(approval.id), approval.requester.get("issuer"),
            approval.requester.get("sub"), approval.environment, approval.sql,
            params_hash(params),
        )
        if row is None:
            raise Forbidden("approval_not_usable", "the approval was used or expired meanwhile")
        return Approval.from_row(row)


class Notifier:
    """Slack-compatible webhook; failures are logged and never reach the request path."""

    def __init__(self, url: str | None, timeout_s: float = 3.0) -> None:
        self._url = url
        self._timeout = timeout_s
        self._tasks: set[asyncio.Task[None]] = set()

    def notify(self, text: str) -> None:
        if not self._url:
            return
        task = asyncio.create_task(self._send(text))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, text: str) -> None:
        assert self._url is not None
        try:
            async with httpx.AsyncClient(timeout=self._timeout) as client:
                response = await client.post(self._url, json={"text": text})
                response.raise_for_status()
        except Exception as exc:
            log.warning("approval webhook failed: %s", type(exc).__name__)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def validate_comment(comment: object) -> str | None:
    if comment is None:
        return None
    if not isinstance(comment, str) or len(comment) > 2000:
        raise Unprocessable("invalid_request", "comment must be a string of at most 2000 characters")
    return comment
