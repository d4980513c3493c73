"""The governed path of a statement, whatever protocol brought it: facts → policy → enforce
→ approvals → audit → execute, and the audit of every outcome, in one place.

A front end (HTTP: app/http/; the PostgreSQL wire protocol: app/pgwire/; MCP: app/mcp/) only
translates. It verifies who is calling with its own credentials (``RequestAudit.auth_failed``
records a failure), calls ``admit`` before it reads anything else, reads the statement, and
runs everything under ``guard``, which bounds it by the request's deadline and audits any
refusal before it propagates. It then renders the outcome this module hands back:

- ``Rows``: a whole answer (masked rows, already encoded as JSON, and counts);
- ``Streamed``: a ``StreamHead`` and a ``RowStream`` of encoded rows that audits its own end;
- ``Held``: the statement waits for an approval (its request is on record);
- ``Explained``: the facts and the decision, nothing executed;
- ``CallerCatalog``: what this caller may read, with the masks policy would apply now;
- a refusal: a ``GatewayError`` (app/errors.py), already audited when it leaves ``guard``.

The order the audit trail promises (docs/audit.md): a durable decision before an approval
is created or claimed and before anything executes; a refusal on record before it is
answered. Nothing here imports a web framework (a test checks it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from app import introspection, masking, policy
from app.approvals import Approval
from app.audit import RequestAudit
from app.config import Settings
from app.errors import (
    Forbidden,
    GatewayError,
    GatewayTimeout,
    NotFound,
    PayloadTooLarge,
    Unavailable,
    Unprocessable,
)
from app.executor import StreamHead, Target
from app.facts import QueryFacts
from app.gateway import Gateway
from app.identity import Identity
from app.limits import Allowance, Slot
from app.metrics import StageClock
from app.policy import Decision
from app.profiles import quote_ident
from app.results import Result, encode_row

log = logging.getLogger("querygate.pipeline")

Channel = Literal["http", "pgwire", "mcp"]

# The request's own bound fires this long after its deadline. The executor closes a
# connection still in use at the deadline itself (and answers request_timeout), so a
# database call is always ended there; this ends whatever else is still waiting.
BACKSTOP_S = 0.25


@dataclass(slots=True)
class Budget:
    """A request's deadlines (event loop clock) and the caller's statement slot."""

    at: float
    stream_at: float
    slot: Slot | None = None

    @classmethod
    def start(cls, settings: Settings) -> Budget:
        now = asyncio.get_running_loop().time()
        return cls(now + settings.request_timeout_s, now + settings.stream_timeout_s)

    def hand_off(self) -> Slot | None:
        """The slot, for a stream to release when it ends."""
        if self.slot is not None:
            self.slot.handed_off = True
        return self.slot

    def release(self) -> None:
        if self.slot is not None and not self.slot.handed_off:
            self.slot.release()


@dataclass(frozen=True, slots=True)
class Statement:
    """What the caller sent: the SQL text, its parameters, an approval it uses, and the
    most rows it wants back (None: as many as the limits allow)."""

    sql: str
    params: Sequence[Any] = ()
    approval_id: str | None = None
    max_rows: int | None = None


@dataclass(frozen=True, slots=True)
class Meta:
    """How the request came: its id, the caller's address, the channel, the deadlines, and
    whether the caller wants the rows as a stream."""

    request_id: str
    source_ip: str | None
    budget: Budget
    channel: Channel = "http"
    stream: bool = False


@dataclass(frozen=True, slots=True)
class Evaluation:
    """Who asked what, and what policy said: the front half of a query and an explain."""

    identity: Identity
    statement: Statement
    facts: QueryFacts
    decision: Decision
    approval: Approval | None
    # A cached allow taken before its revision probe returned: the probe
    # (``DecisionCache.speculate``), which must say True before a write runs or a read is
    # answered.
    confirm: asyncio.Future[bool] | None = None


class _Stale(Exception):  # internal: never leaves query()
    """A read ran on a cached decision whose bundle revision is no longer active."""


def _is_read(facts: QueryFacts, statement: Statement, meta: Meta) -> bool:
    """A JSON-mode query that changes nothing and uses no approval: it may run while its
    decision is written (audit) and while its cached decision is confirmed (policy)."""
    return (facts.kind == "select" and not facts.tables_write
            and statement.approval_id is None and not meta.stream)


@dataclass(frozen=True, slots=True)
class Rows:
    """A whole answer: ``result.rows`` are encoded JSON arrays (``results.encode_row``)."""

    decision: Decision
    result: Result
    notices: list[dict[str, str]]


@dataclass(frozen=True, slots=True)
class Held:
    """The statement waits for an approval; the request is on record."""

    decision: Decision
    approval: Approval


@dataclass(frozen=True, slots=True)
class Explained:
    """The facts and the decision for a statement; nothing executed."""

    identity: Identity
    facts: QueryFacts
    decision: Decision


@dataclass(slots=True)
class Streamed:
    """A stream: its head now, its rows as the front end sends them.

    ``slot`` is the caller's statement slot, to release when the stream ends; ``deadline``
    bounds the whole stream (sends to a client that stopped reading included).
    """

    decision: Decision
    head: StreamHead
    notices: list[dict[str, str]]
    rows: RowStream
    deadline: float
    slot: Slot | None


@dataclass(frozen=True, slots=True)
class CatalogColumn:
    """A column the caller may read, with the mask policy applies to it now (or None)."""

    name: str
    type: str
    mask: str | None


@dataclass(frozen=True, slots=True)
class CallerCatalog:
    """The tables and columns one caller may read."""

    version: int
    tables: dict[str, tuple[CatalogColumn, ...]]


@contextlib.asynccontextmanager
async def within(deadline: float) -> AsyncIterator[None]:
    """Bound the request's handling by its deadline: past it, 504 request_timeout."""
    try:
        async with asyncio.timeout_at(deadline + BACKSTOP_S) as scope:
            yield
    except TimeoutError:
        if not scope.expired():
            raise
        raise GatewayTimeout(
            "request_timeout",
            "the request ran past its deadline (QUERYGATE_REQUEST_TIMEOUT_MS)",
        ) from None


