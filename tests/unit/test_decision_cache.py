"""DecisionCache and the revision probe, with a scripted OPA client (one module at a time;
tests/integration/test_decision_cache.py runs them against a real OPA)."""

from __future__ import annotations

import asyncio
import copy
from typing import Any, cast

import pytest

from app.errors import Unavailable
from app.policy import Decision, DecisionCache, PolicyClient, active_revision


def _decision(n: int, ttl: int = 60, revision: str | None = "r1") -> Decision:
    return Decision(id=f"d-{n}", allow=True, reasons=(), masks={}, require_approval=None,
                    max_rows=None, bundle_revision=revision, cache_ttl_s=ttl)


class ScriptedOpa:
    """Answers decisions numbered in order, with the TTL and revision it is told."""

    def __init__(self) -> None:
        self.asked: list[dict[str, Any]] = []
        self.probes = 0
        self.active: str | None = "r1"
        self.ttl = 60
        self.down = False

    async def decide(self, input_: dict[str, Any]) -> Decision:
        if self.down:
            raise Unavailable("policy_unavailable", "the policy engine is unreachable")
        self.asked.append(input_)
        return _decision(len(self.asked), self.ttl, self.active)

    async def revision(self) -> str | None:
        self.probes += 1
        if self.down:
            raise Unavailable("policy_unavailable", "the policy engine is unreachable")
        return self.active

    def next_revision(self) -> asyncio.Future[str | None]:
        # A probe of its own per caller (PolicyClient shares them: the tests below).
        return asyncio.ensure_future(self.revision())


INPUT = {
    "identity": {"sub": "alice", "groups": ["analysts"]},
    "environment": "staging",
    "request": {"id": "req-1", "source_ip": "10.0.0.1", "time": "2026-12-02T10:00:00.000+00:00"},
    "query": {"kind": "select", "fingerprint": "sha256:1"},
    "approval": None,
}


def _input(**request: Any) -> dict[str, Any]:
    out = copy.deepcopy(INPUT)
    out["request"].update(request)
    return out


def _cache(opa: ScriptedOpa, entries: int = 100, max_ttl: float = 300) -> DecisionCache:
    return DecisionCache(cast(PolicyClient, opa), entries, max_ttl)


async def _warm(cache: DecisionCache, input_: dict[str, Any] | None = None) -> Decision:
    """Ask until an answer comes from the cache (the first probe sets the revision)."""
    for _ in range(3):
        decision = await cache.decide(input_ or _input(), 1)
        if decision.cached:
            return decision
    raise AssertionError("never cached")


async def test_the_key_is_the_input_but_the_request_id_and_time_and_the_catalog_version():
    opa = ScriptedOpa()
    cache = _cache(opa)
    hit = await _warm(cache)
    asked = len(opa.asked)
    # Another request id and time: the same question.
    again = await cache.decide(_input(id="req-2", time="2026-12-02T11:00:00.000+00:00"), 1)
    assert again.cached and again.id == hit.id and len(opa.asked) == asked
    # Anything else in the input, or another catalog version: a new question.
    for other, version in ((_input(source_ip="10.0.0.2"), 1), (_input(), 2)):
        assert not (await cache.decide(other, version)).cached
    changed = _input()
    changed["identity"]["groups"] = ["analysts", "pii_readers"]
    assert not (await cache.decide(changed, 1)).cached
    assert len(opa.asked) == asked + 3


async def test_a_cached_decision_keeps_the_id_opa_gave_it():
    opa = ScriptedOpa()
    cache = _cache(opa)
    first = await cache.decide(_input(), 1)
    assert not first.cached
    hit = await _warm(cache)
    assert hit.cached and hit.id in {f"d-{n}" for n in range(1, len(opa.asked) + 1)}


async def test_no_ttl_no_revision_or_an_approval_means_asking_every_time():
    for setup in ("ttl", "revision", "approval"):
        opa = ScriptedOpa()
        if setup == "ttl":
            opa.ttl = 0
        if setup == "revision":
            opa.active = None
        cache = _cache(opa)
        for _ in range(3):
            decision = await cache.decide(_input(), 1, cacheable=setup != "approval")
            assert not decision.cached
        assert len(opa.asked) == 3, setup
        assert len(cache) == 0


async def test_a_new_revision_empties_the_cache_before_the_next_decision():
    opa = ScriptedOpa()
    cache = _cache(opa)
    await _warm(cache)
    await _warm(cache, _input(source_ip="10.0.0.9"))
    assert len(cache) == 2
    opa.active = "r2"
    decision = await cache.decide(_input(), 1)
    assert not decision.cached and decision.bundle_revision == "r2"
    assert len(cache) == 0  # both entries went with the old revision
    assert not (await cache.decide(_input(), 1)).cached  # asked, and stored under r2
    assert (await cache.decide(_input(), 1)).cached


