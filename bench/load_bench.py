"""``make bench``: what governance costs, measured against the bare path in one run.

One PostgreSQL (pgserver, demo data plus a 1M-row table), one OPA, and three ways to the
same rows, on the same machine in the same run:

(a) direct      asyncpg from this process, one connection per client;
(b) passthrough bench/passthrough.py: FastAPI + asyncpg, no governance;
(c) querygate   ``querygate serve``: auth, facts, OPA, masking, audit to the file spool.

Workloads: a point SELECT by key with a masked column, a join+aggregate, a write, each at 1
and 16 concurrent clients (wrk, keep-alive, for (b) and (c)); then a 1,000,000-row NDJSON
stream. Each HTTP run is checked first (status, masking on (c), none on (b)). The gateway's
own Prometheus metrics give per-stage time. The report is one Markdown table, written to
stdout and bench/results/report.md (and .json), followed by the issue's targets.

(b) and (c) always run under the same HTTP server (``--server``: uvicorn, or granian) with
the same number of worker processes (``--workers``), so the ratio compares like with like.

CPU placement on a 2-core machine: this process and wrk are pinned to the first core; the
servers (b) and (c), every process and thread of them, to the last core with one worker,
and to all cores with more (``--server-cpus``); PostgreSQL and OPA float on both.

    .venv/bin/python bench/load_bench.py [--duration 10] [--clients 1,16] [--stream-rows N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import psutil
from prometheus_client.parser import text_string_to_metric_families

from app.config import load_settings
from app.devstack import (
    REPO_ROOT,
    free_port,
    start_gateway,
    start_opa,
    start_postgres,
    terminate,
    wait_http,
)
from app.identity import mint_dev_token

BENCH = Path(__file__).resolve().parent
STAGES = ("auth", "facts", "policy", "database", "masking", "audit")
POOL_SIZE = 16


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    user: str
    groups: tuple[str, ...]
    sql: str
    params: tuple[Any, ...]  # "{KEY}" / "{KEY2}" are replaced per request
    keys: int
    span: int = 0


def workloads(customers: int, orders: int) -> list[Workload]:
    return [
        Workload("point", "point SELECT by key, masked email", "alice", ("analysts",),
                 "SELECT id, full_name, email FROM customers WHERE id = $1", ("{KEY}",),
                 customers),
        Workload("join_agg", "join + aggregate (50 customers)", "alice", ("analysts",),
                 "SELECT c.country, count(*) AS orders, sum(o.amount_cents) AS total "
                 "FROM customers c JOIN orders o ON o.customer_id = c.id "
                 "WHERE c.id BETWEEN $1 AND $2 GROUP BY c.country ORDER BY c.country",
                 ("{KEY}", "{KEY2}"), customers - 50, span=50),
        Workload("write", "UPDATE by key", "dana", ("dba",),
                 "UPDATE orders SET status = $2 WHERE id = $1", ("{KEY}", "paid"), orders),
    ]


def body_template(w: Workload) -> str:
    """The JSON body with bare {KEY}/{KEY2} where wrk puts numbers."""
    text = orjson.dumps({"sql": w.sql, "params": list(w.params)}).decode()
    return text.replace('"{KEY}"', "{KEY}").replace('"{KEY2}"', "{KEY2}")


def concrete_params(w: Workload, key: int) -> list[Any]:
    return [key if p == "{KEY}" else key + w.span if p == "{KEY2}" else p for p in w.params]


@dataclass
class Row:
    workload: str
    clients: int
    target: str
    requests: int
    seconds: float
    errors: int
    p50_us: float
    p95_us: float
    p99_us: float
    stages_us: dict[str, float] = field(default_factory=dict)
    ratio: float | None = None
    added_p50_us: float | None = None

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass
class StreamRow:
    target: str
    rows: int
    seconds: float
    rss_growth_mb: float | None

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


# --- CPU placement ------------------------------------------------------------------------

def cpus() -> tuple[set[int], set[int]] | None:
    """(load generator's CPUs, servers' CPUs), or None on a one-core machine."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None
    return {available[0]}, {available[-1]}


