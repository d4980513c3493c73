"""Decide: ask a real OPA server for ``data.querygate.decision`` and validate the answer.

Decisions go over ``DecisionTransport``: keep-alive HTTP/1.1 connections on asyncio with
httptools' parser (the one uvicorn uses), the request built once as bytes and the answer
decoded with orjson. make bench measured the alternatives on the 2-core machine: per
decision it costs ~80 µs of the gateway's CPU against ~350 µs for opa-python-client's
aiohttp session and more for httpx, and the gateway's CPU is what bounds its throughput
(docs/benchmarks.md). The health and data reads, rare and off the request path, use httpx
(opa-python-client did, until it was dropped: aiohttp, requests and aiofiles for two GETs).

No retries, except once when a reused keep-alive connection turns out closed before any
byte of the answer arrived (OPA's idle timeout): evaluation has no side effects. Anything
but a well-formed decision — OPA down, slow, erroring, undefined result, wrong types — is a
503 ``policy_unavailable``: the gateway never guesses a decision.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import re
import ssl
import time
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httptools
import httpx
import orjson

from app import tracing
from app.errors import Unavailable
from app.ids import new_id

if TYPE_CHECKING:
    from app.approvals import Approval
    from app.catalog import Catalog
    from app.facts import QueryFacts
    from app.identity import Identity

log = logging.getLogger("querygate.policy")

MASK_STRATEGIES = frozenset({"redact", "null", "partial", "email", "hash", "pan"})
# partial keeps the first/last N characters: "partial" (0, 4) or "partial:F:L".
_PARTIAL = re.compile(r"^partial:\d{1,2}:\d{1,2}$")
DERIVED_MASKS = frozenset({"redact", "null", "deny"})
MAX_CACHE_TTL_S = 86_400
_ROLE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True, slots=True)
class Reason:
    """Why a rule fired: a stable rule name and a human message."""

    rule: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"rule": self.rule, "message": self.message}


@dataclass(frozen=True, slots=True)
class Decision:
    """A validated OPA decision."""

    id: str
    allow: bool
    reasons: tuple[Reason, ...]
    masks: dict[str, str]
    require_approval: dict[str, Any] | None
    max_rows: int | None
    # What an output computed from a masked column gets: a full mask, or a denial.
    derived_mask: str = "redact"
    # Masked columns the policy lets the query filter, join, group or sort on.
    masked_predicates_allowed: tuple[str, ...] = ()
    # A write affecting more rows than this is rolled back.
    max_rows_affected: int | None = None
    # The database role the statement runs under (SET LOCAL ROLE).
    db_role: str | None = None
    # Rows the agent may receive per rolling hour, enforced by the gateway (docs/agents.md).
    rows_per_hour: int | None = None
    # The revision of the policy bundle that decided (OPA provenance), for the audit trail.
    bundle_revision: str | None = None
    # How long policy lets the gateway reuse this decision for the same input (0: never).
    cache_ttl_s: int = 0
    # Served from the gateway's cache: ``id`` is then the id of the decision OPA made.
    cached: bool = False

    def reasons_json(self) -> list[dict[str, str]]:
        return [r.to_json() for r in self.reasons]

    def to_json(self) -> dict[str, Any]:
        """The decision as an explain answers it (HTTP /v1/explain, the MCP explain tool)."""
        return {
            "id": self.id,
            "allow": self.allow,
            "reasons": self.reasons_json(),
            "masks": self.masks,
            "derived_mask": self.derived_mask,
            "masked_predicates_allowed": list(self.masked_predicates_allowed),
            "require_approval": self.require_approval,
            "max_rows": self.max_rows,
            "max_rows_affected": self.max_rows_affected,
            "rows_per_hour": self.rows_per_hour,
            "db_role": self.db_role,
        }


def agent_id(identity: Identity) -> str:
    """Who the agent is: the OAuth client id its token names (``client_id``, else ``azp``),
    else the token's subject."""
    return identity.attributes.get("client_id") or identity.sub


def agent_input(identity: Identity) -> dict[str, Any]:
    """The ``request.agent`` object of an MCP request (docs/decision-contract.md)."""
    person = identity.on_behalf_of
    return {
        "id": agent_id(identity),
        "client_id": identity.attributes.get("client_id"),
        "sub": identity.sub,
        "on_behalf_of": person.sub if person is not None else None,
    }


