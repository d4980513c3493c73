"""Decision validation: anything but a well-formed decision is a 503, never a guess."""

from __future__ import annotations

import pytest

from app.errors import Unavailable
from app.policy import parse_decision

GOOD = {"allow": True, "reasons": [{"rule": "r", "message": "m"}], "masks": {},
        "require_approval": None, "max_rows": 10}


def test_good_decision():
    decision = parse_decision(GOOD, "d1")
    assert decision.allow is True and decision.max_rows == 10 and decision.id == "d1"
    assert decision.reasons_json() == [{"rule": "r", "message": "m"}]


@pytest.mark.parametrize(
    "result",
    [
        None, [], "allow", 1,
        {**GOOD, "allow": "true"},
        {**GOOD, "allow": 1},
        {k: v for k, v in GOOD.items() if k != "allow"},
        {**GOOD, "reasons": "r"},
        {**GOOD, "reasons": ["r"]},
        {**GOOD, "reasons": [{"rule": "r"}]},
        {k: v for k, v in GOOD.items() if k != "reasons"},
        {**GOOD, "masks": []},
        {**GOOD, "masks": {"public.t.c": 1}},
        {**GOOD, "masks": {"public.t.c": "rot13"}},
        {k: v for k, v in GOOD.items() if k != "masks"},
        {**GOOD, "require_approval": "yes"},
        {**GOOD, "max_rows": -1},
        {**GOOD, "max_rows": 1.5},
        {**GOOD, "max_rows": True},
    ],
)
def test_malformed_decisions_fail_closed(result):
    with pytest.raises(Unavailable) as caught:
        parse_decision(result, "d1")
    assert caught.value.code == "policy_unavailable"