@contextlib.asynccontextmanager
async def guard(audit: RequestAudit, budget: Budget) -> AsyncIterator[None]:
    """The one exit of a request: bounded by its deadline, and any refusal audited before
    it propagates (or it becomes a 503 audit_unavailable); the slot freed unless a stream
    took it over."""
    try:
        async with within(budget.at):
            yield
    except asyncio.CancelledError:
        audit.aborted()
        raise
    except Exception as exc:
        await audit.refused(exc)
        raise
    finally:
        budget.release()


def admit(gateway: Gateway, identity: Identity) -> None:
    """Before any work for this caller: 429 rate_limited past its rate."""
    gateway.limits.admit((identity.issuer, identity.sub))


async def evaluate(
    gateway: Gateway, audit: RequestAudit, identity: Identity, statement: Statement, meta: Meta,
    speculate: bool = False,
) -> Evaluation:
    """Facts and decision — nothing executed; what is learnt is kept in ``audit``.

    With ``speculate``, an allow may come from the cache before its revision probe has
    returned (``Evaluation.confirm``), for the caller to wait for before anything takes
    effect; a cached refusal or approval request waits for the probe here.
    """
    audit.sql = statement.sql
    catalog = gateway.catalog
    if catalog is None or gateway.approvals is None:
        raise Unavailable("database_unavailable", "the catalog has not been read yet")
    with audit.clock.timer("facts"):
        facts = gateway.extractor.extract(statement.sql, catalog)
    audit.facts = facts
    if len(statement.params) != facts.param_count:
        raise Unprocessable(
            "invalid_parameters",
            f"the statement uses {facts.param_count} parameters; {len(statement.params)} "
            "were given",
        )
    if facts.setting_params:
        introspection.check_setting_parameters(facts.setting_params, statement.params)
    approval = None
    if statement.approval_id is not None:
        # Bound to requester, SQL text, parameters and environment, or refused here.
        approval = await gateway.approvals.verify(
            statement.approval_id, identity, gateway.settings.environment, statement.sql,
            list(statement.params),
        )
    settings = gateway.settings
    try:
        with audit.clock.timer("policy"):
            input_ = policy.decision_input(
                identity, facts, catalog, environment=settings.environment,
                database=settings.database_name, request_id=meta.request_id,
                source_ip=meta.source_ip, approval=approval, channel=meta.channel,
            )
            # An approval has a state of its own (claimed, expiring): never from the cache.
            if speculate:
                decision, confirm = await gateway.decisions.speculate(
                    input_, catalog.version, cacheable=approval is None)
                if confirm is not None and (
                    not decision.allow or decision.require_approval is not None
                ):
                    # Only an allow may be acted on before its probe returns (the read
                    # runs, and is answered after it): a refusal or an approval request
                    # would take effect at once.
                    if not await confirm:
                        decision = await gateway.decisions.decide(
                            input_, catalog.version, cacheable=approval is None)
                    confirm = None
            else:
                decision = await gateway.decisions.decide(
                    input_, catalog.version, cacheable=approval is None)
                confirm = None
    except Unavailable:
        gateway.metrics.opa_errors.inc()
        raise
    audit.decision = decision
    return Evaluation(identity, statement, facts, decision, approval, confirm)