def decision_input(
    identity: Identity,
    facts: QueryFacts,
    catalog: Catalog,
    *,
    environment: str,
    database: str,
    request_id: str,
    source_ip: str | None,
    approval: Approval | None = None,
    now: dt.datetime | None = None,
    channel: str = "http",
) -> dict[str, Any]:
    """The OPA input document (docs/decision-contract.md), from plain values only."""
    moment = now or dt.datetime.now(dt.UTC)
    return {
        "identity": identity.to_input(),
        "environment": environment,
        "request": {
            "id": request_id,
            "source_ip": source_ip,
            "channel": channel,
            # Only MCP callers are agents by their channel; elsewhere null.
            "agent": agent_input(identity) if channel == "mcp" else None,
            "time": moment.isoformat(timespec="milliseconds"),
        },
        "database": {"name": database},
        "query": facts.to_input(),
        # Classes the catalog gave columns by their names; policy data may override them.
        "classification": {
            col: catalog.classes[col]
            for col in (*facts.columns_read, *facts.columns_write)
            if col in catalog.classes
        },
        "approval": approval.to_policy_input() if approval else None,
    }


def profile_input(
    identity: Identity, catalog: Catalog, *, environment: str, database: str
) -> dict[str, Any]:
    """The input of ``data.querygate.masking_profile``: who asks, and every column."""
    return {
        "identity": identity.to_input(),
        "environment": environment,
        "database": {"name": database},
        "columns": catalog.columns(),
        "classification": catalog.classes,
    }


def _unavailable(message: str) -> Unavailable:
    return Unavailable("policy_unavailable", message)


def _check_masks(masks: object, what: str) -> dict[str, str]:
    """``masks``, which must map column names to known strategies, or the answer is
    malformed."""
    if not isinstance(masks, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in masks.items()
    ):
        raise _unavailable(f"malformed {what}: masks must map column names to strategies")
    unknown = sorted(
        {v for v in masks.values() if v not in MASK_STRATEGIES and not _PARTIAL.match(v)}
    )
    if unknown:
        raise _unavailable(f"malformed {what}: unknown mask strategies {unknown}")
    return dict(masks)


def parse_decision(result: object, decision_id: str) -> Decision:
    """Validate OPA's result strictly; anything unexpected is a malformed decision."""
    if not isinstance(result, dict):
        raise _unavailable("the policy returned no decision (undefined or not an object)")
    allow = result.get("allow")
    reasons = result.get("reasons")
    masks = result.get("masks")
    approval = result.get("require_approval")
    max_rows = result.get("max_rows")
    if not isinstance(allow, bool):
        raise _unavailable("malformed decision: allow must be a boolean")
    if not isinstance(reasons, list) or not all(
        isinstance(r, dict)
        and isinstance(r.get("rule"), str)
        and isinstance(r.get("message"), str)
        for r in reasons
    ):
        raise _unavailable("malformed decision: reasons must be a list of {rule, message}")
    masks = _check_masks(masks, "decision")
    derived = result.get("derived_mask", "redact")
    if derived not in DERIVED_MASKS:
        raise _unavailable("malformed decision: derived_mask must be redact, null or deny")
    allowed_predicates = result.get("masked_predicates_allowed", [])
    if not isinstance(allowed_predicates, list) or not all(
        isinstance(c, str) for c in allowed_predicates
    ):
        raise _unavailable("malformed decision: masked_predicates_allowed must be a string list")
    if approval is not None and not isinstance(approval, dict):
        raise _unavailable("malformed decision: require_approval must be null or an object")
    if max_rows is not None and (
        not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 0
    ):
        raise _unavailable("malformed decision: max_rows must be null or a non-negative integer")
    rows_affected = result.get("max_rows_affected")
    if rows_affected is not None and (
        not isinstance(rows_affected, int) or isinstance(rows_affected, bool) or rows_affected < 0
    ):
        raise _unavailable("malformed decision: max_rows_affected must be null or an integer >= 0")
    db_role = result.get("db_role")
    if db_role is not None and (not isinstance(db_role, str) or not _ROLE.match(db_role)):
        raise _unavailable("malformed decision: db_role must be null or a plain role name")
    rows_per_hour = result.get("rows_per_hour")
    if rows_per_hour is not None and (
        not isinstance(rows_per_hour, int) or isinstance(rows_per_hour, bool) or rows_per_hour < 0
    ):
        raise _unavailable("malformed decision: rows_per_hour must be null or an integer >= 0")
    if approval is not None:
        _check_approval_request(approval)
    ttl = result.get("cache_ttl_s", 0)
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 0 <= ttl <= MAX_CACHE_TTL_S:
        raise _unavailable(f"malformed decision: cache_ttl_s must be 0..{MAX_CACHE_TTL_S} seconds")
    return Decision(
        id=decision_id,
        allow=allow,
        reasons=tuple(Reason(r["rule"], r["message"]) for r in reasons),
        masks=dict(masks),
        require_approval=approval,
        max_rows=max_rows,
        derived_mask=derived,
        masked_predicates_allowed=tuple(allowed_predicates),
        max_rows_affected=rows_affected,
        db_role=db_role,
        rows_per_hour=rows_per_hour,
        cache_ttl_s=ttl,
    )


