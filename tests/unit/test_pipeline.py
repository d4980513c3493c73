"""The governed pipeline alone, with no HTTP at all: allow, mask, deny, approval, refusals.

A unit test of one module: the policy client, the executor, the approval store and the audit
log are fakes that write to one journal, so the order of the stages (a durable decision
before an approval is created or claimed and before anything executes; a refusal on record
before it leaves ``guard``) is what is asserted. The facts, masking plan, target choice and
the audit events themselves are the real code. The integration tests run the same path
against real OPA and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from app import pipeline
from app.approvals import Approval
from app.audit import AuditLog, RequestAudit
from app.catalog import build_catalog
from app.config import load_settings
from app.errors import Forbidden, GatewayError, Unavailable
from app.executor import StreamHead
from app.facts import FactsExtractor
from app.gateway import Gateway
from app.identity import Identity
from app.metrics import StageClock
from app.policy import Decision, DecisionCache, Reason
from app.results import Column, Result

REPO = Path(__file__).resolve().parents[2]

CATALOG = build_catalog(
    ("public",),
    [
        ("public", "customers", "r", "id", "int4"),
        ("public", "customers", "r", "email", "text"),
        ("public", "orders", "r", "id", "int4"),
        ("public", "orders", "r", "status", "text"),
    ],
    frozenset(),
    1,
)
ALICE = Identity("alice", ("analysts",), "https://idp.test")
PAT = Identity("pat", ("pii_readers",), "https://idp.test")
EMAIL = "public.customers.email"


class Journal(list[tuple[Any, ...]]):
    """What happened, in order, across every fake."""

    def kinds(self, sealed: bool = False) -> list[str]:
        """What happened; an audit event counts when durable ("audit"), and with
        ``sealed`` also when it was sealed into the chain ("sealed")."""
        return [entry[0] for entry in self if sealed or entry[0] != "sealed"]


class FakeAuditLog:
    """The audit log's interface to RequestAudit: events land in the journal."""

    def __init__(self, journal: Journal, fail: bool = False) -> None:
        self.journal = journal
        self.fail = fail

    def event(self, type_: str, **fields: Any) -> dict[str, Any]:
        return {"type": type_, **fields}

    async def record(self, event: dict[str, Any], *, gate: bool) -> None:
        await self.append(event, gate=gate)

    def append(self, event: dict[str, Any], *, gate: bool, wake: bool = True) -> Awaitable[None]:
        if self.fail:
            raise Unavailable("audit_unavailable", "the spool is full")
        self.journal.append(("sealed", event["type"]))

        async def durable() -> None:
            self.journal.append(("audit", event["type"], _what(event), gate, event))

        return durable()

    def record_nowait(self, event: dict[str, Any]) -> None:
        self.journal.append(("audit", event["type"], _what(event), False, event))


def _what(event: dict[str, Any]) -> str | None:
    for key, field in (("decision", "outcome"), ("execution", "outcome"), ("approval", "step")):
        if event["type"] == key:
            return str(event[key][field])
    return None


class FakePolicy:
    """Decides like rego/ in miniature: analysts get email masked, writes need approval
    unless one is presented, DELETE is denied; ``down`` makes OPA unreachable."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.down = False
        self.inputs: list[dict[str, Any]] = []

    async def decide(self, input_: dict[str, Any]) -> Decision:
        self.journal.append(("policy",))
        if self.down:
            raise Unavailable("policy_unavailable", "OPA is unreachable")
        self.inputs.append(input_)
        kind = input_["query"]["kind"]
        if kind == "delete":
            return Decision("d-deny", False, (Reason("no_delete", "DELETE is not allowed"),),
                            {}, None, None)
        if kind == "update" and input_["approval"] is None:
            return Decision("d-held", True, (), {}, {"approver_groups": ["dba"], "ttl_s": 60,
                                                    "reason": "writes need a DBA"}, None)
        return Decision("d-allow", True, (), {}, None, 100)

    async def masking_profile(self, input_: dict[str, Any]) -> tuple[dict[str, str], str | None]:
        masked = "analysts" in input_["identity"]["groups"]
        return ({EMAIL: "email"} if masked else {}), None


def _approval(status: str = "pending") -> Approval:
    now = dt.datetime.now(dt.UTC)
    return Approval(
        id="a-1", status=status, requester={"sub": "alice", "issuer": "https://idp.test"},
        environment="dev", sql="UPDATE orders SET status = 'x' WHERE id = 1",
        params_sha256="", fingerprint="sha256:x", tables=("public.orders",),
        approver_groups=("dba",), reason="writes need a DBA", decision_id="d-held",
        created_at=now, expires_at=now + dt.timedelta(minutes=1), decided_by=None,
        decided_at=None, comment=None, used_at=None,
    )


class FakeApprovals:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    async def verify(self, approval_id: str, *_: Any) -> Approval:
        self.journal.append(("approval.verify", approval_id))
        return _approval("approved")

    async def create(self, *_: Any) -> Approval:
        self.journal.append(("approval.create",))
        return _approval()

    async def claim(self, approval: Approval, params: list[Any]) -> None:
        self.journal.append(("approval.claim", approval.id))


class FakeExecutor:
    """Makes the real masking plan from the server's columns, as the executor does."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def target(self, sql: str, db_role: str | None = None) -> Any:
        return SimpleNamespace(pool=None, sql=sql, db_role=db_role, masked=frozenset())

    async def run(self, target: Any, params: Any, facts: Any, limit: int, rules: Any,
                  **options: Any) -> Result:
        self.journal.append(("execute", target.sql, target.masked))
        columns = tuple(Column(o.name, o.type or "text") for o in facts.outputs)
        plan = rules.for_columns(facts, columns)
        rows = plan.apply_all([[1, "a***@example.com"][: len(columns)]] if columns else [])
        affected = 1 if facts.kind == "update" else None
        return Result(plan.columns, [options["encode"](r) for r in rows], False, "",
                      affected, masked=plan.masked)


    async def stream(self, target: Any, params: Any, facts: Any, max_rows: Any, rules: Any,
                     batch_rows: int, **_: Any) -> AsyncIterator[Any]:
        self.journal.append(("execute", target.sql, target.masked))
        columns = tuple(Column(o.name, o.type or "text") for o in facts.outputs)
        plan = rules.for_columns(facts, columns)
        try:
            yield StreamHead(plan.columns, plan.masked)
            yield plan.apply_all([[1, "a***@example.com"], [2, "b***@example.com"]])
        finally:
            self.journal.append(("connection released",))


