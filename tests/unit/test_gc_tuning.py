"""A serving process freezes its start-up heap and collects less often (app/cli.py
``tune_gc``; the measurement is in docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys

from app.cli import GC_THRESHOLDS


def test_a_serving_process_freezes_its_start_up_heap_and_raises_the_thresholds():
    # In a child: a frozen heap stays frozen for the life of the process.
    probe = (
        "import gc, json\n"
        "from app.cli import tune_gc\n"
        "before = gc.get_threshold()\n"
        "tune_gc()\n"
        "print(json.dumps([before, gc.get_threshold(), gc.get_freeze_count()]))\n"
    )
    before, after, frozen = json.loads(subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
    assert before == [700, 10, 10]  # Python's defaults until then
    assert after == list(GC_THRESHOLDS)
    assert frozen > 10_000  # the imported modules are out of every collection's walk


def test_querygate_serve_tunes_the_collector_before_it_serves(tmp_path):
    # `querygate serve`'s one-process path, with uvicorn.run standing in for the server:
    # nothing connects (the lifespan never starts).
    settings = {"dev_mode": True, "environment": "dev",
                "database_url": "postgresql://querygate@127.0.0.1:1/appdb",
                "dev_signing_key_file": str(tmp_path / "dev-key.pem")}
    probe = (
        "import gc, json, uvicorn\n"
        "from app import cli\n"
        "from app.config import load_settings\n"
        "seen = []\n"
        "uvicorn.run = lambda app, **kw: seen.append(gc.get_threshold())\n"
        f"cli._serve(load_settings(**{settings!r}))\n"
        "print(json.dumps(seen))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out) == [list(GC_THRESHOLDS)]