def _revisions(revisions: dict[str, object]) -> str | None:
    # None unless every bundle has a revision: a bundle without one could change unseen,
    # and None turns the decision cache off.
    if not revisions or not all(isinstance(r, str) and r for r in revisions.values()):
        return None
    if len(revisions) == 1:
        return str(next(iter(revisions.values())))
    return ",".join(f"{n}={r}" for n, r in sorted(revisions.items()))


def bundle_revision(provenance: object) -> str | None:
    """The bundle revision(s) in OPA's provenance; None when OPA runs plain files."""
    if not isinstance(provenance, dict):
        return None
    bundles = provenance.get("bundles")
    if isinstance(bundles, dict) and bundles:
        return _revisions({
            name: b.get("revision") if isinstance(b, dict) else None
            for name, b in bundles.items()
        })
    revision = provenance.get("revision")
    return revision if isinstance(revision, str) and revision else None


def active_revision(bundles: object) -> str | None:
    """The revision(s) of ``data.system.bundles`` (the bundles OPA has activated), in the
    form ``bundle_revision`` gives for a decision's provenance; None without bundles."""
    if not isinstance(bundles, dict) or not bundles:
        return None
    revisions: dict[str, object] = {}
    for name, bundle in bundles.items():
        manifest = bundle.get("manifest") if isinstance(bundle, dict) else None
        revisions[name] = manifest.get("revision") if isinstance(manifest, dict) else None
    return _revisions(revisions)


def _check_approval_request(approval: dict[str, Any]) -> None:
    groups = approval.get("approver_groups")
    ttl = approval.get("ttl_s")
    if not isinstance(groups, list) or not groups or not all(isinstance(g, str) for g in groups):
        raise _unavailable("malformed decision: require_approval.approver_groups must list groups")
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 0 < ttl <= 7 * 86400:
        raise _unavailable("malformed decision: require_approval.ttl_s must be 1..604800 seconds")
    if not isinstance(approval.get("message", ""), str):
        raise _unavailable("malformed decision: require_approval.message must be a string")