class FakeProfiles:
    async def get(self, spec: Any, catalog: Any) -> Any:
        return SimpleNamespace(pool=None, schema_map={})


def _gateway(journal: Journal) -> Gateway:
    settings = load_settings(environment="dev")
    fake_policy = cast(Any, FakePolicy(journal))
    gateway = Gateway(
        settings=settings,
        authenticator=cast(Any, None),  # the caller arrives verified
        extractor=FactsExtractor(settings.max_sql_bytes),
        policy=fake_policy,
        decisions=DecisionCache(fake_policy, 0, 1),  # off: every decision is asked
    )
    gateway.catalog = CATALOG
    gateway.approvals = cast(Any, FakeApprovals(journal))
    gateway.executor = cast(Any, FakeExecutor(journal))
    gateway.profiles = cast(Any, FakeProfiles())
    return gateway


async def _run(
    journal: Journal, identity: Identity, sql: str, *, approval_id: str | None = None,
    gateway: Gateway | None = None, audit_fails: bool = False, stream: bool = False,
) -> tuple[Any, RequestAudit]:
    gateway = gateway or _gateway(journal)
    audit = RequestAudit(
        log=cast(AuditLog, FakeAuditLog(journal, audit_fails)), request_id="r-1",
        source_ip="10.0.0.7", method="POST", path="/v1/query", clock=StageClock(None),
    )
    audit.identity = identity
    loop = asyncio.get_running_loop()
    budget = pipeline.Budget(loop.time() + 5, loop.time() + 10)
    meta = pipeline.Meta("r-1", "10.0.0.7", budget, "pgwire", stream)
    async with pipeline.guard(audit, budget):
        outcome = await pipeline.query(
            gateway, audit, identity, pipeline.Statement(sql, (), approval_id), meta
        )
        return outcome, audit
    raise AssertionError("guard re-raises")


def _audits(journal: Journal) -> list[tuple[str, str | None, bool]]:
    return [(e[1], e[2], e[3]) for e in journal if e[0] == "audit"]


def test_allow_runs_after_a_durable_decision_and_records_the_execution():
    journal = Journal()
    outcome, _ = asyncio.run(_run(journal, PAT, "SELECT id, email FROM customers"))
    assert isinstance(outcome, pipeline.Rows)
    assert outcome.result.masked == {}
    assert [json.loads(r) for r in outcome.result.rows] == [[1, "a***@example.com"]]
    # A read runs while its decision is written, and its answer waits for it (a write waits
    # before it runs: the approval tests below).
    # Its outcome is sealed before its decision is awaited (one fsync for both, in a spool).
    assert journal.kinds(sealed=True) == ["policy", "sealed", "execute", "sealed", "audit",
                                          "audit"]
    assert _audits(journal) == [("decision", "allow", True), ("execution", "ok", False)]


def test_the_policy_input_is_built_from_plain_values():
    journal = Journal()
    gateway = _gateway(journal)
    asyncio.run(_run(journal, PAT, "SELECT id FROM customers", gateway=gateway))
    [input_] = cast(FakePolicy, gateway.policy).inputs
    assert input_["request"]["source_ip"] == "10.0.0.7"
    assert input_["request"]["id"] == "r-1"
    assert input_["identity"]["sub"] == "pat"
    assert input_["query"]["tables"]["read"] == ["public.customers"]