def enforce(decision: Decision, facts: QueryFacts) -> None:
    """Refuse what policy denied, and masked columns used as predicates."""
    if not decision.allow:
        raise Forbidden(
            "policy_denied",
            "; ".join(r.message for r in decision.reasons) or "denied by policy",
            reasons=decision.reasons_json(),
            decision_id=decision.id,
        )
    masking.check_predicates(facts, decision)


def notices(facts: QueryFacts, decision: Decision) -> list[dict[str, str]]:
    """What the caller should know to read the answer right (never a value)."""
    compared = sorted(c for c in facts.columns_predicate if c in decision.masks)
    if not compared:
        return []
    return [{
        "code": "masked_predicate",
        "message": "these columns are masked, so filters, joins, grouping and sorting on them "
        "compared masked values, not the real ones: " + ", ".join(compared),
    }]


async def approval_event(
    gateway: Gateway, audit: RequestAudit, approval: Approval, event: str, actor: str,
    gate: bool = False,
) -> None:
    """Audit (and, with a webhook, announce) an approval lifecycle step; never parameter values."""
    await audit.approval(event, approval, gate=gate, comment=approval.comment)
    if event in ("requested", "approved", "rejected"):
        console = gateway.settings.console_public_url
        gateway.notifier.notify(
            f"querygate approval {approval.id} {event} by {actor}: "
            f"{approval.reason} (requester {approval.requester.get('sub')}, "
            f"environment {approval.environment}, tables {', '.join(approval.tables)})"
            # The approval's page in the console (docs/console.md), where it is decided.
            + (f" {console.rstrip('/')}/approvals/{approval.id}" if console else "")
        )


async def _confirmed(ev: Evaluation, audit: RequestAudit, decision_durable: Awaitable[None]) -> None:
    """Return once a read's cached decision is confirmed (``Evaluation.confirm``), leaving
    ``decision_durable`` to the caller. Otherwise it is awaited here: OPA unreachable is
    503 ``policy_unavailable``; a new bundle active is ``_Stale``, its outcome on record."""
    if ev.confirm is None:
        return
    try:
        confirmed = await ev.confirm
    except Exception:
        await decision_durable
        raise
    if confirmed:
        return
    try:
        stale = audit.executed(outcome="error", code="decision_stale", rows_returned=0)
    except GatewayError:
        await decision_durable
        raise
    try:
        await decision_durable
    finally:
        await stale
    raise _Stale


