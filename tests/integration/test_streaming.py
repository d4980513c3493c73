"""A 1,000,000-row NDJSON stream through a gateway process: masked per row, bounded memory.

The gateway runs as its own process (`querygate serve`), so its resident memory can be read
while it streams. Throughput is printed for information; the target lives in bench/.
"""

from __future__ import annotations

import json
import time

import httpx
import psutil
import pytest

from app.devstack import start_gateway

pytestmark = pytest.mark.integration

ROWS = 1_000_000


@pytest.fixture(scope="module")
def events(db):
    if not db.table_exists("events"):
        db.execute(
            "CREATE TABLE events (id integer PRIMARY KEY, email text NOT NULL, note text);"
            f"INSERT INTO events SELECT g, 'user' || g || '@example.com', 'note ' || (g % 97) "
            f"FROM generate_series(1, {ROWS}) g; ANALYZE events"
        )
    return "events"


@pytest.fixture(scope="module")
def served_gateway(events, serve_settings, tmp_path_factory):
    # The whole million rows (~38 MB) is the point here, past QUERYGATE_MAX_RESPONSE_BYTES.
    settings = serve_settings | {"max_response_bytes": str(1 << 30)}
    gateway = start_gateway(settings, tmp_path_factory.mktemp("gw") / "gateway.log")
    yield gateway.process, gateway.url
    gateway.stop()


def test_million_row_stream_has_bounded_memory(served_gateway, keys):
    proc, url = served_gateway
    headers = {**keys.headers("alice", ["analysts"]), "accept": "application/x-ndjson"}
    gateway = psutil.Process(proc.pid)
    with httpx.Client(base_url=url, timeout=120) as client:
        # Warm up the code paths (and their allocations) before the baseline.
        client.post("/v1/query", json={"sql": "SELECT id, email FROM events WHERE id < 1000"},
                    headers=headers).raise_for_status()
        baseline = gateway.memory_info().rss
        peak = baseline
        rows = 0
        started = time.perf_counter()
        with client.stream("POST", "/v1/query", json={"sql": "SELECT id, email, note FROM events"},
                           headers=headers) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            header = json.loads(next(lines))
            assert header["decision"]["masked"] == {"email": "email"}
            last = None
            for line in lines:
                if line.startswith("["):
                    rows += 1
                    if rows % 50_000 == 0:
                        peak = max(peak, gateway.memory_info().rss)
                    if rows <= 3:
                        row = json.loads(line)
                        assert row[1] == "u***@example.com"
                else:
                    last = json.loads(line)
        elapsed = time.perf_counter() - started
    assert rows == ROWS
    assert last == {"row_count": ROWS, "complete": True}
    growth_mb = (peak - baseline) / 1e6
    print(f"\n1M masked rows in {elapsed:.1f}s ({ROWS / elapsed:,.0f} rows/s end to end, "
          f"client included); gateway RSS growth {growth_mb:.1f} MB")
    assert growth_mb < 100
