"""NDJSON streaming of 1,000,000 masked rows through a gateway process.

Starts its own PostgreSQL (pgserver, temp dir), OPA and `querygate serve`, fills a table
with 1M rows whose `email` column is masked for an analyst, streams it, and reports masked
rows/s and the gateway's resident-memory growth.

    .venv/bin/python bench/stream_bench.py [ROWS]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from app.config import load_settings
from app.devstack import start_gateway, start_opa, start_postgres
from app.identity import mint_dev_token


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    work = Path(tempfile.mkdtemp(prefix="qg-bench-"))
    pg = start_postgres(work / "pg", demo=True)
    opa = start_opa()
    try:
        import asyncio

        import asyncpg

        async def fill() -> None:
            conn = await asyncpg.connect(pg.app_dsn)
            await conn.execute(
                "DROP TABLE IF EXISTS events; "
                "CREATE TABLE events (id integer PRIMARY KEY, email text NOT NULL, note text);"
                f"INSERT INTO events SELECT g, 'user' || g || '@example.com', 'note ' || (g % 97) "
                f"FROM generate_series(1, {rows}) g; ANALYZE events"
            )
            await conn.close()

        asyncio.run(fill())
        key = work / "dev-key.pem"
        settings = load_settings(dev_mode=True, environment="staging", dev_signing_key_file=key)
        token = mint_dev_token(settings, "alice", ["analysts"])
        gateway = start_gateway(
            {"environment": "staging", "dev_mode": "true", "dev_signing_key_file": str(key),
             "database_url": pg.app_dsn, "opa_url": opa.url, "log_level": "warning"},
            work / "gateway.log",
        )
        try:
            proc = psutil.Process(gateway.process.pid)
            headers = {"authorization": f"Bearer {token}", "accept": "application/x-ndjson"}
            with httpx.Client(base_url=gateway.url, timeout=300) as client:
                client.post("/v1/query", json={"sql": "SELECT id, email FROM events WHERE id < 1000"},
                            headers=headers).raise_for_status()
                baseline = peak = proc.memory_info().rss
                count = 0
                started = time.perf_counter()
                with client.stream("POST", "/v1/query",
                                   json={"sql": "SELECT id, email, note FROM events"},
                                   headers=headers) as response:
                    for chunk in response.iter_bytes():
                        count += chunk.count(b"\n")
                        if count % 100 < 5:
                            peak = max(peak, proc.memory_info().rss)
                elapsed = time.perf_counter() - started
                peak = max(peak, proc.memory_info().rss)
            data_rows = count - 2  # header and summary lines
            print(f"{'rows':>10} {'seconds':>8} {'masked rows/s':>14} {'RSS growth MB':>14}")
            print(f"{data_rows:>10,} {elapsed:>8.2f} {data_rows / elapsed:>14,.0f} "
                  f"{(peak - baseline) / 1e6:>14.1f}")
        finally:
            gateway.stop()
    finally:
        opa.stop()
        pg.stop()


if __name__ == "__main__":
    main()
