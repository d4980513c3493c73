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
