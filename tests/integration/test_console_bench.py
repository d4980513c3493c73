"""`make bench`'s console part, briefly: real PostgreSQL, OPA and a `querygate console`
process; every page answers 200 for both readers and the report has every figure. The
figures themselves are the benchmark's (docs/console.md), not judged here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.devstack import REPO_ROOT

pytestmark = pytest.mark.integration


def test_a_short_console_bench_run_reports_every_page(tmp_path: Path):
    out = tmp_path / "report"
    run = subprocess.run(
        [sys.executable, "-m", "bench.console_bench", "--events", "3000", "--requests", "3",
         "--warmup", "1", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=os.environ.copy(),
    )
    report = json.loads((out / "console.json").read_text())
    assert report["events"] == 3000 and report["ingest_events_per_s"] > 0
    assert {(r["as"], r["path"].split("?")[0]) for r in report["rows"]} >= {
        ("sec", "/events"), ("sec", "/touch"), ("sec", "/touch.csv"), ("sec", "/health"),
        ("alice", "/events"), ("alice", "/touch"),
    }
    assert any(r["path"].startswith("/events/") for r in report["rows"])  # an event's page
    assert any("cursor=" in r["path"] for r in report["rows"])  # a second page
    for row in report["rows"]:
        assert row["requests"] == 3 and 0 < row["p50_ms"] <= row["p95_ms"] <= row["max_ms"]
    assert run.returncode == (0 if report["worst_p95_ms"] < 200 else 1), run.stderr[-2000:]
    assert "budget 200 ms" in run.stdout