async def test_an_entry_lives_no_longer_than_its_ttl_nor_the_cap(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("app.policy.time.monotonic", lambda: now[0])
    opa = ScriptedOpa()
    opa.ttl = 3600
    cache = _cache(opa, max_ttl=10)
    await _warm(cache)
    now[0] += 9.9
    assert (await cache.decide(_input(), 1)).cached
    now[0] += 0.2
    assert not (await cache.decide(_input(), 1)).cached


async def test_the_cache_holds_at_most_its_entries():
    opa = ScriptedOpa()
    cache = _cache(opa, entries=5)
    await _warm(cache)
    for n in range(20):
        await cache.decide(_input(source_ip=f"10.1.0.{n}"), 1)
    assert len(cache) == 5


async def test_opa_down_fails_a_cached_question_closed_too():
    opa = ScriptedOpa()
    cache = _cache(opa)
    await _warm(cache)
    opa.down = True
    with pytest.raises(Unavailable) as refused:
        await cache.decide(_input(), 1)
    assert refused.value.code == "policy_unavailable"


def test_the_active_revision_reads_like_a_provenance_revision():
    assert active_revision({"querygate": {"manifest": {"revision": "abc"}}}) == "abc"
    assert active_revision({}) is None and active_revision(None) is None
    assert active_revision({"querygate": {"manifest": {}}}) is None
    assert active_revision({"querygate": {"manifest": "odd"}}) is None
    # A bundle without a revision could change unseen: no revision at all, no caching.
    assert active_revision({"a": {"manifest": {"revision": "1"}}, "b": {"manifest": {}}}) is None
    assert active_revision({"a": {"manifest": {"revision": "1"}}, "b": {}}) is None
    two = {"b": {"manifest": {"revision": "2"}}, "a": {"manifest": {"revision": "1"}}}
    assert active_revision(two) == "a=1,b=2"


class SlowTransport:
    """OPA's data.system.bundles, answering each POST after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.sent: list[float] = []
        self.revision = "r1"

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        assert path == "/v1/data/system/bundles"
        self.sent.append(asyncio.get_running_loop().time())
        revision = self.revision
        await asyncio.sleep(self.delay)
        return 200, b'{"result": {"querygate": {"manifest": {"revision": "%s"}}}}' % (
            revision.encode())

    def close(self) -> None:
        pass


async def test_callers_share_probes_and_each_sees_a_probe_sent_after_it_arrived():
    client = PolicyClient("http://127.0.0.1:1", "querygate/decision", 2000)
    transport = SlowTransport(0.05)
    client._transport = cast(Any, transport)
    loop = asyncio.get_running_loop()
    arrivals: list[float] = []

    async def ask() -> str | None:
        arrivals.append(loop.time())
        return await client.revision()

    first = asyncio.gather(*(ask() for _ in range(10)))
    await asyncio.sleep(0.02)  # the first probe is in flight now
    transport.revision = "r2"
    second = asyncio.gather(*(ask() for _ in range(10)))
    assert await first == ["r1"] * 10
    # Those who arrived while the first probe was out waited for the next one.
    assert await second == ["r2"] * 10
    assert len(transport.sent) == 2
    assert transport.sent[1] >= max(arrivals)
    await client.close()


async def test_after_a_stale_probe_the_answer_is_opas_not_another_cache_entry():
    opa = ScriptedOpa()
    cache = _cache(opa)
    await _warm(cache)
    asked = len(opa.asked)
    opa.active = "r2"
    fresh = await cache.decide(_input(), 1)
    assert not fresh.cached and fresh.bundle_revision == "r2"
    assert len(opa.asked) == asked + 1


async def test_hits_chain_onto_the_shared_probe_and_each_is_settled_on_its_own():
    """A hit's confirmation is a callback on PolicyClient's shared probe (no task per hit):
    hits that arrive together share one probe, a hit whose waiter is cancelled leaves the
    others alone, and a probe that fails fails every hit waiting on it."""
    client = PolicyClient("http://127.0.0.1:1", "querygate/decision", 2000)
    transport = SlowTransport(0.05)
    client._transport = cast(Any, transport)
    answers = iter(range(1, 100))

    async def decide(input_: dict[str, Any]) -> Decision:
        return _decision(next(answers))

    client.decide = decide  # type: ignore[method-assign]
    cache = _cache(cast(ScriptedOpa, client))
    await _warm(cache)
    sent = len(transport.sent)
    hits = [await cache.speculate(_input(), 1) for _ in range(10)]
    assert all(d.cached and probe is not None for d, probe in hits)
    hits[0][1].cancel()  # type: ignore[union-attr]
    assert await asyncio.gather(*(p for _, p in hits[1:])) == [True] * 9  # type: ignore[misc]
    assert len(transport.sent) == sent + 1  # ten hits, one probe

    async def refused(path: str, body: bytes) -> tuple[int, bytes]:
        await asyncio.sleep(0.01)
        raise OSError("connection refused")

    transport.post = refused  # type: ignore[method-assign]
    failing = [await cache.speculate(_input(), 1) for _ in range(3)]
    for _, probe in failing:
        with pytest.raises(Unavailable) as caught:
            await probe  # type: ignore[misc]
        assert caught.value.code == "policy_unavailable"
    await client.close()
