"""Agent guardrails without a server (issue 18): the row budget per agent on a fake clock,
the agent in the decision input, rows_per_hour in a decision, a token's client id."""

from __future__ import annotations

import pytest

from app.catalog import build_catalog
from app.errors import TooManyRequests, Unauthenticated, Unavailable
from app.facts import FactsExtractor
from app.identity import Identity, identity_from_claims
from app.limits import HOUR_S, CallerLimits, RowBudget
from app.policy import agent_id, decision_input, parse_decision

AGENT = ("https://idp.test", "claude-desktop")
OTHER = ("https://idp.test", "cursor")
GOOD = {"allow": True, "reasons": [], "masks": {}, "require_approval": None, "max_rows": 10}


def test_a_budget_reserves_what_a_statement_may_return_and_settles_what_it_did():
    budget = RowBudget()
    first = budget.reserve(AGENT, 10, 4, 0.0)
    assert first.rows == 4 and budget.used(AGENT, 0.0) == 4
    first.settle(1)  # returned one row: three go back
    assert budget.used(AGENT, 0.0) == 1
    second = budget.reserve(AGENT, 10, None, 1.0)  # no cap of its own: all that is left
    assert second.rows == 9
    second.settle(50)  # never more than was reserved
    assert budget.used(AGENT, 1.0) == 10
    with pytest.raises(TooManyRequests) as refused:
        budget.reserve(AGENT, 10, 1, 2.0)
    assert refused.value.code == "row_budget_exhausted"
    assert refused.value.extra["retry_after_s"] == HOUR_S - 2  # the first rows leave then
    assert budget.reserve(OTHER, 10, 5, 2.0).rows == 5  # each agent its own


def test_rows_leave_the_budget_an_hour_after_they_were_returned():
    budget = RowBudget()
    budget.reserve(AGENT, 5, 5, 0.0).settle(5)
    budget.reserve(AGENT, 10, 5, 600.0).settle(5)
    with pytest.raises(TooManyRequests) as refused:
        budget.reserve(AGENT, 10, 1, 1800.0)
    assert refused.value.extra["retry_after_s"] == 1800
    assert budget.reserve(AGENT, 10, 10, HOUR_S + 1).rows == 5
    assert budget.used(AGENT, 2 * HOUR_S + 601) == 0


def test_a_statement_that_returned_nothing_gives_it_all_back():
    budget = RowBudget()
    budget.reserve(AGENT, 3, 3, 0.0).settle(0)
    assert budget.reserve(AGENT, 3, 3, 0.0).rows == 3


def test_the_caller_limits_count_rows_on_their_clock():
    now = [0.0]
    limits = CallerLimits(0, 1, 0, clock=lambda: now[0])
    limits.allowance(AGENT, 2, None).settle(2)
    with pytest.raises(TooManyRequests):
        limits.allowance(AGENT, 2, None)
    now[0] = HOUR_S + 1
    assert limits.allowance(AGENT, 2, None).rows == 2


@pytest.mark.parametrize("value", [-1, 1.5, True, "100"])
def test_a_malformed_rows_per_hour_fails_closed(value):
    with pytest.raises(Unavailable):
        parse_decision({**GOOD, "rows_per_hour": value}, "d")


def test_rows_per_hour_is_read_and_defaults_to_none():
    assert parse_decision(GOOD, "d").rows_per_hour is None
    assert parse_decision({**GOOD, "rows_per_hour": 500}, "d").rows_per_hour == 500
    assert parse_decision({**GOOD, "rows_per_hour": 500}, "d").to_json()["rows_per_hour"] == 500


def _input(identity: Identity, channel: str) -> dict:
    catalog = build_catalog(("public",), [("public", "t", "r", "id", "int4")], frozenset(), 1)
    facts = FactsExtractor(65536).extract("SELECT id FROM t", catalog)
    return decision_input(identity, facts, catalog, environment="dev", database="appdb",
                          request_id="r", source_ip=None, channel=channel)


def test_an_mcp_request_names_its_agent_and_others_do_not():
    person = Identity("alice", ("analysts",), "https://idp.test")
    agent = Identity("svc-agent", (), "https://idp.test", attributes={"client_id": "claude"},
                     on_behalf_of=person)
    assert _input(agent, "mcp")["request"]["agent"] == {
        "id": "claude", "client_id": "claude", "sub": "svc-agent", "on_behalf_of": "alice"}
    assert _input(person, "mcp")["request"]["agent"] == {
        "id": "alice", "client_id": None, "sub": "alice", "on_behalf_of": None}
    for channel in ("http", "pgwire"):
        assert _input(agent, channel)["request"]["agent"] is None
    assert agent_id(agent) == "claude" and agent_id(person) == "alice"


def _claims(**extra) -> dict:
    return {"sub": "alice", "iss": "https://idp.test", "groups": ["analysts"], **extra}


def test_a_tokens_client_id_or_azp_is_the_client_id_attribute():
    assert identity_from_claims(_claims()).attributes == {}
    assert identity_from_claims(_claims(azp="cursor")).attributes == {"client_id": "cursor"}
    assert identity_from_claims(_claims(client_id="claude", azp="x")).attributes == {
        "client_id": "claude"}
    for bad in (7, "", "x" * 300, ["a"]):
        with pytest.raises(Unauthenticated):
            identity_from_claims(_claims(client_id=bad))


def test_a_token_exchange_token_is_its_actor_acting_for_its_subject():
    identity = identity_from_claims(_claims(act={"sub": "agent-7", "act": {"sub": "older"}},
                                            client_id="claude"))
    assert identity.sub == "agent-7" and identity.groups == ()
    assert identity.attributes == {"client_id": "claude", "delegation": "token_exchange"}
    person = identity.on_behalf_of
    assert person is not None and person.sub == "alice" and person.groups == ("analysts",)
    assert person.attributes == {}
    for bad in ({"sub": ""}, {"client": "x"}, "agent", {"sub": 7}):
        with pytest.raises(Unauthenticated):
            identity_from_claims(_claims(act=bad))
