"""Masking strategies and plans, one module alone."""

from __future__ import annotations

import decimal

import pytest

from app.errors import Forbidden
from app.facts import Output, QueryFacts
from app.masking import check_predicates, make_masker, plan
from app.policy import Decision
from app.results import Column

KEY = b"k" * 32


def mask(strategy: str, value, type_name: str = "text"):
    masker, reported = make_masker(strategy, type_name, KEY, "[REDACTED]")
    return masker(value), reported


@pytest.mark.parametrize(
    ("strategy", "value", "expected"),
    [
        ("redact", "alice@example.com", "[REDACTED]"),
        ("null", "alice@example.com", None),
        ("email", "alice@example.com", "a***@example.com"),
        ("email", "not-an-email", "[REDACTED]"),
        ("partial", "123-45-6789", "*******6789"),
        ("partial:1:2", "Grace Hopper", "G*********er"),
        ("partial", "1234", "****"),
        ("pan", "4111111111111111", "************1111"),
        ("pan", "4111-1111-1111-1111", "****-****-****-1111"),
        ("pan", "12345", "*****"),
    ],
)
def test_strategies(strategy, value, expected):
    assert mask(strategy, value)[0] == expected


@pytest.mark.parametrize("strategy", ["redact", "null", "email", "partial", "pan", "hash"])
def test_null_stays_null(strategy):
    assert mask(strategy, None)[0] is None


def test_hash_is_keyed_and_deterministic():
    first, reported = mask("hash", "alice@example.com")
    again, _ = mask("hash", "alice@example.com")
    other_key, _ = make_masker("hash", "text", b"x" * 32, "")
    assert first == again and len(first) == 64 and reported == "text"
    assert other_key("alice@example.com") != first


def test_types_stay_honest():
    # A redacted number is a null of the same type, not a string in an int column.
    assert mask("redact", 42, "int4") == (None, "int4")
    assert mask("null", decimal.Decimal("1.5"), "numeric") == (None, "numeric")
    # Strategies that produce text say so.
    assert mask("hash", 42, "int4")[1] == "text"
    assert mask("partial", 123456789, "int8") == ("*****6789", "text")


def test_unknown_strategy_is_refused():
    with pytest.raises(Forbidden):
        make_masker("rot13", "text", KEY, "")


def _decision(masks, derived="redact", allowed=()):
    return Decision("d", True, (), masks, None, None, derived, tuple(allowed))


def _facts(outputs, predicate=()):
    return QueryFacts(fingerprint="f", kind="select", outputs=tuple(outputs),
                      columns_predicate=tuple(predicate))


EMAIL = "public.customers.email"
SSN = "public.customers.ssn"


def test_plan_follows_lineage_not_names():
    facts = _facts([
        Output("innocent", (EMAIL,), "direct", "text"),
        Output("id", ("public.customers.id",), "direct", "int4"),
        Output("lower", (EMAIL,), "expression"),
        Output("n", (SSN,), "aggregate"),
        Output("mixed", (EMAIL, SSN), "direct", "text"),
    ])
    columns = [Column("innocent", "text"), Column("id", "int4"), Column("lower", "text"),
               Column("n", "int8"), Column("mixed", "text")]
    p = plan(facts, _decision({EMAIL: "email", SSN: "partial"}), columns, KEY, "[R]")
    row = p.apply(["bob@x.org", 7, "bob@x.org", 3, "123-45-6789"])
    assert row == ["b***@x.org", 7, "[R]", None, "[R]"]
    assert p.masked == {"innocent": "email", "lower": "redact", "n": "redact", "mixed": "redact"}
    assert [c.type for c in p.columns] == ["text", "int4", "text", "int8", "text"]


def test_plan_denies_derived_outputs_when_policy_says_so():
    facts = _facts([Output("lower", (EMAIL,), "expression")])
    with pytest.raises(Forbidden) as caught:
        plan(facts, _decision({EMAIL: "email"}, derived="deny"), [Column("lower", "text")], KEY, "")
    assert caught.value.code == "masked_derivation"


def test_masked_predicates_are_denied_unless_allowed():
    facts = _facts([], predicate=[SSN])
    with pytest.raises(Forbidden) as caught:
        check_predicates(facts, _decision({SSN: "partial"}))
    assert caught.value.code == "masked_column_predicate"
    check_predicates(facts, _decision({SSN: "partial"}, allowed=[SSN]))
    check_predicates(facts, _decision({EMAIL: "email"}))