def _record_times(clock: StageClock, started: float, masking_s: float) -> None:
    """The executor's time, split into masking and the database's share."""
    total = time.perf_counter() - started
    clock.add("masking", masking_s)
    clock.add("database", max(0.0, total - masking_s))


async def query(
    gateway: Gateway, audit: RequestAudit, identity: Identity, statement: Statement, meta: Meta
) -> Rows | Streamed | Held:
    """Decide and, if allowed, run the statement; each step is audited before it shows.

    Call it inside ``guard``: a refusal raised here is audited there.

    A read with a cached allow runs while the probe that confirms the decision's bundle
    revision is out (``DecisionCache.speculate``), and is answered only once it said yes;
    anything else waits for the probe before it runs, while its decision is written. When a
    new bundle became active meanwhile, the request is not answered: its outcome is
    recorded as ``decision_stale``, and the request is decided again by the new policy and
    run again, as if it had just arrived.
    """
    try:
        return await _query(gateway, audit, identity, statement, meta, speculate=True)
    except _Stale:
        _restart(audit, meta)
        return await _query(gateway, audit, identity, statement, meta, speculate=False)


@dataclass(frozen=True, slots=True)
class Authorized:
    """A statement policy allowed, its allow on record, ready to run on ``target``: what a
    front end that runs statements itself (the wire protocol) gets from ``authorize``.

    ``decision`` is the enforced one (the masks of the caller's profile included);
    ``rules`` mask what the database does not (outputs derived from masked columns);
    ``max_rows`` is the policy's cap (None: none), ``max_rows_affected`` its blast radius.
    ``allowance``, under a ``rows_per_hour`` budget, is what the agent may still receive
    (``max_rows`` is then at most that); hand it to ``finished``.
    """

    facts: QueryFacts
    decision: Decision
    target: Target
    rules: masking.Rules
    max_rows: int | None
    max_rows_affected: int | None
    # A read's decision, still being written while it runs (``authorize(overlap_reads=
    # True)``): nothing of its answer may reach the client before it is done; ``finished``
    # awaits it, with the outcome's (one fsync for both; awaiting it wakes the writer, so
    # a front end that must answer earlier may await it alone). None: durable before
    # ``authorize`` returned.
    durable: Awaitable[None] | None = None
    allowance: Allowance | None = None


@dataclass(frozen=True, slots=True)
class _Ready:
    ev: Evaluation
    target: Target
    enforced: Decision
    rules: masking.Rules
    # A read's decision, still being written while it runs; None once durable.
    decision_durable: Awaitable[None] | None
    # The rows this statement may return under its agent's hourly budget (None: no budget).
    allowance: Allowance | None = None


def row_limit(settings: Settings, decision: Decision, statement: Statement,
              stream: bool) -> int | None:
    """The most rows a statement returns: the policy's cap, the caller's own and, for a JSON
    answer, QUERYGATE_MAX_ROWS (a stream's memory is not bounded by rows)."""
    caps = [c for c in (decision.max_rows, statement.max_rows) if c is not None]
    if not stream:
        caps.append(settings.max_rows)
    return min(caps) if caps else None


async def authorize(
    gateway: Gateway, audit: RequestAudit, identity: Identity, statement: Statement, meta: Meta,
    *, overlap_reads: bool = False,
) -> Authorized | Held:
    """Decide the statement; if allowed, say where to run it, its allow durable first.

    The steps and the order of ``query`` up to execution (refusals, approvals, the caller's
    slot, a claimed approval), for a front end that runs the statement itself. Nothing may
    run before the decision is durable and, on a cached allow, confirmed: a stale one is on
    record (``decision_stale``) and decided again here. Call it inside ``guard`` (an error
    raised there is audited there) and report the end with ``finished``.
    """
    try:
        ready = await _authorize(gateway, audit, identity, statement, meta, True,
                                 overlap=overlap_reads)
        if not isinstance(ready, Held) and ready.decision_durable is not None:
            # A read: it may run while its decision is written, but not on a cached
            # decision whose bundle is no longer active.
            await _confirmed(ready.ev, audit, ready.decision_durable)
    except _Stale:
        _restart(audit, meta)
        ready = await _authorize(gateway, audit, identity, statement, meta, False,
                                 overlap=overlap_reads)
    if isinstance(ready, Held):
        return ready
    decision = ready.ev.decision
    max_rows = decision.max_rows if ready.allowance is None else ready.allowance.rows
    return Authorized(ready.ev.facts, ready.enforced, ready.target, ready.rules,
                      max_rows, decision.max_rows_affected, ready.decision_durable,
                      ready.allowance)


