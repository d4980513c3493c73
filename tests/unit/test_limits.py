"""Limits per caller (app/limits.py): token buckets and statement slots, on a fake clock."""

from __future__ import annotations

import pytest

from app.errors import TooManyRequests
from app.limits import CallerLimits, ConcurrencyLimiter, RateLimiter

ALICE = ("https://idp.test", "alice")
ALICE_ELSEWHERE = ("https://other.test", "alice")
BOB = ("https://idp.test", "bob")


def test_a_bucket_admits_its_burst_then_one_token_per_interval():
    limiter = RateLimiter(rate_per_s=2, burst=3)
    assert [limiter.take(ALICE, 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take(ALICE, 0.0) == pytest.approx(0.5)
    assert limiter.take(ALICE, 0.25) == pytest.approx(0.25)
    assert limiter.take(ALICE, 0.5) == 0.0
    # Refilled, never beyond the burst.
    assert [limiter.take(ALICE, 100.0) for _ in range(4)][-1] > 0


def test_callers_are_issuer_and_sub():
    limiter = RateLimiter(rate_per_s=1, burst=1)
    assert limiter.take(ALICE, 0.0) == 0.0
    assert limiter.take(ALICE, 0.0) > 0
    # The same sub from another issuer, and another sub, have buckets of their own.
    assert limiter.take(ALICE_ELSEWHERE, 0.0) == 0.0
    assert limiter.take(BOB, 0.0) == 0.0


def test_a_zero_rate_admits_everything():
    limiter = RateLimiter(rate_per_s=0, burst=1)
    assert all(limiter.take(ALICE, 0.0) == 0.0 for _ in range(1000))
    assert len(limiter) == 0


def test_refilled_buckets_are_forgotten_when_the_table_grows(monkeypatch):
    monkeypatch.setattr("app.limits._PRUNE_AT", 100)
    limiter = RateLimiter(rate_per_s=1, burst=2)
    for n in range(100):
        limiter.take(("iss", f"u{n}"), 0.0)
    limiter.take(("iss", "late"), 10.0)  # everyone else has refilled by now
    assert len(limiter) == 1


def test_slots_per_caller_and_their_release():
    limiter = ConcurrencyLimiter(limit=2)
    first, second = limiter.enter(ALICE), limiter.enter(ALICE)
    assert first is not None and second is not None
    assert limiter.enter(ALICE) is None
    assert limiter.enter(BOB) is not None  # a cap per caller, not global
    first.release()
    first.release()  # twice is once
    assert limiter.running(ALICE) == 1
    assert limiter.enter(ALICE) is not None
    assert limiter.enter(ALICE) is None


def test_a_zero_cap_admits_everything():
    limiter = ConcurrencyLimiter(limit=0)
    slots = [limiter.enter(ALICE) for _ in range(100)]
    assert all(slot is not None for slot in slots)
    assert limiter.running(ALICE) == 0


def test_refusals_are_429_with_retry_after():
    now = [0.0]
    limits = CallerLimits(rate_per_s=0.5, burst=1, max_concurrent=1, clock=lambda: now[0])
    limits.admit(ALICE)
    with pytest.raises(TooManyRequests) as refused:
        limits.admit(ALICE)
    assert refused.value.status == 429 and refused.value.code == "rate_limited"
    assert refused.value.headers == {"Retry-After": "2"}
    assert refused.value.body()["error"]["retry_after_s"] == 2
    now[0] = 2.0
    limits.admit(ALICE)

    slot = limits.slot(ALICE)
    with pytest.raises(TooManyRequests) as busy:
        limits.slot(ALICE)
    assert busy.value.code == "too_many_concurrent"
    assert busy.value.headers == {"Retry-After": "1"}
    slot.release()
    limits.slot(ALICE).release()