def pin(pid: int, cpu_set: set[int]) -> None:
    """Pin every thread of ``pid`` and of its worker processes (threads started later
    inherit it)."""
    pids = [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    for each in pids:
        with contextlib.suppress(FileNotFoundError):
            for task in Path(f"/proc/{each}/task").iterdir():
                with contextlib.suppress(ProcessLookupError):
                    os.sched_setaffinity(int(task.name), cpu_set)


def granian_command(target: str, port: str, workers: int) -> list[str]:
    """granian serving an ASGI factory as uvicorn serves (b) and (c): uvloop, HTTP/1.1 only,
    no access log."""
    return [sys.executable, "-m", "granian", "--interface", "asgi", "--factory",
            "--loop", "uvloop", "--http", "1", "--no-ws", "--workers", str(workers),
            "--log-level", "warning", "--host", "127.0.0.1", "--port", port, target]


# --- load generation ----------------------------------------------------------------------

def percentile(sorted_samples: Sequence[float], q: float) -> float:
    return sorted_samples[min(len(sorted_samples) - 1, int(q * len(sorted_samples)))]


async def _direct(dsn: str, w: Workload, clients: int, seconds: float) -> tuple[int, list[float]]:
    conns = [await asyncpg.connect(dsn) for _ in range(clients)]
    samples: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client(conn: asyncpg.Connection) -> None:
        rng = random.Random()
        while time.perf_counter() < deadline:
            params = concrete_params(w, rng.randint(1, w.keys))
            started = time.perf_counter()
            await conn.fetch(w.sql, *params)
            samples.append(time.perf_counter() - started)

    try:
        await asyncio.gather(*(client(c) for c in conns))
    finally:
        for conn in conns:
            await conn.close()
    return len(samples), samples


def run_direct(dsn: str, w: Workload, clients: int, seconds: float, warmup: float) -> Row:
    if warmup > 0:
        asyncio.run(_direct(dsn, w, clients, warmup))
    started = time.perf_counter()
    count, samples = asyncio.run(_direct(dsn, w, clients, seconds))
    elapsed = time.perf_counter() - started
    samples.sort()
    return Row(w.name, clients, "direct", count, elapsed, 0,
               percentile(samples, 0.5) * 1e6, percentile(samples, 0.95) * 1e6,
               percentile(samples, 0.99) * 1e6)


def run_wrk(url: str, w: Workload, clients: int, seconds: float, token: str) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed: `make bench` installs it (apt-get install wrk)")
    env = {**os.environ, "BENCH_BODY": body_template(w), "BENCH_KEYS": str(w.keys),
           "BENCH_SPAN": str(w.span), "BENCH_TOKEN": token}
    # wrk takes whole seconds; -t1 keeps the load generator on its one pinned core.
    out = subprocess.run(
        [wrk, "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
         "-s", str(BENCH / "load.lua"), url],
        env=env, capture_output=True, text=True, check=True,
    ).stdout
    for line in out.splitlines():
        if line.startswith("BENCH_RESULT "):
            result: dict[str, Any] = json.loads(line.removeprefix("BENCH_RESULT "))
            return result
    raise RuntimeError(f"wrk printed no result:\n{out}")


def wrk_row(result: dict[str, Any], w: Workload, clients: int, target: str) -> Row:
    errors = sum(result[k] for k in ("non_2xx", "connect_errors", "read_errors",
                                     "write_errors", "timeouts"))
    return Row(w.name, clients, target, result["requests"], result["duration_us"] / 1e6,
               errors, result["p50_us"], result["p95_us"], result["p99_us"])


# --- the gateway's own metrics ------------------------------------------------------------

def stage_totals(url: str) -> dict[str, tuple[float, float]]:
    """{stage: (sum seconds, count)} from /metrics; "audit" is the spool append wait."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    totals: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name == "querygate_stage_duration_seconds":
                key = sample.labels.get("stage", "")
            elif family.name == "querygate_audit_append_duration_seconds":
                key = "audit"
            else:
                continue
            slot = totals.setdefault(key, [0.0, 0.0])
            if sample.name.endswith("_sum"):
                slot[0] += sample.value
            elif sample.name.endswith("_count"):
                slot[1] += sample.value
    return {k: (v[0], v[1]) for k, v in totals.items()}


def stage_means(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]],
                requests: int) -> dict[str, float]:
    """Mean microseconds per request in each stage over the run (audit: all appends a
    request waits for, summed)."""
    means = {}
    for stage in STAGES:
        total = after.get(stage, (0.0, 0.0))[0] - before.get(stage, (0.0, 0.0))[0]
        means[stage] = total / requests * 1e6 if requests else 0.0
    return means


# --- correctness checks before load -------------------------------------------------------

def check(url: str, w: Workload, token: str, direct_rows: list[list[Any]], masked: bool) -> None:
    """One request must succeed and agree with the database; the point query's email must be
    masked by querygate and must not be by the passthrough."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    response = httpx.post(f"{url}/v1/query", headers=headers, timeout=30,
                          json={"sql": w.sql, "params": concrete_params(w, 7)})
    if response.status_code != 200:
        raise SystemExit(f"{url} answered {response.status_code} to {w.name}: {response.text}")
    rows = response.json()["rows"]
    if w.name == "write":
        return
    if w.name == "point":
        email = rows[0][2]
        if masked == (email == direct_rows[0][2]):
            raise SystemExit(f"{url}: email {email!r} should {'' if masked else 'not '}be masked")
        rows = [r[:2] for r in rows]
        direct_rows = [r[:2] for r in direct_rows]
    if json.loads(orjson.dumps(rows, default=str)) != json.loads(
        orjson.dumps(direct_rows, default=str)
    ):
        raise SystemExit(f"{url}: {w.name} rows differ from the database's")