async def finished(
    gateway: Gateway, audit: RequestAudit, facts: QueryFacts, *, rows_returned: int,
    rows_affected: int | None, truncated: bool, masked: dict[str, str],
    decision_durable: Awaitable[None] | None = None, allowance: Allowance | None = None,
) -> None:
    """The outcome of a statement that ``authorize`` let run and that ran to its end; with
    ``decision_durable`` (``Authorized.durable``), once both are durable (a spool that
    cannot make the decision so raises, and the answer must not be given). ``allowance``
    (``Authorized.allowance``) is settled by the rows returned."""
    if allowance is not None:
        allowance.settle(rows_returned)
    if decision_durable is not None:
        # The outcome first: its append wakes the writer, which syncs both in one batch.
        outcome: Awaitable[None] | None = None
        try:
            outcome = audit.executed(outcome="ok", rows_returned=rows_returned,
                                     rows_affected=rows_affected, truncated=truncated,
                                     masked=masked)
        except GatewayError:
            log.error("the outcome of request %s could not be audited", audit.request_id)
        try:
            await decision_durable
        finally:
            if outcome is not None:
                try:
                    await outcome
                except GatewayError:
                    log.error("the outcome of request %s could not be audited",
                              audit.request_id)
        return
    if facts.kind == "ddl":
        # The profiles' views of the changed tables may have been dropped for the DDL:
        # every recorded profile's come back from the new catalog now, for the other
        # replicas too, which would otherwise wait for their next refresh.
        catalog = await gateway.refresh_catalog()
        assert gateway.profiles is not None
        await gateway.profiles.resync_recorded(catalog)
    try:
        await audit.executed(outcome="ok", rows_returned=rows_returned,
                             rows_affected=rows_affected, truncated=truncated, masked=masked)
    except GatewayError:
        # The statement ran (its allow decision is on record): answer it all the same.
        log.error("the outcome of request %s could not be audited", audit.request_id)


def _restart(audit: RequestAudit, meta: Meta) -> None:
    audit.restart()
    meta.budget.release()
    meta.budget.slot = None