def test_masks_policy_chose_for_the_caller_are_enforced_and_recorded():
    journal = Journal()
    outcome, _ = asyncio.run(_run(journal, ALICE, "SELECT id, email FROM customers"))
    assert isinstance(outcome, pipeline.Rows)
    assert outcome.decision.masks == {EMAIL: "email"}
    assert outcome.result.masked == {"email": "email"}
    [(_, _, masked)] = [e for e in journal if e[0] == "execute"]
    assert masked == frozenset({EMAIL})  # the database masks it (a masking profile)
    execution = [e[4] for e in journal if e[0] == "audit" and e[1] == "execution"]
    assert execution[0]["execution"]["masked_columns"] == {"email": "email"}


def test_a_denial_is_audited_before_it_leaves_and_nothing_runs():
    journal = Journal()
    with pytest.raises(Forbidden) as refused:
        asyncio.run(_run(journal, PAT, "DELETE FROM orders WHERE id = 1"))
    assert refused.value.code == "policy_denied"
    assert "execute" not in journal.kinds()
    assert _audits(journal) == [("decision", "deny", False)]
    [event] = [e[4] for e in journal if e[0] == "audit"]
    assert event["decision"]["by"] == "policy" and event["decision"]["code"] == "policy_denied"


def test_an_approval_is_created_only_after_the_request_is_on_record():
    journal = Journal()
    outcome, _ = asyncio.run(_run(journal, ALICE, "UPDATE orders SET status = 'x' WHERE id = 1"))
    assert isinstance(outcome, pipeline.Held)
    assert outcome.approval.id == "a-1"
    assert journal.kinds() == ["policy", "audit", "approval.create", "audit"]
    assert _audits(journal) == [("decision", "approval_required", True),
                                ("approval", "requested", True)]


def test_an_approval_is_claimed_after_the_allow_is_durable_and_before_execution():
    journal = Journal()
    outcome, _ = asyncio.run(_run(
        journal, ALICE, "UPDATE orders SET status = 'x' WHERE id = 1", approval_id="a-1"
    ))
    assert isinstance(outcome, pipeline.Rows)
    assert outcome.result.rows_affected == 1
    assert journal.kinds() == ["approval.verify", "policy", "audit", "approval.claim",
                               "audit", "execute", "audit"]
    assert _audits(journal) == [("decision", "allow", True), ("approval", "used", True),
                                ("execution", "ok", False)]


def test_a_refusal_by_the_gateway_is_audited_without_asking_policy():
    journal = Journal()
    with pytest.raises(GatewayError) as refused:
        asyncio.run(_run(journal, PAT, "SELECT secret FROM nowhere"))
    assert "policy" not in journal.kinds()
    [event] = [e[4] for e in journal if e[0] == "audit"]
    assert event["decision"]["outcome"] == "deny"
    assert event["decision"]["by"] == "gateway"
    assert event["decision"]["code"] == refused.value.code


def test_policy_unavailable_is_an_audited_error_and_nothing_runs():
    journal = Journal()
    gateway = _gateway(journal)
    cast(FakePolicy, gateway.policy).down = True
    with pytest.raises(Unavailable) as refused:
        asyncio.run(_run(journal, PAT, "SELECT id FROM customers", gateway=gateway))
    assert refused.value.code == "policy_unavailable"
    assert "execute" not in journal.kinds()
    assert _audits(journal) == [("decision", "error", False)]


def test_nothing_runs_when_the_decision_cannot_be_recorded():
    journal = Journal()
    with pytest.raises(Unavailable) as refused:
        asyncio.run(_run(journal, PAT, "SELECT id FROM customers", audit_fails=True))
    assert refused.value.code == "audit_unavailable"
    assert "execute" not in journal.kinds()


def test_a_stream_records_its_own_end():
    journal = Journal()

    async def run() -> list[bytes]:
        outcome, _ = await _run(journal, ALICE, "SELECT id, email FROM customers", stream=True)
        assert isinstance(outcome, pipeline.Streamed)
        assert outcome.head.masked == {"email": "email"}
        return [chunk async for chunk in outcome.rows.chunks()]

    chunks = asyncio.run(run())
    assert b"".join(chunks).count(b"\n") == 2
    # The rows ran out (the connection went back), then the end is on record.
    assert journal.kinds() == ["policy", "audit", "execute", "connection released", "audit"]
    assert _audits(journal) == [("decision", "allow", True), ("execution", "ok", False)]


def test_a_stream_closed_before_its_rows_is_recorded_as_aborted():
    journal = Journal()

    async def run() -> None:
        outcome, _ = await _run(journal, ALICE, "SELECT id, email FROM customers", stream=True)
        await outcome.rows.aclose()  # the client went away after the header

    asyncio.run(run())
    assert journal.kinds()[-2:] == ["audit", "connection released"]
    assert _audits(journal)[-1] == ("execution", "aborted", False)


def test_the_pipeline_imports_no_web_framework():
    # A fresh interpreter: what importing the pipeline pulls in, transitively.
    probe = (
        "import sys, app.pipeline; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'starlette')))"
    )
    answer = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert answer.stdout.strip() == "[]"
