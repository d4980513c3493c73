"""`make bench` end to end, briefly: real PostgreSQL, OPA, passthrough and querygate
processes under wrk. The figures are not judged here (performance lives in the benchmark);
the run must complete every workload without a failed request, check masking before it
loads anything, read per-stage time from the gateway's metrics, and report it all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.devstack import REPO_ROOT
from bench.load_bench import STAGES, Workload, body_template, concrete_params, stage_means

pytestmark = pytest.mark.integration


def test_a_short_bench_run_reports_every_path_workload_and_stage(tmp_path: Path):
    out = tmp_path / "report"
    run = subprocess.run(
        [sys.executable, "-m", "bench.load_bench", "--duration", "1", "--warmup", "0",
         "--clients", "1,4", "--rounds", "1", "--stream-rows", "5000", "--opa-calls", "50",
         "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=os.environ.copy(),
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    rows = {(r["workload"], r["clients"], r["target"]): r for r in report["rows"]}
    assert set(rows) == {
        (w, c, t) for w in ("point", "join_agg", "write") for c in (1, 4)
        for t in ("direct", "passthrough", "querygate")
    }
    for key, row in rows.items():
        assert row["requests"] > 0 and row["errors"] == 0, key
        assert 0 < row["p50_us"] <= row["p95_us"] <= row["p99_us"], key
    for (workload, clients, target), row in rows.items():
        if target != "querygate":
            assert row["ratio"] is None and row["stages_us"] == {}
            continue
        base = rows[(workload, clients, "passthrough")]
        assert row["ratio"] == pytest.approx(row["throughput"] / base["throughput"])
        assert row["added_p50_us"] == pytest.approx(row["p50_us"] - base["p50_us"])
        # Every request went through each stage; the audit wait is the spool's fsync.
        for stage in ("auth", "facts", "policy", "database", "audit"):
            assert row["stages_us"][stage] > 0, (workload, clients, stage)
    streams = {s["target"]: s for s in report["streams"]}
    assert set(streams) == {"direct", "passthrough", "querygate"}
    assert all(s["rows"] == 5000 for s in streams.values())
    assert streams["querygate"]["rss_growth_mb"] is not None
    assert [t["name"].split(":")[0] for t in report["targets"]] == [
        "point @4", "join_agg @4", "write @4", "point SELECT @1", "facts, cached (p50)",
        "OPA decision round trip (p50, idle)", "NDJSON 5,000 masked rows",
        "NDJSON resident memory growth",
    ]
    table = (out / "report.md").read_text()
    assert table.strip() == run.stdout[run.stdout.index("querygate benchmark"):].strip()
    assert "| point | 4 | querygate |" in table
    assert "| ndjson 5,000 rows | 1 | querygate |" in table


def test_request_bodies_put_numbers_where_wrk_substitutes_keys():
    w = Workload("w", "t", "alice", ("analysts",), "SELECT $1, $2, $3",
                 ("{KEY}", "{KEY2}", "paid"), keys=10, span=5)
    assert body_template(w) == '{"sql":"SELECT $1, $2, $3","params":[{KEY},{KEY2},"paid"]}'
    assert concrete_params(w, 3) == [3, 8, "paid"]


def test_stage_means_are_per_request_deltas_of_the_metric_sums():
    before = {"auth": (1.0, 10.0), "policy": (2.0, 10.0)}
    after = {"auth": (1.5, 110.0), "policy": (2.1, 110.0), "audit": (0.4, 200.0)}
    means = stage_means(before, after, requests=100)
    assert means["auth"] == pytest.approx(5000.0)
    assert means["policy"] == pytest.approx(1000.0)
    assert means["audit"] == pytest.approx(4000.0)  # two appends per request, summed
    assert set(means) == set(STAGES) and means["facts"] == 0.0