async def _authorize(
    gateway: Gateway, audit: RequestAudit, identity: Identity, statement: Statement, meta: Meta,
    speculate: bool, *, overlap: bool,
) -> _Ready | Held:
    settings = gateway.settings
    budget = meta.budget
    ev = await evaluate(gateway, audit, identity, statement, meta, speculate)
    facts, decision = ev.facts, ev.decision
    assert gateway.executor is not None and gateway.approvals is not None
    try:
        enforce(decision, facts)
        # Where it runs, and every refusal of that step (a profile PostgreSQL cannot
        # prepare, ONLY for a masked caller, DDL reading masked columns), before an
        # approval is asked for a statement that could never run, and before the allow is
        # on record.
        target, enforced = await gateway.target_for(identity, facts, decision, statement.sql)
    except GatewayError:
        # A refusal that follows from a cached decision is answered only once its probe
        # confirmed it; nothing is on record yet, so a stale one simply starts over.
        if ev.confirm is not None and not await ev.confirm:
            raise _Stale from None
        raise
    if decision.require_approval is not None:
        if ev.approval is not None:
            raise Forbidden(
                "approval_not_accepted",
                "the policy still requires an approval for this request",
                decision_id=decision.id,
            )
        # On record before the approval exists: a spool that cannot take it creates nothing.
        await audit.decided("approval_required", gate=True)
        approval = await gateway.approvals.create(
            identity, settings.environment, statement.sql, list(statement.params),
            facts.fingerprint, decision.require_approval, decision.id,
        )
        await approval_event(gateway, audit, approval, "requested", identity.sub, gate=True)
        return Held(decision, approval)
    # One of the caller's slots from here to the end of the answer (pool fairness);
    # refused (429 too_many_concurrent) before the allow is on record.
    budget.slot = gateway.limits.slot((identity.issuer, identity.sub))
    allowance = None
    if decision.rows_per_hour is not None:
        # The agent's hourly row budget (docs/agents.md): what this statement may return
        # is reserved now, refused (429 row_budget_exhausted) before the allow is on record.
        allowance = gateway.limits.allowance(
            (identity.issuer, policy.agent_id(identity)), decision.rows_per_hour,
            row_limit(settings, decision, statement, meta.stream),
        )
    try:
        # In the chain before anything runs: a spool that cannot take it refuses it here, and
        # nothing runs. A write (or anything using an approval) waits until it is durable, too.
        # A read, which changes nothing, runs while it is written, and its answer waits for it:
        # a write that fails then fails the request, and no row is returned (docs/audit.md).
        read = overlap and _is_read(facts, statement, meta)
        # A read's decision is not synced on its own: it goes with the outcome's (one fsync
        # for both), or with whatever another request appends first.
        sealed = audit.decided("allow", gate=True, wake=not read)
        decision_durable: Awaitable[None] | None = sealed
        if not read:
            # Nothing runs before both: the probe confirming a cached allow and the fsync of
            # the decision, which go on at the same time. A stale allow is on record with
            # its outcome (decision_stale), and the request starts over.
            await _confirmed(ev, audit, sealed)
            await sealed
            decision_durable = None
        if ev.approval is not None:
            if meta.stream and facts.kind != "select":
                # The stream would refuse the write only after the claim, using the approval
                # up for nothing: refuse it first, as Executor.stream does.
                raise Unprocessable("stream_unsupported", "only queries can be streamed; drop the "
                                    "application/x-ndjson Accept header for writes")
            # After policy said yes with the approval in its input, and before anything runs:
            # the one conditional UPDATE that makes an approval single-use.
            await gateway.approvals.claim(ev.approval, list(statement.params))
            await approval_event(gateway, audit, ev.approval, "used", identity.sub, gate=True)
    except BaseException:
        if allowance is not None:
            allowance.settle(0)  # nothing ran: the reservation goes back
        raise
    rules = masking.Rules(enforced, gateway.mask_key, settings.mask_redact_token, target.masked)
    return _Ready(ev, target, enforced, rules, decision_durable, allowance)


