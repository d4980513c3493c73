"""Limits per caller (issue 14): response bytes, concurrent statements, request rate.

Real PostgreSQL (pgserver) and real OPA; the memory test runs `querygate serve` as its own
process so its resident memory can be sampled while it answers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.devstack import start_gateway
from bench.load_bench import rss_peak  # the benchmark's own sampler (20 ms)

pytestmark = pytest.mark.integration

# 1,000 rows of 500,000 characters: a 500 MB answer.
HUGE = "SELECT repeat($1, 500000) FROM orders LIMIT 1000"
# About three seconds of CPU on the demo data, cut by a three-second statement timeout.
SLOW = "SELECT count(*) FROM orders a, orders b"


@pytest.fixture(scope="module")
def served(serve_settings, tmp_path_factory):
    """A gateway process with the shipped limits (only the tests' own overrides removed)."""
    settings = {k: v for k, v in serve_settings.items()
                if k not in ("rate_limit_per_s", "max_concurrent_per_identity")}
    gateway = start_gateway(settings, tmp_path_factory.mktemp("limits") / "gateway.log")
    yield gateway
    gateway.stop()


def test_a_500_mb_answer_is_cut_at_the_byte_cap_with_bounded_memory(served, keys):
    cap = Settings.model_fields["max_response_bytes"].default  # as shipped
    row = len(json.dumps(["x" * 500_000]))
    headers = keys.headers("alice", ["analysts"])
    with httpx.Client(base_url=served.url, timeout=120) as client:
        # Warm the code paths (and their allocations) before the baseline.
        client.post("/v1/query", json={"sql": HUGE.replace("1000", "2"), "params": ["x"]},
                    headers=headers).raise_for_status()
        with rss_peak(served.process.pid) as json_mb:
            answer = client.post("/v1/query", json={"sql": HUGE, "params": ["x"]},
                                 headers=headers)
        assert answer.status_code == 200, answer.text[:300]
        body = answer.json()
        assert body["truncated"] is True and body["truncated_reason"] == "response_bytes"
        assert body["row_count"] == len(body["rows"]) == cap // row
        del body, answer

        lines: list[Any] = []
        with rss_peak(served.process.pid) as ndjson_mb, client.stream(
            "POST", "/v1/query", json={"sql": HUGE, "params": ["x"]},
            headers={**headers, "accept": "application/x-ndjson"},
        ) as stream:
            assert stream.status_code == 200
            for line in stream.iter_lines():
                lines.append(len(line) if line.startswith('["') else json.loads(line))
    header, rows, last = lines[0], lines[1:-1], lines[-1]
    assert "columns" in header
    assert len(rows) == cap // (row + 1) and last["row_count"] == len(rows)
    assert last["complete"] is False and last["error"]["code"] == "response_too_large", last
    print(f"\n500 MB answer cut at {cap >> 20} MiB: gateway RSS {json_mb[0]:.0f} MB -> peak "
          f"{json_mb[1]:.0f} MB (JSON), {ndjson_mb[0]:.0f} -> {ndjson_mb[1]:.0f} MB (NDJSON)")
    assert json_mb[1] < 300 and ndjson_mb[1] < 300


def refusal(spool: Path, request_id: str, timeout_s: float = 10) -> dict[str, Any]:
    """The audited decision of a refused request, once the file sink has it."""
    deadline = time.monotonic() + timeout_s
    while True:
        path = spool / "audit.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            event = json.loads(line)
            if (event.get("request") or {}).get("id") == request_id:
                decision: dict[str, Any] = event["decision"]
                return decision
        assert time.monotonic() < deadline, "the refusal was not audited"
        time.sleep(0.1)


def test_the_rate_limit_is_429_with_retry_after(make_gateway, keys, tmp_path):
    gateway = make_gateway(rate_limit_per_s=0.5, rate_limit_burst=3,
                           audit_spool_dir=str(tmp_path / "spool"))
    alice = keys.headers("alice", ["analysts"])
    statuses = [gateway.query("SELECT 1", alice).status_code for _ in range(3)]
    refused = gateway.query("SELECT 1", alice, path="/v1/explain")
    assert statuses == [200, 200, 200]
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limited"
    assert refused.headers["retry-after"] == "2"
    assert refused.json()["error"]["retry_after_s"] == 2
    decision = refusal(tmp_path / "spool", refused.headers["x-request-id"])
    assert (decision["outcome"], decision["by"], decision["code"]) == (
        "deny", "gateway", "rate_limited")
    # Per caller: (issuer, sub).
    assert gateway.query("SELECT 1", keys.headers("bob", ["analysts"])).status_code == 200


def _in_threads(n: int, call: Callable[[], int]) -> tuple[ThreadPoolExecutor, list[Any]]:
    pool = ThreadPoolExecutor(max_workers=n)
    return pool, [pool.submit(call) for _ in range(n)]


def _slow_caller(gateway: Any, headers: dict[str, str]) -> Callable[[], int]:
    def call() -> int:
        with httpx.Client(base_url=gateway.url, timeout=60) as client:
            return client.post("/v1/query", json={"sql": SLOW}, headers=headers).status_code

    return call


def test_the_concurrency_cap_is_429_with_retry_after(make_gateway, keys, tmp_path):
    gateway = make_gateway(max_concurrent_per_identity=2, statement_timeout_ms=3000,
                           audit_spool_dir=str(tmp_path / "spool"))
    alice = keys.headers("alice", ["analysts"])
    pool, slow = _in_threads(2, _slow_caller(gateway, alice))
    time.sleep(0.5)
    started = time.monotonic()
    refused = gateway.query("SELECT 1", alice)
    assert time.monotonic() - started < 0.5
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "too_many_concurrent"
    assert refused.headers["retry-after"] == "1"
    assert refusal(tmp_path / "spool", refused.headers["x-request-id"])["code"] == (
        "too_many_concurrent")
    assert gateway.query("SELECT 1", keys.headers("bob", ["analysts"])).status_code == 200
    assert {f.result() for f in slow} <= {200, 408}
    pool.shutdown()
    # The slots came back with the answers.
    assert gateway.query("SELECT 1", alice).status_code == 200


def _others_wait(gateway: Any, keys: Any) -> tuple[float, int, list[int]]:
    """Fifteen slow statements from alice, then how long bob waits for a point query."""
    pool, slow = _in_threads(15, _slow_caller(gateway, keys.headers("alice", ["analysts"])))
    time.sleep(0.7)  # alice's statements are running (or refused)
    started = time.monotonic()
    answer = gateway.query("SELECT id FROM orders WHERE id = $1",
                           keys.headers("bob", ["analysts"]), [7])
    waited = time.monotonic() - started
    statuses = [f.result() for f in slow]
    pool.shutdown()
    return waited, answer.status_code, statuses


def test_fifteen_slow_queries_from_one_caller_leave_others_answered(make_gateway, keys):
    # Both analysts run under the same masking profile, so they share its pool (10).
    fair = make_gateway(max_concurrent_per_identity=4, statement_timeout_ms=3000)
    waited, status, statuses = _others_wait(fair, keys)
    print(f"\nwith the cap of 4: bob answered in {waited * 1000:.0f} ms; alice {statuses}")
    assert status == 200 and waited < 1.0
    assert statuses.count(429) == 11 and set(statuses) - {429} <= {200, 408}

    # The control: without the cap, alice holds the whole pool and bob waits for it.
    unfair = make_gateway(max_concurrent_per_identity=0, statement_timeout_ms=3000)
    waited, status, statuses = _others_wait(unfair, keys)
    print(f"without it: bob answered {status} in {waited * 1000:.0f} ms")
    assert waited > 1.0 or status == 503
