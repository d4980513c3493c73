"""The rows-per-hour budget in the pipeline, with the fakes of test_pipeline: a JSON answer
and a stream are charged the rows they returned, on the agent's key, and an exhausted
budget refuses the next statement before its allow is on record."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest

from app.errors import TooManyRequests
from app.identity import Identity
from app.policy import Decision
from tests.unit.test_pipeline import Journal, _audits, _gateway, _run

AGENT = Identity("alice", ("analysts",), "https://idp.test", attributes={"client_id": "claude"})


def _budgeted(journal: Journal, rows_per_hour: int) -> Any:
    gateway = _gateway(journal)
    decide = gateway.policy.decide

    async def with_budget(input_: dict[str, Any]) -> Decision:
        return dataclasses.replace(await decide(input_), rows_per_hour=rows_per_hour)

    gateway.policy.decide = with_budget  # type: ignore[method-assign]
    return gateway


async def test_json_and_stream_answers_are_charged_what_they_returned():
    journal = Journal()
    gateway = _budgeted(journal, 3)
    key = ("https://idp.test", "claude")
    outcome, _ = await _run(journal, AGENT, "SELECT id, email FROM customers", gateway=gateway)
    assert len(outcome.result.rows) == 1
    assert gateway.limits.rows.used(key, _now(gateway)) == 1
    streamed, _ = await _run(journal, AGENT, "SELECT id, email FROM customers",
                             gateway=gateway, stream=True)
    # Until the stream ends, what it may still send stays reserved.
    assert gateway.limits.rows.used(key, _now(gateway)) == 3
    chunks = [c async for c in streamed.rows.chunks()]
    assert len(b"".join(chunks).splitlines()) == 2
    assert gateway.limits.rows.used(key, _now(gateway)) == 3
    journal.clear()
    with pytest.raises(TooManyRequests) as refused:
        await _run(journal, AGENT, "SELECT id FROM customers", gateway=gateway)
    assert refused.value.code == "row_budget_exhausted"
    # Refused before the allow: on record as a refusal, and nothing ran.
    assert _audits(journal) == [("decision", "deny", False)]
    assert not [e for e in journal if e[0] == "execute"]


async def test_another_agent_of_the_same_person_has_its_own_budget():
    journal = Journal()
    gateway = _budgeted(journal, 1)
    await _run(journal, AGENT, "SELECT id FROM customers", gateway=gateway)
    other = dataclasses.replace(AGENT, attributes={"client_id": "cursor"})
    outcome, _ = await _run(journal, other, "SELECT id FROM customers", gateway=gateway)
    assert len(outcome.result.rows) == 1


def _now(gateway: Any) -> float:
    return time.monotonic()  # CallerLimits' clock
