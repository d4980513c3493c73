"""Decide: ask a real OPA server for ``data.querygate.decision`` and validate the answer.

The hot path uses one keep-alive httpx client (measured faster than opa-python-client's
aiohttp session, see bench/opa_client.py); opa-python-client serves the readiness probe,
where its health and policy-listing calls fit as they are. Anything but a well-formed
decision — OPA down, slow, erroring, undefined result, wrong types — is a 503
``policy_unavailable``: the gateway never guesses a decision.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
from opa_client import AsyncOpaClient

from app.errors import Unavailable

log = logging.getLogger("querygate.policy")

MASK_STRATEGIES = frozenset({"redact", "null", "partial", "email", "hash", "pan"})


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

    def reasons_json(self) -> list[dict[str, str]]:
        return [r.to_json() for r in self.reasons]


def _unavailable(message: str) -> Unavailable:
    return Unavailable("policy_unavailable", message)


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
    if not isinstance(masks, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in masks.items()
    ):
        raise _unavailable("malformed decision: masks must map column names to strategies")
    unknown = sorted({v for v in masks.values() if v not in MASK_STRATEGIES})
    if unknown:
        raise _unavailable(f"malformed decision: unknown mask strategies {unknown}")
    if approval is not None and not isinstance(approval, dict):
        raise _unavailable("malformed decision: require_approval must be null or an object")
    if max_rows is not None and (
        not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 0
    ):
        raise _unavailable("malformed decision: max_rows must be null or a non-negative integer")
    return Decision(
        id=decision_id,
        allow=allow,
        reasons=tuple(Reason(r["rule"], r["message"]) for r in reasons),
        masks=dict(masks),
        require_approval=approval,
        max_rows=max_rows,
    )


class PolicyClient:
    """Asks OPA for decisions over one keep-alive connection pool."""

    def __init__(self, opa_url: str, decision_path: str, timeout_ms: int) -> None:
        self._url = f"{opa_url}/v1/data/{decision_path.strip('/')}"
        self._package = decision_path.strip("/").split("/")[0]
        self._timeout = timeout_ms / 1000
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self._timeout),
            limits=httpx.Limits(max_keepalive_connections=32, max_connections=64),
            headers={"content-type": "application/json"},
        )
        parts = urlsplit(opa_url)
        self._admin = AsyncOpaClient(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or (443 if parts.scheme == "https" else 80),
            ssl=parts.scheme == "https",
            retries=0,
            timeout=self._timeout,
        )
        self._admin_open = False

    async def close(self) -> None:
        await self._client.aclose()
        if self._admin_open:
            await self._admin.close_connection()

    async def decide(self, input_: dict[str, Any]) -> Decision:
        """Evaluate the decision for ``input_``; fail closed on every kind of trouble."""
        body = orjson.dumps({"input": input_})
        try:
            response = await self._client.post(self._url, content=body)
        except httpx.TimeoutException as exc:
            log.warning("OPA timed out after %.0f ms", self._timeout * 1000)
            raise _unavailable("the policy engine did not answer in time") from exc
        except httpx.HTTPError as exc:
            log.warning("OPA unreachable: %s", exc)
            raise _unavailable("the policy engine is unreachable") from exc
        if response.status_code != 200:
            log.warning("OPA answered %s: %s", response.status_code, response.text[:500])
            raise _unavailable(f"the policy engine answered {response.status_code}")
        try:
            payload = orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise _unavailable("the policy engine answered with invalid JSON") from exc
        if not isinstance(payload, dict):
            raise _unavailable("the policy engine answered with a non-object")
        decision_id = payload.get("decision_id")
        if not isinstance(decision_id, str) or not decision_id:
            decision_id = str(uuid.uuid4())
        return parse_decision(payload.get("result"), decision_id)

    async def ready(self) -> tuple[bool, str]:
        """OPA healthy and the decision package loaded."""
        if not self._admin_open:
            await self._admin._init_session()
            self._admin_open = True
        try:
            if not await self._admin.check_health():
                return False, "OPA is not healthy"
            policies = await self._admin.get_policies_list()
        except Exception as exc:
            return False, f"OPA is unreachable: {type(exc).__name__}"
        if not policies:
            return False, "OPA has no policies loaded"
        return True, "ok"