async def _direct_rows(dsn: str, w: Workload) -> list[list[Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [list(r) for r in await conn.fetch(w.sql, *concrete_params(w, 7))]
    finally:
        await conn.close()


# --- the NDJSON stream --------------------------------------------------------------------

@contextlib.contextmanager
def rss_peak(pid: int | None) -> Iterator[list[float]]:
    """Sample a process's RSS every 20 ms; yields [baseline MB, peak MB] filled on exit."""
    out = [0.0, 0.0]
    if pid is None:
        yield out
        return
    proc = psutil.Process(pid)
    baseline = proc.memory_info().rss
    peak = baseline
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.02):
            peak = max(peak, proc.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        peak = max(peak, proc.memory_info().rss)
        out[:] = [baseline / 1e6, peak / 1e6]


STREAM_SQL = "SELECT id, email, note FROM events"


async def _direct_stream(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        count = 0
        async with conn.transaction():
            async for _ in conn.cursor(STREAM_SQL, prefetch=500):
                count += 1
        return count
    finally:
        await conn.close()


def stream_direct(dsn: str) -> StreamRow:
    started = time.perf_counter()
    rows = asyncio.run(_direct_stream(dsn))
    return StreamRow("direct", rows, time.perf_counter() - started, None)


def stream_http(url: str, target: str, token: str, pid: int) -> StreamRow:
    headers = {"accept": "application/x-ndjson"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    with httpx.Client(base_url=url, timeout=600) as client:
        # Warm: the first statement of its kind on a pool connection.
        client.post("/v1/query", json={"sql": STREAM_SQL + " WHERE id < 1000"},
                    headers=headers).raise_for_status()
        count = 0
        last = b""
        with rss_peak(pid) as rss:
            started = time.perf_counter()
            with client.stream("POST", "/v1/query", json={"sql": STREAM_SQL},
                               headers=headers) as response:
                response.raise_for_status()
                for chunk in response.iter_bytes():
                    count += chunk.count(b"\n")
                    last = (last + chunk)[-200:]
            elapsed = time.perf_counter() - started
    tail = last.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    if b'"complete":true' not in tail:
        raise SystemExit(f"{target}: the stream did not complete: {tail!r}")
    return StreamRow(target, count - 2, elapsed, rss[1] - rss[0])


# --- the stack ----------------------------------------------------------------------------

async def _fill_events(dsn: str, rows: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "DROP TABLE IF EXISTS events; "
            "CREATE TABLE events (id integer PRIMARY KEY, email text NOT NULL, note text);"
            f"INSERT INTO events SELECT g, 'user' || g || '@example.com', 'note ' || (g % 97) "
            f"FROM generate_series(1, {int(rows)}) g; ANALYZE events"
        )
    finally:
        await conn.close()


async def _table_size(dsn: str, table: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await conn.close()


@dataclass
class Server:
    url: str
    pid: int
    stop: Any


def start_passthrough(dsn: str, work: Path, server: str = "uvicorn", workers: int = 1) -> Server:
    port = free_port()
    log = (work / "passthrough.log").open("wb")
    if server == "granian":
        argv = granian_command("bench.passthrough:app_from_env", str(port), workers)
    else:
        argv = [sys.executable, str(BENCH / "passthrough.py"), dsn, str(port), str(POOL_SIZE),
                str(workers)]
    process = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
        env={**os.environ, "BENCH_PASSTHROUGH_DSN": dsn, "BENCH_PASSTHROUGH_POOL": str(POOL_SIZE)},
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", timeout_s=60)
    return Server(url, process.pid, lambda: terminate(process, 10))


def start_querygate(dsn: str, opa_url: str, work: Path, source: Path = REPO_ROOT,
                    name: str = "gateway", server: str = "uvicorn", workers: int = 1,
                    extra: dict[str, str] | None = None) -> tuple[Server, dict[str, str]]:
    key = work / "dev-key.pem"
    settings = load_settings(dev_mode=True, environment="staging", dev_signing_key_file=key)
    tokens = {user: mint_dev_token(settings, user, list(groups), ttl_s=24 * 3600)
              for user, groups in (("alice", ("analysts",)), ("dana", ("dba",)))}
    settings = {
        "environment": "staging", "dev_mode": "true", "dev_signing_key_file": str(key),
        "database_url": dsn, "opa_url": opa_url, "log_level": "warning",
        "audit_spool_dir": str(work / f"audit-{name}"), "db_pool_min": str(POOL_SIZE),
        "db_pool_max": str(POOL_SIZE), "mask_hmac_key": "bench-" + "k" * 32,
    }
    # Only the settings the checkout knows: later commits refuse unknown QUERYGATE_* names.
    known = (source / "app" / "config.py").read_text()
    if "profile_pool_max" in known:
        # Each masking profile's pool (docs/masking.md) as large as the login pool.
        settings["profile_pool_max"] = str(POOL_SIZE)
    if "rate_limit_per_s" in known:
        # One identity drives every client, and the stream is a million rows: the limits per
        # caller (README) are off, so the run measures the gateway rather than its limits.
        settings |= {"rate_limit_per_s": "0", "max_concurrent_per_identity": "0",
                     "max_response_bytes": str(1 << 30)}
    if workers > 1:
        if "workers" not in known:
            raise SystemExit(f"{source} has no QUERYGATE_WORKERS: run it with --workers 1")
        # Also under granian: each worker then claims an audit spool of its own.
        settings["workers"] = str(workers)
    command = None
    if server == "granian":
        if "def serve_app" not in (source / "app" / "cli.py").read_text():
            raise SystemExit(f"{source} has no app.cli:serve_app for granian")
        def command(port: str) -> list[str]:
            return granian_command("app.cli:serve_app", port, workers)
    gateway = start_gateway(settings | (extra or {}), work / f"{name}.log", source=source,
                            command=command)
    return Server(gateway.url, gateway.process.pid, gateway.stop), tokens


def start_baseline(commit: str, pg: Any, work: Path, args: Any) -> Server:
    """Another commit's gateway (and its own rego/ in its own OPA), on the same database."""
    source = work / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", str(source), commit], cwd=REPO_ROOT,
                   check=True, capture_output=True)
    opa = start_opa([source / "rego"], bundle_dir=work / "baseline-opa")
    # Older commits ran statements as the login role, which here reads nothing itself: for
    # the benchmark only, it is given what the baseline needs on the tables.
    async def grant() -> None:
        conn = await asyncpg.connect(pg.admin_dsn.replace("/postgres?", "/appdb?"))
        try:
            await conn.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "
                               "public TO querygate")
        finally:
            await conn.close()

    asyncio.run(grant())
    server, _ = start_querygate(pg.app_dsn, opa.url, work, source=source, name="baseline",
                                server=args.server, workers=args.workers)

    def stop() -> None:
        server.stop()
        opa.stop()
        subprocess.run(["git", "worktree", "remove", "--force", str(source)], cwd=REPO_ROOT,
                       check=False, capture_output=True)

    return Server(server.url, server.pid, stop)


def compare(baseline: Server, current: Server, w: Workload, clients: int, args: Any,
            token: str) -> dict[str, Any]:
    """Median throughput of each over alternating runs: drift on a busy machine hits both."""
    for name, server in (("baseline", baseline), ("current", current)):
        probe = httpx.post(f"{server.url}/v1/query", timeout=30,
                           headers={"authorization": f"Bearer {token}"},
                           json={"sql": w.sql, "params": concrete_params(w, 7)})
        if probe.status_code != 200:
            raise SystemExit(f"{name} answered {probe.status_code}: {probe.text[:500]}")
    runs: dict[str, list[float]] = {"baseline": [], "current": []}
    for _ in range(args.baseline_rounds):
        for name, server in (("baseline", baseline), ("current", current)):
            if args.warmup > 0:
                run_wrk(server.url, w, clients, args.warmup, token)
            result = wrk_row(run_wrk(server.url, w, clients, args.duration, token), w, clients,
                             name)
            if result.errors:
                raise SystemExit(f"{name}: {result.errors} errors in the comparison run")
            runs[name].append(result.throughput)
    base, cur = statistics.median(runs["baseline"]), statistics.median(runs["current"])
    return {"clients": clients, "baseline": base, "current": cur, "ratio": cur / base,
            "runs": runs}


# --- the report ---------------------------------------------------------------------------

def comparison_table(args: Any, comparisons: list[dict[str, Any]]) -> str:
    return (
        f"\nBaseline {args.baseline} against this tree, masked point SELECT, "
        f"{args.baseline_rounds} alternating runs of {args.duration:.0f} s each "
        "(median req/s):\n\n| clients | baseline req/s | this tree req/s | ratio |\n"
        "|---:|---:|---:|---:|\n"
        + "".join(f"| {c['clients']} | {c['baseline']:,.0f} | {c['current']:,.0f} "
                  f"| {c['ratio']:.0%} |\n" for c in comparisons)
    )


def ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def report(rows: list[Row], streams: list[StreamRow], targets: list[tuple[str, str, str, bool]],
           machine: str) -> str:
    lines = [
        f"querygate benchmark — {machine}",
        "",
        "| workload | clients | path | req/s | p50 ms | p95 ms | p99 ms | errors "
        "| vs passthrough | +p50 ms | " + " | ".join(f"{s} µs" for s in STAGES) + " |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(STAGES),
    ]
    for r in rows:
        stages = [f"{r.stages_us[s]:.0f}" if r.stages_us else "" for s in STAGES]
        lines.append(
            f"| {r.workload} | {r.clients} | {r.target} | {r.throughput:,.0f} | {ms(r.p50_us)} "
            f"| {ms(r.p95_us)} | {ms(r.p99_us)} | {r.errors} "
            f"| {'' if r.ratio is None else f'{r.ratio:.0%}'} "
            f"| {'' if r.added_p50_us is None else ms(r.added_p50_us)} | "
            + " | ".join(stages) + " |"
        )
    for s in streams:
        rss = "" if s.rss_growth_mb is None else f"RSS +{s.rss_growth_mb:.1f} MB"
        lines.append(
            f"| ndjson {s.rows:,} rows | 1 | {s.target} | {s.rows_per_s:,.0f} rows/s "
            f"| {s.seconds:.2f} s | | | | {rss} | |" + " |" * len(STAGES)
        )
    lines += ["", "| target | goal | measured | |", "|---|---|---|---|"]
    for name, goal, measured, met in targets:
        lines.append(f"| {name} | {goal} | {measured} | {'met' if met else 'MISSED'} |")
    return "\n".join(lines) + "\n"


def machine_line() -> str:
    import platform

    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs ({cpu}), "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}")


def opa_round_trip(opa_url: str, n: int) -> float:
    """p50 ms of the gateway's own PolicyClient against the same OPA, idle."""
    from app.policy import PolicyClient
    from bench.opa_decision_bench import INPUT

    async def run() -> float:
        client = PolicyClient(opa_url, "querygate/decision", timeout_ms=2000)
        try:
            for _ in range(200):
                await client.decide(INPUT)
            samples = []
            for _ in range(n):
                started = time.perf_counter()
                await client.decide(INPUT)
                samples.append(time.perf_counter() - started)
            return statistics.median(samples) * 1000
        finally:
            await client.close()

    return asyncio.run(run())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="seconds of warm-up per run (0: none)")
    parser.add_argument("--clients", default="1,16", help="concurrency levels, comma-separated")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating passthrough/querygate runs per workload and level; "
                        "each is reported by its median-throughput run")
    parser.add_argument("--stream-rows", type=int, default=1_000_000)
    parser.add_argument("--opa-calls", type=int, default=2000,
                        help="decisions timed for the OPA round-trip target")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--baseline", default=None, metavar="COMMIT",
                        help="also run this commit's gateway, interleaved with this tree's, on "
                        "the masked point SELECT (same database, same machine, same run)")
    parser.add_argument("--baseline-rounds", type=int, default=3,
                        help="alternating runs of each gateway per concurrency level")
    parser.add_argument("--workloads", default=None, metavar="NAMES",
                        help="only these workloads (comma-separated, e.g. write): a quick "
                        "look at one lever, printed as the rows alone (no stream, no targets)")
    parser.add_argument("--compare-only", action="store_true",
                        help="with --baseline: only the interleaved comparison, no main table")
    parser.add_argument("--server", choices=("uvicorn", "granian"), default="uvicorn",
                        help="the HTTP server of both the passthrough and querygate")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes of both the passthrough and querygate "
                        "(querygate: QUERYGATE_WORKERS); with more than one the stage "
                        "columns stay empty, as each /metrics scrape reaches one worker")
    parser.add_argument("--server-cpus", choices=("last", "all"), default=None,
                        help="the servers' cores: the last one (default with one worker) or "
                        "all (default with more); this process and wrk keep the first")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    server_cpus = args.server_cpus or ("last" if args.workers == 1 else "all")
    levels = [int(c) for c in args.clients.split(",")]

    work = Path(tempfile.mkdtemp(prefix="qg-bench-"))
    pg = start_postgres(work / "pg", demo=True)
    # A bundle with a revision, as deployed (deploy/k8s/): decisions can be cached.
    opa = start_opa(bundle_dir=work / "opa")
    servers: list[Server] = []
    try:
        # The gateway's login role reads nothing itself (masking profiles do, docs/masking.md);
        # the direct path and the passthrough connect as the tables' owner, as an application.
        asyncio.run(_fill_events(pg.owner_dsn, args.stream_rows))
        customers = asyncio.run(_table_size(pg.owner_dsn, "customers"))
        orders = asyncio.run(_table_size(pg.owner_dsn, "orders"))
        placement = cpus()
        every_cpu = set(os.sched_getaffinity(0))
        if placement is not None:
            os.sched_setaffinity(0, placement[0])  # this process and wrk, after PG and OPA
        passthrough = start_passthrough(pg.owner_dsn, work, args.server, args.workers)
        servers.append(passthrough)
        querygate, tokens = start_querygate(pg.app_dsn, opa.url, work, server=args.server,
                                            workers=args.workers)
        servers.append(querygate)
        baseline = None
        if args.baseline:
            baseline = start_baseline(args.baseline, pg, work, args)
            servers.append(baseline)
        if placement is not None:
            server_set = placement[1] if server_cpus == "last" else every_cpu
            for server in servers:
                pin(server.pid, server_set)

        rows: list[Row] = []
        chosen = None if args.workloads is None else set(args.workloads.split(","))
        for w in [] if args.compare_only else workloads(customers, orders):
            if chosen is not None and w.name not in chosen:
                continue
            expected = asyncio.run(_direct_rows(pg.owner_dsn, w))
            check(passthrough.url, w, "", expected, masked=False)
            check(querygate.url, w, tokens[w.user], expected, masked=True)
            for clients in levels:
                print(f"... {w.name} at {clients} client(s)", file=sys.stderr, flush=True)
                rows.append(run_direct(pg.owner_dsn, w, clients, args.duration, args.warmup))
                # The two alternate, --rounds times, and each is reported by its run of
                # median throughput: drift on a shared machine (the passthrough alone has
                # moved by a third between runs) then hits both alike.
                runs: dict[str, list[Row]] = {"passthrough": [], "querygate": []}
                for _ in range(args.rounds):
                    for target, server, token in (("passthrough", passthrough, ""),
                                                  ("querygate", querygate, tokens[w.user])):
                        if args.warmup > 0:
                            run_wrk(server.url, w, clients, args.warmup, token)
                        before = stage_totals(querygate.url)
                        row = wrk_row(run_wrk(server.url, w, clients, args.duration, token),
                                      w, clients, target)
                        if target == "querygate" and args.workers == 1:
                            row.stages_us = stage_means(before, stage_totals(querygate.url),
                                                        row.requests)
                        runs[target].append(row)
                by_target = {
                    target: sorted(each, key=lambda r: r.throughput)[len(each) // 2]
                    for target, each in runs.items()
                }
                rows.extend(by_target.values())
                base, governed = by_target["passthrough"], by_target["querygate"]
                governed.ratio = governed.throughput / base.throughput if base.throughput else 0
                governed.added_p50_us = governed.p50_us - base.p50_us

        comparisons = []
        if baseline is not None:
            point_w = workloads(customers, orders)[0]
            for clients in levels:
                print(f"... baseline {args.baseline} vs this tree, point at {clients}",
                      file=sys.stderr, flush=True)
                comparisons.append(compare(baseline, querygate, point_w, clients, args,
                                           tokens["alice"]))
        if args.compare_only:
            print(comparison_table(args, comparisons))
            return 0
        setup = (f"{args.server}, {args.workers} worker(s) each, servers on "
                 f"{'the last core' if server_cpus == 'last' else 'every core'}")
        if chosen is not None:
            print(f"# {setup}")
            for r in rows:
                extra = "" if r.ratio is None else (
                    f"  {r.ratio:.0%} of the passthrough, +p50 {ms(r.added_p50_us)} ms")
                print(f"{r.workload:9} @{r.clients:<3} {r.target:12} {r.throughput:9,.0f} req/s "
                      f"p50 {ms(r.p50_us)} ms{extra}")
            return 0

        print("... NDJSON stream", file=sys.stderr, flush=True)
        streams = [
            stream_direct(pg.owner_dsn),
            stream_http(passthrough.url, "passthrough", "", passthrough.pid),
            stream_http(querygate.url, "querygate", tokens["alice"], querygate.pid),
        ]
        for server in servers:
            server.stop()
        servers.clear()

        from bench.facts_bench import SIMPLE, measure

        _, cached_us = measure(SIMPLE, 50)
        opa_p50_ms = opa_round_trip(opa.url, args.opa_calls)
        by = {(r.workload, r.target, r.clients): r for r in rows}
        top, low = max(levels), min(levels)
        stream = streams[-1]
        # Issue #16's acceptance: throughput at the top concurrency, latency at one client.
        targets = [
            (f"{w} @{top}: throughput vs passthrough", "≥ 60%",
             f"{by[(w, 'querygate', top)].ratio:.0%}",
             (by[(w, "querygate", top)].ratio or 0) >= 0.6)
            for w in ("point", "join_agg", "write")
        ]
        qg, pt = by[("point", "querygate", low)], by[("point", "passthrough", low)]
        targets += [
            (f"point SELECT @{low}: added p50", "≤ 1 ms", f"{ms(qg.p50_us - pt.p50_us)} ms",
             qg.p50_us - pt.p50_us <= 1000),
            ("facts, cached (p50)", "≤ 50 µs", f"{cached_us:.1f} µs", cached_us <= 50),
            ("OPA decision round trip (p50, idle)", "≤ 0.5 ms", f"{opa_p50_ms:.3f} ms",
             opa_p50_ms <= 0.5),
            (f"NDJSON {stream.rows:,} masked rows", "≥ 150,000 rows/s",
             f"{stream.rows_per_s:,.0f} rows/s", stream.rows_per_s >= 150_000),
            ("NDJSON resident memory growth", "< 100 MB", f"{stream.rss_growth_mb:.1f} MB",
             (stream.rss_growth_mb or 0) < 100),
        ]
        text = report(rows, streams, targets, f"{machine_line()}; {setup}")
        if comparisons:
            text += comparison_table(args, comparisons)
        print(text)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.md").write_text(text)
        (args.out / "report.json").write_bytes(orjson.dumps(
            {"machine": machine_line(), "duration_s": args.duration,
             "rows": [{**asdict(r), "throughput": r.throughput} for r in rows],
             "streams": [{**asdict(s), "rows_per_s": s.rows_per_s} for s in streams],
             "targets": [{"name": n, "goal": g, "measured": m, "met": ok}
                         for n, g, m, ok in targets],
             "baseline": {"commit": args.baseline, "comparisons": comparisons}},
            option=orjson.OPT_INDENT_2,
        ))
        return 0
    finally:
        for server in servers:
            server.stop()
        opa.stop()
        pg.stop()
        # The servers' logs outlive the run, for a failed check or an error count.
        args.out.mkdir(parents=True, exist_ok=True)
        for log_file in work.glob("*.log"):
            shutil.copy(log_file, args.out / log_file.name)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    raise SystemExit(main())