class _Answer(asyncio.Protocol):
    """One keep-alive connection to OPA; httptools parses the answers as they arrive."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._chunks: list[bytes] = []
        self._size = 0
        self.received = False  # any byte of the current answer
        self.reusable = True

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ValueError(f"malformed HTTP answer: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self._transport = None
        self._fail(exc or ConnectionResetError("OPA closed the connection"))

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._max_bytes:
            self._fail(ValueError(f"the answer is larger than {self._max_bytes} bytes"))
        else:
            self._chunks.append(body)

    def on_message_complete(self) -> None:
        self.reusable = self.reusable and self._parser.should_keep_alive()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result((self._parser.get_status_code(), b"".join(self._chunks)))

    def _fail(self, exc: Exception) -> None:
        self.reusable = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self.close()

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        self._chunks, self._size, self.received = [], 0, False
        if self._transport is None:
            raise ConnectionResetError("OPA closed the connection")
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(request)
        return await self._waiter

    def close(self) -> None:
        self.reusable = False
        if self._transport is not None:
            self._transport.close()


class DecisionTransport:
    """POSTs to OPA over a small pool of keep-alive connections."""

    def __init__(self, opa_url: str, max_idle: int = 32, max_bytes: int = 4 << 20) -> None:
        parts = urlsplit(opa_url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._prefix = parts.path.rstrip("/")
        self._host_header = parts.netloc.encode()
        self._idle: list[_Answer] = []
        self._max_idle = max_idle
        self._max_bytes = max_bytes

    async def _connect(self) -> _Answer:
        _, answer = await asyncio.get_running_loop().create_connection(
            lambda: _Answer(self._max_bytes), self._host, self._port, ssl=self._ssl
        )
        return answer

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """(status, body) of one POST; OSError when OPA cannot be reached."""
        request = b"".join((
            b"POST ", self._prefix.encode(), path.encode(), b" HTTP/1.1\r\nHost: ",
            self._host_header, b"\r\nContent-Type: application/json\r\nContent-Length: ",
            str(len(body)).encode(), b"\r\n", tracing.traceparent_header(), b"\r\n", body,
        ))
        while self._idle:
            answer = self._idle.pop()
            try:
                return self._settle(answer, await answer.exchange(request))
            except OSError:
                answer.close()
                if answer.received:
                    raise
                # A keep-alive connection OPA had closed while idle: try the next one.
            except BaseException:
                # Timed out, cancelled or garbled: the connection's state is unknown.
                answer.close()
                raise
        answer = await self._connect()
        try:
            return self._settle(answer, await answer.exchange(request))
        except BaseException:
            answer.close()
            raise

    def _settle(self, answer: _Answer, result: tuple[int, bytes]) -> tuple[int, bytes]:
        if answer.reusable and len(self._idle) < self._max_idle:
            self._idle.append(answer)
        else:
            answer.close()
        return result

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


class PolicyClient:
    """Asks OPA for decisions over one keep-alive connection pool."""

    def __init__(self, opa_url: str, decision_path: str, timeout_ms: int) -> None:
        path = decision_path.strip("/")
        self._package, _, self._rule = path.rpartition("/")
        self._timeout = timeout_ms / 1000
        # Decisions go over DecisionTransport; the two reads that are no decision (a data
        # document, /health) over httpx, opened on first use.
        self._base = opa_url.rstrip("/")
        self._client: httpx.AsyncClient | None = None
        self._transport = DecisionTransport(opa_url)
        # The revision probe (``revision``): the one in flight, and the one the callers who
        # arrived since it was sent are waiting for.
        self._probing: asyncio.Task[None] | None = None
        self._next_probe: asyncio.Future[str | None] | None = None
        self._paths = {
            rule: f"/v1/data/{self._package}/{rule}"
            for rule in (self._rule, "approver_decision", "masking_profile")
        }

    def _session(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self._base, timeout=self._timeout)
        return self._client

    async def close(self) -> None:
        if self._probing is not None:
            self._probing.cancel()
        if self._next_probe is not None and not self._next_probe.done():
            # A probe cancelled before it started would leave its waiters waiting.
            self._next_probe.set_exception(_unavailable("the policy client is closed"))
        self._transport.close()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def decide(self, input_: dict[str, Any]) -> Decision:
        """Evaluate the decision for ``input_``; fail closed on every kind of trouble."""
        payload = await self._query(self._rule, input_, provenance=True)
        decision_id = payload.get("decision_id")
        if not isinstance(decision_id, str) or not decision_id:
            decision_id = new_id()
        decision = parse_decision(payload.get("result"), decision_id)
        revision = bundle_revision(payload.get("provenance"))
        return dataclasses.replace(decision, bundle_revision=revision) if revision else decision

    async def masking_profile(self, input_: dict[str, Any]) -> tuple[dict[str, str], str | None]:
        """The masks of the caller's profile (``masking_profile``) and the bundle revision."""
        payload = await self._query("masking_profile", input_, provenance=True)
        result = payload.get("result")
        masks = result.get("masks") if isinstance(result, dict) else None
        return _check_masks(masks, "masking profile"), bundle_revision(payload.get("provenance"))

    async def approver_decide(self, input_: dict[str, Any]) -> tuple[bool, list[Reason]]:
        """May this identity approve or reject this approval? (``approver_decision``)."""
        payload = await self._query("approver_decision", input_)
        result = payload.get("result")
        if not isinstance(result, dict) or not isinstance(result.get("allow"), bool):
            raise _unavailable("the policy returned no approver decision")
        reasons = result.get("reasons") or []
        if not isinstance(reasons, list) or not all(
            isinstance(r, dict) and isinstance(r.get("rule"), str)
            and isinstance(r.get("message"), str) for r in reasons
        ):
            raise _unavailable("malformed approver decision: reasons")
        return result["allow"], [Reason(r["rule"], r["message"]) for r in reasons]

    async def revision(self) -> str | None:
        """The bundle revision OPA has active, as read by a probe sent after this call began
        (None: OPA serves no bundle); 503 ``policy_unavailable`` when OPA cannot answer.

        Callers share probes: all who arrive while one is in flight wait for the next, which
        is sent when it returns. So a bundle OPA activated before a caller arrived is always
        seen, at the cost of one small read of ``data.system.bundles`` per round of callers.
        """
        return await asyncio.shield(self.next_revision())

    def next_revision(self) -> asyncio.Future[str | None]:
        """``revision`` as the shared probe's own future, for a caller that chains a
        callback to it rather than awaiting it (the decision cache, once per hit). It is
        shared: never cancel it."""
        future = self._next_probe
        if future is None:
            future = self._next_probe = asyncio.get_running_loop().create_future()
            future.add_done_callback(_retrieve)
            if self._probing is None:
                self._launch_probe()
        return future

    def _launch_probe(self) -> None:
        self._probing = asyncio.get_running_loop().create_task(self._probe())

    async def _probe(self) -> None:
        # Taken as the probe is sent: whoever arrived before now shares its answer.
        future, self._next_probe = self._next_probe, None
        assert future is not None
        try:
            payload = await self._post("/v1/data/system/bundles", b"{}")
            future.set_result(active_revision(payload.get("result")))
        except Exception as exc:
            future.set_exception(exc)
        except BaseException:
            future.set_exception(_unavailable("the policy engine's revision was not read"))
            raise
        finally:
            self._probing = None
            if self._next_probe is not None:
                self._launch_probe()

    async def _query(
        self, rule: str, input_: dict[str, Any], provenance: bool = False
    ) -> dict[str, Any]:
        path = self._paths[rule] + ("?provenance=true" if provenance else "")
        return await self._post(path, orjson.dumps({"input": input_}, default=str))

    async def _post(self, path: str, request: bytes) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self._timeout):
                status, body = await self._transport.post(path, request)
        except TimeoutError as exc:
            log.warning("OPA timed out after %.0f ms", self._timeout * 1000)
            raise _unavailable("the policy engine did not answer in time") from exc
        except OSError as exc:
            log.warning("OPA unreachable: %s", type(exc).__name__)
            raise _unavailable("the policy engine is unreachable") from exc
        except ValueError as exc:  # a garbled or oversize HTTP answer
            log.warning("OPA answered unreadably: %s", exc)
            raise _unavailable("the policy engine answered unreadably") from exc
        if status != 200:
            log.warning("OPA answered %s", status)
            raise _unavailable(f"the policy engine answered {status}")
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise _unavailable("the policy engine answered with invalid JSON") from exc
        if not isinstance(payload, dict):
            raise _unavailable("the policy engine answered with a non-object")
        return payload

    async def data(self, path: str) -> Any:
        """A document of the policy's data (e.g. querygate/config/classification), or None."""
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._session().get(f"/v1/data/{path.strip('/')}")
            response.raise_for_status()
            body = response.json()
        except Exception as exc:
            log.info("OPA data %s unavailable: %s", path, type(exc).__name__)
            return None
        return body.get("result") if isinstance(body, dict) else None

    async def ready(self) -> tuple[bool, str]:
        """OPA healthy and answering the decision with a well-formed object."""
        try:
            async with asyncio.timeout(self._timeout):
                health = await self._session().get("/health")
            if health.status_code != 200:
                return False, "OPA is not healthy"
        except Exception as exc:
            return False, f"OPA is unreachable: {type(exc).__name__}"
        try:
            await self.decide({})
        except Unavailable as exc:
            return False, exc.message
        return True, "ok"