async def _query(
    gateway: Gateway, audit: RequestAudit, identity: Identity, statement: Statement, meta: Meta,
    speculate: bool,
) -> Rows | Streamed | Held:
    ready = await _authorize(gateway, audit, identity, statement, meta, speculate, overlap=True)
    if isinstance(ready, Held):
        return ready
    settings = gateway.settings
    budget = meta.budget
    ev, target, enforced, rules = ready.ev, ready.target, ready.enforced, ready.rules
    facts, decision = ev.facts, ev.decision
    decision_durable = ready.decision_durable
    allowance = ready.allowance
    assert gateway.executor is not None
    started = time.perf_counter()
    # The policy's cap, the caller's own and, for JSON, QUERYGATE_MAX_ROWS; under a
    # rows_per_hour budget, what the agent may still receive.
    limit = row_limit(settings, decision, statement, meta.stream)
    if allowance is not None:
        limit = allowance.rows
    if meta.stream:
        try:
            batches = gateway.executor.stream(
                target, statement.params, facts, limit, rules,
                settings.stream_batch_rows, deadline=budget.at, stream_deadline=budget.stream_at,
            )
            head = await anext(batches)  # errors before the first row are plain errors
        except BaseException:
            if allowance is not None:
                allowance.settle(0)
            raise
        assert isinstance(head, StreamHead)
        rows = RowStream(head, batches, audit, started, settings.max_response_bytes,
                         meta.request_id, allowance)
        return Streamed(enforced, head, notices(facts, enforced), rows, budget.stream_at,
                        budget.hand_off())
    assert limit is not None
    masking_s = 0.0
    try:
        result = await gateway.executor.run(
            target, statement.params, facts, limit, rules,
            max_rows_affected=decision.max_rows_affected, deadline=budget.at,
            encode=encode_row, max_bytes=settings.max_response_bytes,
        )
        masking_s = result.masking_s
    except BaseException as exc:
        if allowance is not None:
            allowance.settle(0)  # no row reached the caller
        if decision_durable is not None and isinstance(exc, Exception):
            # A failure under a decision that is no longer in force is not answered either.
            await _confirmed(ev, audit, decision_durable)
            await decision_durable  # the decision before its failure, in the trail as on disk
        raise
    finally:
        _record_times(audit.clock, started, masking_s)
    if allowance is not None:
        allowance.settle(len(result.rows))
    if decision_durable is not None:
        await _confirmed(ev, audit, decision_durable)
        # A read answers only once its decision is durable; a spool that cannot make it so
        # fails the request, and no row is returned.
        await finished(gateway, audit, facts, rows_returned=len(result.rows),
                       rows_affected=result.rows_affected, truncated=result.truncated,
                       masked=result.masked, decision_durable=decision_durable)
        return Rows(enforced, result, notices(facts, enforced))
    await finished(gateway, audit, facts, rows_returned=len(result.rows),
                   rows_affected=result.rows_affected, truncated=result.truncated,
                   masked=result.masked)
    return Rows(enforced, result, notices(facts, enforced))


