"""``make bench`` (wire protocol part): pgbench's point SELECT three ways, in one run.

(a) direct     pgbench to PostgreSQL (pgserver, its unix socket), as the gateway's login role;
(b) pgbouncer  pgbench to Debian's PgBouncer (transaction pooling) in front of the same server;
(c) querygate  pgbench to ``querygate serve``'s wire endpoint as alice, token as password:
               auth, facts, OPA (cached decisions), the masking profile, audit to the spool.

The script is a point SELECT by key with a masked column (``SELECT id, email FROM customers
WHERE id = :id``). Modes: ``-M simple`` and ``-M extended`` for all three, ``-M prepared``
for (a) and (c): bookworm's PgBouncer 1.18 cannot keep prepared statements in transaction
mode, so querygate is compared with it in ``extended``. The figure of issue 17 is
querygate/PgBouncer tps (target ≥ 0.25).

CPU placement as in bench/load_bench.py: the proxy under test (PgBouncer or the gateway) on
the last core, pgbench on the first; PostgreSQL and OPA float.

    .venv/bin/python -m bench.pgwire_bench [--clients 8] [--duration 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from app.devstack import free_port, start_opa, start_postgres, terminate
from bench.load_bench import BENCH, cpus, machine_line, pin, start_querygate

SCRIPT = "\\set id random(1, 1000)\nSELECT id, email FROM customers WHERE id = :id;\n"
TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)
LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)
FAILED = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)


@dataclass
class Row:
    target: str
    mode: str
    clients: int
    tps: float
    latency_ms: float
    failed: int


def pgbench(args: Sequence[str], env: dict[str, str], cpu: set[int] | None) -> tuple[float, float, int]:
    command = ["pgbench", "-n", *args]
    if cpu is not None and shutil.which("taskset"):
        command = ["taskset", "-c", ",".join(map(str, sorted(cpu))), *command]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    tps, latency, failed = TPS.search(done.stdout), LATENCY.search(done.stdout), FAILED.search(done.stdout)
    if done.returncode != 0 or tps is None or latency is None:
        raise RuntimeError(f"pgbench failed ({done.returncode}): {done.stderr[-2000:]}{done.stdout[-1000:]}")
    return float(tps.group(1)), float(latency.group(1)), int(failed.group(1)) if failed else 0


def start_pgbouncer(socket_dir: str, work: Path, user: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o777)
    (work / "users.txt").write_text('"querygate" ""\n')
    (work / "pgbouncer.ini").write_text(
        "[databases]\n"
        # As the tables' owner, as the direct run (the login role only may SET ROLE to it).
        f"appdb = host={socket_dir} dbname=appdb user=querygate "
        "connect_query='SET ROLE querygate_owner'\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {work / 'users.txt'}\n"
        "pool_mode = transaction\nmax_client_conn = 200\ndefault_pool_size = 16\n"
        f"logfile = {work / 'pgbouncer.log'}\npidfile = {work / 'pgbouncer.pid'}\n"
        "ignore_startup_parameters = extra_float_digits\n"
    )
    for name in ("users.txt", "pgbouncer.ini"):
        (work / name).chmod(0o644)
    # PgBouncer will not run as root: as PostgreSQL's own system user, then.
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    process = subprocess.Popen([binary, str(work / "pgbouncer.ini")],
                               user=user if os.geteuid() == 0 else None,
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        probe = subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", str(port)],
                               capture_output=True)
        if probe.returncode == 0:
            return process, port
        time.sleep(0.2)
    terminate(process, 5)
    raise RuntimeError("pgbouncer did not start: " + (work / "pgbouncer.log").read_text()[-2000:])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=int, default=10, help="seconds per pgbench run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the median is reported")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="qg-pgwire-bench-"))
    placement = cpus()
    client_cpu, server_cpu = placement if placement else (None, None)
    pg = start_postgres(work / "pg")
    opa = start_opa(bundle_dir=work / "opa")
    socket_dir = pg.app_dsn.split("host=", 1)[1].split("&", 1)[0]
    bouncer = gateway = None
    try:
        bouncer, bouncer_port = start_pgbouncer(socket_dir, work / "pgbouncer",
                                                pg.server.system_user)
        pg_port = free_port()
        gateway, tokens = start_querygate(pg.app_dsn, opa.url, work, extra={
            "pg_port": str(pg_port), "pg_max_connections_per_identity": "200",
        })
        if server_cpu is not None:
            pin(bouncer.pid, server_cpu)
            pin(gateway.pid, server_cpu)
        script = work / "point.sql"
        script.write_text(SCRIPT)
        base = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        targets: dict[str, tuple[list[str], dict[str, str]]] = {
            "direct": (["-h", socket_dir, "-U", "querygate", "appdb"],
                       {**base, "PGOPTIONS": "-c role=querygate_owner"}),
            "pgbouncer": (["-h", "127.0.0.1", "-p", str(bouncer_port), "-U", "querygate", "appdb"],
                          base),
            "querygate": (["-h", "127.0.0.1", "-p", str(pg_port), "-U", "alice", "appdb"],
                          {**base, "PGPASSWORD": tokens["alice"], "PGSSLMODE": "disable"}),
        }
        plan = [(t, mode) for mode in ("simple", "extended", "prepared") for t in targets
                if not (t == "pgbouncer" and mode == "prepared")]
        samples: dict[tuple[str, str], list[tuple[float, float, int]]] = {k: [] for k in plan}
        for _ in range(args.rounds):
            for target, mode in plan:
                conn, env = targets[target]
                samples[(target, mode)].append(pgbench(
                    ["-M", mode, "-c", str(args.clients), "-j", "1", "-T", str(args.duration),
                     "-f", str(script), *conn], env, client_cpu))
        rows = [Row(t, m, args.clients, statistics.median(s[0] for s in got),
                    statistics.median(s[1] for s in got), sum(s[2] for s in got))
                for (t, m), got in samples.items()]
    finally:
        if gateway is not None:
            gateway.stop()
        if bouncer is not None:
            terminate(bouncer, 5)
        opa.stop()
        pg.stop()
    by = {(r.target, r.mode): r for r in rows}
    lines = [f"Wire protocol, pgbench point SELECT, {args.clients} clients, {args.duration} s x "
             f"{args.rounds} rounds (median); {machine_line()}", "",
             "| mode | direct tps | pgbouncer tps | querygate tps | querygate latency ms | "
             "querygate/pgbouncer | querygate/direct | failed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in ("simple", "extended", "prepared"):
        direct, bouncer_row, gate = (by.get((t, mode)) for t in ("direct", "pgbouncer", "querygate"))
        assert direct is not None and gate is not None
        ratio = f"{gate.tps / bouncer_row.tps:.2f}" if bouncer_row else "—"
        lines.append(
            f"| {mode} | {direct.tps:,.0f} | {f'{bouncer_row.tps:,.0f}' if bouncer_row else '—'} | "
            f"{gate.tps:,.0f} | {gate.latency_ms:.2f} | {ratio} | {gate.tps / direct.tps:.2f} | "
            f"{sum(r.failed for r in rows if r.mode == mode)} |")
    extended = by[("querygate", "extended")].tps / by[("pgbouncer", "extended")].tps
    lines += ["", f"Target (issue 17): querygate/PgBouncer in extended mode ≥ 0.25: "
              f"{extended:.2f} {'met' if extended >= 0.25 else 'MISSED'}"]
    report = "\n".join(lines) + "\n"
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pgwire.md").write_text(report)
    (args.out / "pgwire.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0 if all(r.failed == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())


