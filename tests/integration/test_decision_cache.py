"""The decision cache against a real OPA serving a bundle (docs/decision-contract.md, "Caching").

A cached decision is served only when the bundle revision OPA has active, read after the
request arrived, is the one that decided it; OPA that cannot answer fails every request
closed, cached or not; OPA serving plain files (no revision) gets no caching at all.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.devstack import REPO_ROOT, OpaProcess, build_bundle, start_opa
from tests.integration.test_deadlines import audited

pytestmark = pytest.mark.integration

READ = "SELECT id, status FROM orders WHERE id = 7"
WRITE = "UPDATE orders SET status = $1 WHERE id = 22"


def _cache(gateway: Any) -> dict[str, float]:
    text = gateway.client.get("/metrics").text
    return {
        sample.labels["result"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "querygate_decision_cache"
        for sample in family.samples
        if sample.name.endswith("_total")
    }


class BundleOpa:
    """OPA serving a bundle built from a copy of rego/, rebuilt in place on ``edit``."""

    def __init__(self, root: Path) -> None:
        self.rego = root / "rego"
        shutil.copytree(REPO_ROOT / "rego", self.rego)
        self.bundle = root / "querygate.tar.gz"
        self.revision = build_bundle([self.rego], self.bundle)
        self.opa: OpaProcess = start_opa(extra_args=["--watch"], bundle=self.bundle)
        self.url = self.opa.url

    def active(self) -> Any:
        result = httpx.get(f"{self.url}/v1/data/system/bundles").json()["result"]
        return next(iter(result.values()))["manifest"]["revision"]

    def edit_config(self, **changes: Any) -> str:
        data_file = self.rego / "querygate" / "config" / "data.json"
        data_file.write_text(json.dumps({**json.loads(data_file.read_text()), **changes}))
        fresh = self.bundle.with_suffix(".new")
        self.revision = build_bundle([self.rego], fresh)
        fresh.replace(self.bundle)
        deadline = time.monotonic() + 20
        while self.active() != self.revision:
            assert time.monotonic() < deadline, "OPA did not activate the new bundle"
            time.sleep(0.02)
        return self.revision

    def stop(self) -> None:
        self.opa.stop()


@pytest.fixture
def bundle_opa(tmp_path: Path):
    opa = BundleOpa(tmp_path)
    yield opa
    opa.stop()


def test_a_new_bundle_revision_is_in_force_for_the_very_next_request(
    make_gateway, bundle_opa, alice, tmp_path
):
    gateway = make_gateway(opa_url=bundle_opa.url, audit_spool_dir=str(tmp_path / "spool"))
    answers = [gateway.query(READ, alice) for _ in range(4)]
    assert [a.status_code for a in answers] == [200] * 4, answers[-1].text
    assert _cache(gateway).get("hit", 0) >= 1
    # The audit trail tells a cached decision from a fresh one, with OPA's decision id.
    decisions = [
        next(e for e in audited(tmp_path / "spool", a.headers["x-request-id"])
             if e["type"] == "decision")["decision"]
        for a in answers
    ]
    fresh = [d for d in decisions if not d["cached"]]
    cached = [d for d in decisions if d["cached"]]
    assert cached and fresh
    assert {d["id"] for d in cached} <= {d["id"] for d in fresh}
    assert {d["bundle_revision"] for d in decisions} == {bundle_opa.revision}

    # The analysts' group is no reader any more: OPA has the new bundle active, so the very
    # next request is decided by it, not by the cached allow.
    revision = bundle_opa.edit_config(reader_groups=["support", "dba", "security"])
    denied = gateway.query(READ, alice)
    assert denied.status_code == 403, denied.text
    assert denied.json()["error"]["code"] == "policy_denied"
    assert _cache(gateway).get("revision", 0) >= 1
    # On record: the read ran on the cached allow while the probe was out, was not
    # answered (decision_stale, no row), and was decided again by the new bundle.
    events = _trail(tmp_path / "spool", denied, 3)
    assert _kinds(events) == [("decision", True, "allow", None),
                              ("execution", None, None, "decision_stale"),
                              ("decision", False, "deny", None)]
    assert events[1]["execution"]["rows_returned"] == 0
    assert events[2]["decision"]["bundle_revision"] == revision


def _trail(spool: Path, answer: httpx.Response, count: int) -> list[dict[str, Any]]:
    for _ in range(200):
        events = audited(spool, answer.headers["x-request-id"], timeout_s=0)
        if len(events) >= count:
            return events
        time.sleep(0.05)
    raise AssertionError(events)


def _kinds(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(e["type"], e.get("decision", {}).get("cached"), e.get("decision", {}).get("outcome"),
             (e.get("execution") or {}).get("code")) for e in events]


def test_a_read_in_flight_when_a_bundle_changes_is_answered_by_the_new_policy(
    make_gateway, bundle_opa, alice, tmp_path
):
    gateway = make_gateway(opa_url=bundle_opa.url, audit_spool_dir=str(tmp_path / "spool"))
    for _ in range(3):
        assert gateway.query(READ, alice).status_code == 200
    # A new revision that still lets analysts read: the read that ran on the cached allow
    # is not answered from it, but decided again and run again.
    revision = bundle_opa.edit_config(decision_cache_ttl_s=30)
    answer = gateway.query(READ, alice)
    assert answer.status_code == 200, answer.text
    assert answer.json()["rows"] == [[7, gateway.query(READ, alice).json()["rows"][0][1]]]
    events = _trail(tmp_path / "spool", answer, 4)
    assert _kinds(events) == [("decision", True, "allow", None),
                              ("execution", None, None, "decision_stale"),
                              ("decision", False, "allow", None),
                              ("execution", None, None, None)]
    assert events[2]["decision"]["bundle_revision"] == revision
    assert answer.json()["decision"]["id"] == events[2]["decision"]["id"]


def test_a_write_on_a_cached_allow_runs_only_once_its_probe_confirmed_it(
    make_gateway, bundle_opa, dana, db, tmp_path
):
    """A write's decision is written while its probe is out, and nothing runs before both:
    with a new bundle that no longer lets dba write, the cached allow is on record, stale,
    and the write is refused by the new policy without having run."""
    gateway = make_gateway(opa_url=bundle_opa.url, audit_spool_dir=str(tmp_path / "spool"))
    status = db.fetchval("SELECT status FROM orders WHERE id = 22")
    for _ in range(3):
        assert gateway.query(WRITE, dana, [status]).status_code == 200
    assert _cache(gateway).get("hit", 0) >= 1
    bundle_opa.edit_config(writer_groups=[])
    denied = gateway.query(WRITE, dana, ["stale-write"])
    assert denied.status_code == 403, denied.text
    assert denied.json()["error"]["code"] == "policy_denied"
    assert db.fetchval("SELECT status FROM orders WHERE id = 22") == status
    events = _trail(tmp_path / "spool", denied, 3)
    assert _kinds(events) == [("decision", True, "allow", None),
                              ("execution", None, None, "decision_stale"),
                              ("decision", False, "deny", None)]
    assert events[1]["execution"]["rows_affected"] in (None, 0)


def test_opa_stopped_with_decisions_cached_fails_closed_at_once(make_gateway, bundle_opa, dana,
                                                                db):
    gateway = make_gateway(opa_url=bundle_opa.url, opa_timeout_ms=2000)
    status = db.fetchval("SELECT status FROM orders WHERE id = 22")
    for _ in range(3):
        # The same statement with the value it already has: nothing changes, it is cached.
        assert gateway.query(WRITE, dana, [status]).status_code == 200
    assert _cache(gateway).get("hit", 0) >= 1
    bundle_opa.stop()
    for sql, params in ((WRITE, ["tampered"]), ("SELECT count(*) FROM customers", None)):
        started = time.monotonic()
        answer = gateway.query(sql, dana, params)
        took = time.monotonic() - started
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "policy_unavailable"
        assert took < 1.0, took  # refused connections, not the 2 s timeout
    assert db.fetchval("SELECT status FROM orders WHERE id = 22") == status


def test_opa_serving_plain_files_gets_no_caching(make_gateway, alice):
    # The suite's OPA loads rego/ as files: no bundle revision, so nothing would tell the
    # gateway that the policy changed, and no decision is reused.
    gateway = make_gateway()
    for _ in range(3):
        assert gateway.query(READ, alice).status_code == 200
    counts = _cache(gateway)
    assert counts.get("hit", 0) == 0 and counts.get("uncacheable", 0) >= 3


def test_a_cached_refusal_is_not_answered_before_its_probe(make_gateway, bundle_opa, keys):
    """Only an allow may be acted on while its probe is out: a cached denial waits for it,
    so a bundle that now permits the request is in force for the very next one."""
    gateway = make_gateway(opa_url=bundle_opa.url)
    marketing = keys.headers("mia", ["marketing"])
    for _ in range(3):
        denied = gateway.query(READ, marketing)
        assert denied.status_code == 403, denied.text
    assert _cache(gateway).get("hit", 0) >= 1
    readers = json.loads((bundle_opa.rego / "querygate" / "config" / "data.json").read_text())
    bundle_opa.edit_config(reader_groups=[*readers["reader_groups"], "marketing"])
    allowed = gateway.query(READ, marketing)
    assert allowed.status_code == 200, allowed.text


def test_a_refusal_that_follows_from_a_cached_allow_waits_for_its_probe(make_gateway, bundle_opa,
                                                                        alice):
    """enforce() refuses from the decision's masks (masked predicates under "deny"): with a
    cached decision that refusal, too, is answered only once the probe confirmed it."""
    config = json.loads((bundle_opa.rego / "querygate" / "config" / "data.json").read_text())
    bundle_opa.edit_config(masking={**config["masking"], "predicates": "deny"})
    gateway = make_gateway(opa_url=bundle_opa.url)
    sql = "SELECT id FROM customers WHERE email = 'nobody@example.com'"
    for _ in range(3):
        refused = gateway.query(sql, alice)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "masked_column_predicate"
    assert _cache(gateway).get("hit", 0) >= 1
    bundle_opa.edit_config(masking={**config["masking"], "predicates": "compare_masked"})
    served = gateway.query(sql, alice)
    assert served.status_code == 200, served.text
    assert served.json()["notices"][0]["code"] == "masked_predicate"