class RowStream:
    """A stream's rows, encoded one JSON array and newline per row, in chunks.

    It stops at ``max_bytes`` with ``response_too_large``; its end is audited here (ok,
    error, or aborted when the client went away) before the front end says how it ended.
    ``rows`` counts the rows handed out.
    """

    def __init__(
        self, head: StreamHead, batches: AsyncIterator[Any], audit: RequestAudit,
        started: float, max_bytes: int, request_id: str, allowance: Allowance | None = None,
    ) -> None:
        self.head = head
        self._allowance = allowance
        self.rows = 0
        self._batches = batches
        self._audit = audit
        self._started = started
        self._max_bytes = max_bytes
        self._request_id = request_id
        self._closed = False

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The encoded rows; a GatewayError ends them, audited before it is raised."""
        audit = self._audit
        size = 0
        try:
            async for batch in self._batches:
                lines = []
                for row in batch:
                    line = encode_row(row) + b"\n"
                    size += len(line)
                    if size > self._max_bytes:
                        break
                    lines.append(line)
                self.rows += len(lines)
                if lines:
                    yield b"".join(lines)
                if size > self._max_bytes:
                    raise PayloadTooLarge(
                        "response_too_large",
                        f"the answer is larger than {self._max_bytes} bytes "
                        f"(QUERYGATE_MAX_RESPONSE_BYTES); the rows after the first "
                        f"{self.rows} were not sent",
                    )
            _record_times(audit.clock, self._started, self.head.masking_s)
            try:
                await audit.executed(outcome="ok", rows_returned=self.rows, streamed=True,
                                     masked=self.head.masked)
            except GatewayError:
                log.error("the outcome of request %s could not be audited", self._request_id)
        except GatewayError as exc:
            if not audit.execution_recorded:
                with contextlib.suppress(GatewayError):
                    await audit.executed(outcome="error", code=exc.code, rows_returned=self.rows,
                                         streamed=True, masked=self.head.masked)
            raise
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """End the stream: its database connection goes back (the front end calls this
        however its answer ended, also before the rows began)."""
        if self._closed:
            return
        self._closed = True
        if self._allowance is not None:
            self._allowance.settle(self.rows)
        # A client that went away: the outcome is queued without waiting (it cannot await).
        self._audit.aborted(rows_returned=self.rows, streamed=True)
        await self._batches.aclose()  # type: ignore[attr-defined]


async def explain(
    gateway: Gateway, audit: RequestAudit, identity: Identity, statement: Statement, meta: Meta
) -> Explained:
    """The facts and the decision for a statement, on record; nothing is executed."""
    audit.explain = True
    ev = await evaluate(gateway, audit, identity, statement, meta)
    decision = ev.decision
    await audit.decided(
        "deny" if not decision.allow
        else "approval_required" if decision.require_approval is not None else "allow",
        gate=False,
    )
    return Explained(identity, ev.facts, decision)


async def caller_catalog(
    gateway: Gateway, audit: RequestAudit, identity: Identity, meta: Meta
) -> CallerCatalog:
    """The tables and columns this caller may read, each with the mask it would get now.

    Decided by policy, never here: a table is listed when the decision for reading all its
    columns (``SELECT <every column> FROM <table>``, through the same facts and decision
    input as a query) allows it without an approval; a column's mask is the one the
    masking profile (``data.querygate.masking_profile``) and that decision give it, which is
    what a query would get. Recorded as an ``admin`` event, ``catalog_list``.
    """
    catalog = gateway.catalog
    if catalog is None:
        raise Unavailable("database_unavailable", "the catalog has not been read yet")
    settings = gateway.settings
    profile = await gateway.profile_masks(identity, catalog, None)
    tables: dict[str, tuple[CatalogColumn, ...]] = {}
    for schema, relations in catalog.relations.items():
        for name, relation in relations.items():
            table = f"{schema}.{name}"
            if not relation.columns:
                continue
            sql = "SELECT {} FROM {}.{}".format(
                ", ".join(quote_ident(c) for c in relation.columns), quote_ident(schema),
                quote_ident(name),
            )
            try:
                facts = gateway.extractor.extract(sql, catalog)
            except GatewayError:
                continue  # a relation the gateway cannot govern is not readable
            try:
                with audit.clock.timer("policy"):
                    decision = await gateway.decisions.decide(policy.decision_input(
                        identity, facts, catalog, environment=settings.environment,
                        database=settings.database_name, request_id=meta.request_id,
                        source_ip=meta.source_ip, channel=meta.channel,
                    ), catalog.version)
            except Unavailable:
                gateway.metrics.opa_errors.inc()
                raise
            if not decision.allow or decision.require_approval is not None:
                continue
            masks = {**decision.masks, **profile}
            tables[table] = tuple(
                CatalogColumn(column, type_name, masks.get(f"{table}.{column}"))
                for column, type_name in relation.columns.items()
            )
    await audit.admin("catalog_list", "ok", {
        "version": catalog.version, "tables": len(tables),
        "masked_columns": sum(1 for cols in tables.values() for c in cols if c.mask),
    })
    return CallerCatalog(catalog.version, tables)


async def approval_status(
    gateway: Gateway, audit: RequestAudit, identity: Identity, approval_id: str
) -> Approval:
    """One approval as it stands, to its requester and to whoever may decide it (anyone
    else: ``approval_not_found``); recorded as an ``admin`` event, ``approval_status``."""
    if gateway.approvals is None:
        raise Unavailable("database_unavailable", "the database is not connected")
    approval = await gateway.approvals.get(approval_id)
    if not approval.requested_by(identity) and not set(identity.groups) & set(
        approval.approver_groups
    ):
        raise NotFound("approval_not_found", "no such approval")
    await audit.admin("approval_status", "ok", {"approval_id": approval.id,
                                                "status": approval.status})
    return approval