def _retrieve(future: asyncio.Future[Any]) -> None:
    # A probe whose every waiter was cancelled: its error is nobody's to report.
    if not future.cancelled():
        future.exception()


@dataclass(slots=True)
class _Entry:
    decision: Decision  # marked cached
    revision: str
    expires: float


class DecisionCache:
    """Decisions policy marked cacheable (``cache_ttl_s``), reused for the same question.

    The key is everything the decision depends on: the whole OPA input but the request's
    id and time, and the catalog version. An entry is served only while its TTL (capped at
    ``max_ttl_s``) runs and only if the bundle revision OPA has active now, read by a probe
    sent after the request arrived (``PolicyClient.revision``), is the one that decided it:
    a new bundle is in force for the very next request, and a new revision empties the
    cache. Without a bundle revision (OPA serving plain files) nothing is cached: nothing
    would tell the gateway that the policy changed. A probe OPA cannot answer fails the
    request closed, as a decision would. Docs: docs/decision-contract.md, "Caching".
    """

    def __init__(
        self, client: PolicyClient, entries: int, max_ttl_s: float,
        count: typing.Callable[[str], None] = lambda result: None,
    ) -> None:
        self._client = client
        self._max = entries
        self._max_ttl_s = max_ttl_s
        self._count = count
        self._entries: dict[bytes, _Entry] = {}
        self._revision: str | None = None

    def __len__(self) -> int:
        return len(self._entries)

    async def decide(
        self, input_: dict[str, Any], catalog_version: int, cacheable: bool = True
    ) -> Decision:
        """The decision for ``input_``: a fresh one from OPA, or a cached one (``cached``)
        once the probe confirmed it."""
        decision, confirm = await self.speculate(input_, catalog_version, cacheable)
        if confirm is None or await confirm:
            return decision
        # A new bundle is active: OPA's own answer, not another cache lookup (a miss of
        # the old revision may have stored an entry meanwhile).
        return await self._client.decide(input_)

    async def speculate(
        self, input_: dict[str, Any], catalog_version: int, cacheable: bool = True
    ) -> tuple[Decision, asyncio.Future[bool] | None]:
        """A decision now and, when it is a cached one, the probe that confirms it.

        The probe (a task, already sent) resolves True while the revision that made the
        decision is still the active one, False when a new bundle is active (the entry, or
        with a new revision the whole cache, is gone: ask again), and raises 503
        ``policy_unavailable`` when OPA cannot answer. Nothing that depends on a cached
        decision may take effect before its probe said True: ``decide`` waits for it, and
        a read that runs meanwhile is answered only after it (app/pipeline.py).
        """
        if not self._max or not cacheable:
            return await self._client.decide(input_), None
        request = input_.get("request") or {}
        key = orjson.dumps(
            [catalog_version, {**input_, "request": {
                k: v for k, v in request.items() if k not in ("id", "time")
            }}],
            default=str,
        )
        entry = self._entries.get(key)
        if entry is not None:
            if time.monotonic() < entry.expires:
                return entry.decision, self._confirm(key, entry)
            self._entries.pop(key, None)
        decision = await self._client.decide(input_)
        revision = decision.bundle_revision
        if decision.cache_ttl_s <= 0 or revision is None:
            self._count("uncacheable")
            return decision, None
        self._count("miss")
        if len(self._entries) >= self._max:
            self._entries.pop(next(iter(self._entries)))
        # An entry of a revision older than the last probed one is never served: a hit
        # needs the probe to read the revision it was decided under.
        self._entries[key] = _Entry(
            dataclasses.replace(decision, cached=True), revision,
            time.monotonic() + min(decision.cache_ttl_s, self._max_ttl_s),
        )
        return decision, None

    def _confirm(self, key: bytes, entry: _Entry) -> asyncio.Future[bool]:
        """The answer of the next probe for ``entry``, chained to the shared probe by a
        callback: a hit costs one future, not a task and a shield of its own."""
        probe = self._client.next_revision()
        confirm: asyncio.Future[bool] = probe.get_loop().create_future()
        confirm.add_done_callback(_retrieve)

        def settle(done: asyncio.Future[str | None]) -> None:
            if confirm.done():  # its waiter was cancelled
                return
            if done.cancelled():
                confirm.set_exception(_unavailable("the policy engine's revision was not read"))
            elif (exc := done.exception()) is not None:
                confirm.set_exception(exc)
            else:
                confirm.set_result(self._confirmed(key, entry, done.result()))

        probe.add_done_callback(settle)
        return confirm

    def _confirmed(self, key: bytes, entry: _Entry, revision: str | None) -> bool:
        if revision != self._revision:
            self._entries.clear()
            self._revision = revision
            self._count("revision")
        if entry.revision == revision:
            self._entries.setdefault(key, entry)  # first probe after start: still valid
            self._count("hit")
            return True
        self._entries.pop(key, None)
        return False
