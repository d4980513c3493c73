"""The ``querygate`` command: serve, dev (the whole local stack), token, explain, mcp (the stdio
bridge for desktop agents), console (the audit console), …"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from app.config import ConfigError, Settings, load_settings

log = logging.getLogger("querygate")


def _configure_logging(level: str) -> None:
    from app.metrics import JsonFormatter

    # One JSON object per line on stderr, with the request id of the request being served.
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # Per-request client chatter and pgserver's start-up transcript drown the useful lines;
    # aiokafka retries on its own and the audit shipper reports what matters.
    for noisy in ("httpx", "httpcore", "pgserver", "aiokafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# The collector's thresholds for a serving process: (allocations before a young
# collection, young collections per middle one, middle ones per full one). Python's
# defaults (700, 10, 10) made `make bench`'s point SELECT at 16 clients spend about 8% of
# the gateway's time collecting, with full collections of ~100 ms walking every imported
# module; frozen and with these, 12% more requests a second (docs/benchmarks.md).
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Freeze what start-up allocated (modules, settings, the app) out of the collector's
    sight, and collect less often: a request makes few long-lived cycles, and each
    collection walked the whole heap of imports to find none."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def serve_app() -> Any:
    """The application of `querygate serve`, built from the QUERYGATE_* variables.

    For a server that starts its own processes and imports the application by name:
    uvicorn's workers (``QUERYGATE_WORKERS``), or granian in the benchmark
    (``granian --interface asgi --factory app.cli:serve_app``).
    """
    from app.http import create_app

    settings = load_settings()
    _configure_logging(settings.log_level)
    app = create_app(settings)
    tune_gc()
    return app


def _serve(settings: Settings, workers: int = 1) -> None:
    import uvicorn

    from app.http import create_app

    if workers > 1:
        # Each worker process imports the app and runs its own lifespan: pools, OPA client,
        # caches, limits, and an audit spool and chain of its own (app/audit.py claim_spool).
        settings.require_serving()  # a misconfiguration stops here, not in every worker
        app: Any = "app.cli:serve_app"
    else:
        app = create_app(settings)
        tune_gc()
    uvicorn.run(
        app,
        factory=workers > 1,
        workers=workers if workers > 1 else None,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # uvicorn's own lines go through the root JSON handler (_configure_logging).
        log_config=None,
        access_log=False,
        loop="uvloop",
        http="httptools",
        # Behind a mesh or ingress the proxy's own headers are handled by identity, not here.
        proxy_headers=False,
        server_header=False,
        # SIGTERM/Ctrl-C: in-flight requests get this long, then are cancelled; the lifespan
        # then closes the pools within a bound too (Gateway.close), whatever is still stuck.
        timeout_graceful_shutdown=(settings.shutdown_timeout_ms + 999) // 1000,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    settings = load_settings()
    _configure_logging(settings.log_level)
    _serve(settings, settings.workers)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from app.identity import mint_dev_token

    settings = load_settings()
    groups = [g for part in args.groups for g in part.split(",") if g]
    print(mint_dev_token(settings, args.sub, groups, ttl_s=args.ttl, email=args.email))  # noqa: T201
    return 0


def _audit_destination(settings: Settings) -> str:
    if settings.audit_sink == "kafka":
        return f"Kafka {settings.audit_kafka_bootstrap} topic {settings.audit_kafka_topic}"
    if settings.audit_sink == "stdout":
        return "stdout"
    spool = settings.audit_spool_dir
    return str(settings.audit_file or (spool / "audit.jsonl" if spool else "a temporary file"))


def cmd_dev(args: argparse.Namespace) -> int:
    """Start embedded PostgreSQL with demo data, OPA with rego/, and the gateway; Ctrl-C stops all."""
    from app.demo import DEMO_IDENTITIES
    from app.devstack import OWNER_ROLE, start_opa, start_postgres, terminate
    from app.identity import mint_dev_token

    # uvicorn re-raises SIGTERM after its shutdown; turning it into KeyboardInterrupt lets the
    # finally below stop OPA and PostgreSQL instead of the process dying first.
    signal.signal(signal.SIGTERM, _interrupt)
    # make run is staging unless told otherwise; dev mode only ever outside prod.
    os.environ.setdefault("QUERYGATE_ENVIRONMENT", "staging")
    # The demo's security officer administers the gateway (catalog refresh).
    os.environ.setdefault("QUERYGATE_ADMIN_GROUPS", "security")
    data_dir = Path(args.data_dir).resolve()
    # The audit trail of make run: spooled and shipped to <data dir>/audit/audit.jsonl
    # (`querygate audit verify .querygate/audit/audit.jsonl` checks it). No Kafka needed.
    os.environ.setdefault("QUERYGATE_AUDIT_SPOOL_DIR", str(data_dir / "audit"))
    # The PostgreSQL wire protocol (docs/pgwire.md) beside HTTP; cleartext on loopback in
    # dev mode only.
    os.environ.setdefault("QUERYGATE_PG_PORT", "5433")
    # A stable hash-masking key for the demo, so hashes survive a restart of make run.
    mask_key_file = data_dir / "dev" / "mask-key"
    if not mask_key_file.exists():
        mask_key_file.parent.mkdir(parents=True, exist_ok=True)
        mask_key_file.touch(mode=0o600)
        mask_key_file.write_text(secrets.token_hex(32))
    os.environ.setdefault("QUERYGATE_MASK_HMAC_KEY", mask_key_file.read_text().strip())
    # The console (docs/console.md) beside the gateway; approval notifications link to it.
    os.environ.setdefault("QUERYGATE_CONSOLE_PUBLIC_URL", "http://127.0.0.1:"
                          + os.environ.get("QUERYGATE_CONSOLE_PORT", "8081"))
    probe = load_settings(dev_mode=True, dev_signing_key_file=data_dir / "dev" / "signing-key.pem")
    _configure_logging(probe.log_level)
    print(f"querygate dev: starting PostgreSQL in {data_dir / 'pg'} …", flush=True)  # noqa: T201
    postgres = start_postgres(data_dir / "pg")
    opa = None
    console: subprocess.Popen[bytes] | None = None
    try:
        print("querygate dev: starting OPA with rego/ …", flush=True)  # noqa: T201
        # As a bundle with a revision, as in a deployment: decisions can then be cached.
        opa = start_opa(opa_bin=args.opa_bin, bundle_dir=data_dir / "opa")
        settings = load_settings(
            dev_mode=True,
            dev_signing_key_file=data_dir / "dev" / "signing-key.pem",
            database_url=postgres.app_dsn,
            opa_url=opa.url,
            ddl_role=OWNER_ROLE,
        )
        console = _start_dev_console(data_dir, postgres.admin_dsn, opa.url, settings)
        tokens = {
            sub: mint_dev_token(settings, sub, groups, email=f"{sub}@example.com")
            for sub, groups in DEMO_IDENTITIES.items()
        }
        token_file = data_dir / "dev" / "tokens.json"
        token_file.write_text(json.dumps(tokens, indent=2))
        token_file.chmod(0o600)
        base = f"http://{settings.host}:{settings.port}"
        print(  # noqa: T201
            f"\nquerygate is starting on {base} (environment {settings.environment}, dev mode)\n"
            f"OPA: {opa.url}   PostgreSQL: {postgres.app_dsn}\n"
            f"Audit trail: {_audit_destination(settings)}   metrics: {base}/metrics\n"
            f"Console: {settings.console_public_url} (sign in as a demo identity; docs/console.md)\n"
            f"Demo tokens (also in {token_file}):\n"
            + "".join(
                f"  {sub:<6} {','.join(DEMO_IDENTITIES[sub]):<22} {tok[:24]}…\n"
                for sub, tok in tokens.items()
            )
            + "\nTry:\n"
            f"  TOKEN=$(python3 -c 'import json;print(json.load(open(\"{token_file}\"))[\"alice\"])')\n"
            f"  curl -s {base}/v1/query -H \"Authorization: Bearer $TOKEN\" "
            "-H 'content-type: application/json' "
            "-d '{\"sql\": \"SELECT id, country FROM customers WHERE id < $1\", \"params\": [5]}'\n"
            + (f"  psql \"host={settings.pg_host} port={settings.pg_port} dbname="
               f"{settings.database_name} user=alice password=$TOKEN sslmode=disable\"\n"
               if settings.pg_port is not None else "")
            + f"  AI agents (docs/agents.md): MCP at {base}/mcp with that bearer token, or over stdio:\n"
            f"  querygate mcp --url {base} --token-file <a file holding $TOKEN>\n"
            + "Then try (docs/approvals.md, docs/masking.md):\n"
            "  as alice: SELECT email, ssn, card_number FROM customers LIMIT 3   -> masked\n"
            "  as alice: SELECT id FROM customers WHERE ssn LIKE '1%'            -> compares masked values\n"
            "  as alice: DROP TABLE orders                                       -> destructive_ddl\n"
            "  as dana:  DELETE FROM orders WHERE 1 = 1                          -> unbounded_write\n"
            "  as dana:  UPDATE orders SET status = 'x' WHERE id < 2000         -> blast_radius_exceeded\n"
            "  as dana:  UPDATE customers SET country = 'DE' WHERE id = 1        -> 202, approve as sec\n"
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        if settings.workers > 1:
            # The workers would build their settings from the variables alone, without the
            # local stack's DSN and OPA given above.
            log.warning("querygate dev serves with one worker; QUERYGATE_WORKERS is for serve")
        _serve(settings)
    finally:
        if console is not None:
            terminate(console, 10)
        if opa is not None:
            opa.stop()
        postgres.stop()
        print("querygate dev: stopped", flush=True)  # noqa: T201
    return 0


def _start_dev_console(data_dir: Path, admin_dsn: str, opa_url: str,
                       settings: Settings) -> subprocess.Popen[bytes]:
    """`querygate console` for `querygate dev`: its index in the embedded PostgreSQL (a
    database only its own role may open), the gateway's audit file as its source, and the
    dev OIDC provider beside it (QUERYGATE_CONSOLE_DEV_IDP_PORT, default 8082)."""
    from app.devstack import prepare_console_database

    index_dsn = prepare_console_database(admin_dsn)
    idp_port = os.environ.get("QUERYGATE_CONSOLE_DEV_IDP_PORT", "8082")
    env = dict(os.environ)
    env.update({
        "QUERYGATE_DEV_MODE": "true",
        "QUERYGATE_DEV_SIGNING_KEY_FILE": str(settings.dev_signing_key_file),
        "QUERYGATE_OPA_URL": opa_url,
        "QUERYGATE_CONSOLE_DATABASE_URL": index_dsn,
        "QUERYGATE_CONSOLE_AUDIT_FILE": _audit_destination(settings),
        "QUERYGATE_CONSOLE_GATEWAY_URL": f"http://{settings.host}:{settings.port}",
        "QUERYGATE_CONSOLE_DEV_IDP_PORT": idp_port,
        "QUERYGATE_CONSOLE_OIDC_ISSUER": f"http://127.0.0.1:{idp_port}",
        "QUERYGATE_CONSOLE_OIDC_CLIENT_ID": "querygate-console",
        "QUERYGATE_CONSOLE_OIDC_CLIENT_SECRET": secrets.token_urlsafe(24),
    })
    env.pop("QUERYGATE_DATABASE_URL", None)  # the console never reads the application's data
    log_path = data_dir / "console.log"
    print(f"querygate dev: starting the console (log {log_path}) …", flush=True)  # noqa: T201
    with log_path.open("ab") as log_file:
        return subprocess.Popen(  # our own interpreter and module
            [sys.executable, "-m", "app.cli", "console"], env=env,
            stdout=log_file, stderr=subprocess.STDOUT,
        )


def _token(args: argparse.Namespace) -> str | None:
    """--token, else the dev token of --as from `make run`'s token file."""
    if args.token is not None:
        return str(args.token)
    token_file = Path(args.data_dir) / "dev" / "tokens.json"
    try:
        return str(json.loads(token_file.read_text())[args.as_])
    except (OSError, KeyError, ValueError):
        print(f"no dev token for {args.as_!r} in {token_file}; pass --token", file=sys.stderr)  # noqa: T201
        return None


def cmd_catalog(args: argparse.Namespace) -> int:
    """List every visible column with its class and where the class came from."""
    token = _token(args)
    if token is None:
        return 2
    response = httpx.get(
        f"{args.url}/v1/admin/catalog", headers={"authorization": f"Bearer {token}"}, timeout=10
    )
    body = response.json()
    if response.status_code != 200:
        print(json.dumps(body, indent=2), file=sys.stderr)  # noqa: T201
        return 1
    rows = [(c["column"], c["type"], c["class"] or "-", c["class_source"] or "-")
            for c in body["columns"]]
    widths = [max(len(r[i]) for r in [("column", "type", "class", "from"), *rows]) for i in range(4)]
    for row in [("column", "type", "class", "from"), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())  # noqa: T201
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """Ask a running gateway what it sees and decides for a statement."""
    if args.policy_dir is not None:
        return _explain_policy_dir(args)
    token = _token(args)
    if token is None:
        return 2
    response = httpx.post(
        f"{args.url}/v1/explain",
        json={"sql": args.sql, "params": args.params},
        headers={"authorization": f"Bearer {token}"},
        timeout=10,
    )
    print(json.dumps(response.json(), indent=2))  # noqa: T201
    return 0 if response.status_code == 200 else 1


def _explain_policy_dir(args: argparse.Namespace) -> int:
    """What the policy in --policy-dir decides, with no gateway and no OPA server.

    The facts come from the gateway's own extractor against a real catalog: the database of
    QUERYGATE_DATABASE_URL when set, else the demo schema in a throwaway embedded PostgreSQL.
    The input is the gateway's (app.policy.decision_input); `opa eval` decides; the gateway's
    validator judges the answer, so a malformed decision shows as it would in production.
    """
    import asyncio
    import subprocess
    import tempfile
    import uuid

    import asyncpg

    from app.catalog import introspect
    from app.demo import DEMO_IDENTITIES
    from app.devstack import find_opa, start_postgres
    from app.errors import GatewayError
    from app.facts import FactsExtractor
    from app.identity import Identity
    from app.masking import check_predicates
    from app.policy import decision_input, parse_decision

    policy_dir = Path(args.policy_dir)
    if not policy_dir.is_dir():
        print(f"querygate: --policy-dir {policy_dir} is not a directory", file=sys.stderr)  # noqa: T201
        return 2
    groups = [g for part in args.groups for g in part.split(",") if g]
    if not groups:
        if args.as_ not in DEMO_IDENTITIES:
            print(f"querygate: {args.as_!r} is not a demo identity; pass --groups", file=sys.stderr)  # noqa: T201
            return 2
        groups = DEMO_IDENTITIES[args.as_]
    overrides: dict[str, Any] = {}
    if args.environment is not None:
        overrides["environment"] = args.environment
    settings = load_settings(**overrides)

    async def read_catalog(dsn: str) -> Any:
        conn = await asyncpg.connect(dsn)
        try:
            return await introspect(conn, tuple(settings.schemas), None)
        finally:
            await conn.close()

    if settings.database_url is not None:
        catalog_source = "database (QUERYGATE_DATABASE_URL)"
        catalog = asyncio.run(read_catalog(settings.database_url.get_secret_value()))
    else:
        catalog_source = "demo schema (throwaway embedded PostgreSQL)"
        with tempfile.TemporaryDirectory(prefix="querygate-explain-") as tmp:
            postgres = start_postgres(Path(tmp) / "pg")
            try:
                catalog = asyncio.run(read_catalog(postgres.app_dsn))
            finally:
                postgres.stop()

    identity = Identity(sub=args.as_, groups=tuple(groups), issuer="querygate-explain")
    report: dict[str, Any] = {
        "policy_dir": str(policy_dir),
        "catalog": catalog_source,
        "identity": identity.to_input(),
        "environment": settings.environment,
    }
    try:
        facts = FactsExtractor(settings.max_sql_bytes).extract(args.sql, catalog)
    except GatewayError as exc:
        # Refused before policy is asked, exactly as the gateway would.
        report["refused_by_gateway"] = exc.body()["error"]
        print(json.dumps(report, indent=2))  # noqa: T201
        return 1
    input_ = decision_input(
        identity, facts, catalog, environment=settings.environment,
        database=settings.database_name, request_id=f"explain-{uuid.uuid4().hex[:12]}",
        source_ip=None,
    )
    query = "data." + settings.opa_decision_path.strip("/").replace("/", ".")
    result = subprocess.run(  # noqa: S603
        [find_opa(args.opa_bin), "eval", "--format", "json", "--stdin-input",
         "--data", str(policy_dir), query],
        input=json.dumps(input_), capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        print(f"querygate: opa eval failed:\n{result.stderr}{result.stdout}", file=sys.stderr)  # noqa: T201
        return 1
    expressions = json.loads(result.stdout).get("result") or [{"expressions": [{}]}]
    raw = expressions[0]["expressions"][0].get("value")
    report["facts"] = input_["query"]
    report["decision"] = raw
    try:
        decision = parse_decision(raw, "explain")
        if decision.allow:
            check_predicates(facts, decision)
    except GatewayError as exc:
        # A malformed decision (503) or a masked column used as a predicate (403).
        report["gateway_would"] = {"status": exc.status, **exc.body()["error"]}
        print(json.dumps(report, indent=2))  # noqa: T201
        return 0 if exc.status == 403 else 1
    if not decision.allow:
        verdict: dict[str, Any] = {"status": 403, "outcome": "deny"}
    elif decision.require_approval is not None:
        verdict = {"status": 202, "outcome": "approval_required"}
    else:
        verdict = {"status": 200, "outcome": "allow", "masks": decision.masks}
    report["gateway_would"] = {**verdict, "reasons": decision.reasons_json()}
    print(json.dumps(report, indent=2))  # noqa: T201
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="querygate", description=__doc__)
    parser.add_argument("--version", action="version", version=f"querygate {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("serve", help="run the gateway (settings from QUERYGATE_* variables)")

    dev = sub.add_parser("dev", help="run PostgreSQL + OPA + gateway locally with demo data")
    dev.add_argument("--data-dir", default=".querygate", help="where local state lives")
    dev.add_argument("--opa-bin", default=None, help="path to the opa binary")

    token = sub.add_parser("token", help="mint a dev token (dev mode only, never prod)")
    token.add_argument("--sub", required=True)
    token.add_argument("--groups", action="append", default=[], help="comma-separated groups")
    token.add_argument("--email", default=None)
    token.add_argument("--ttl", type=int, default=8 * 3600, help="lifetime in seconds")

    explain = sub.add_parser("explain", help="show the facts and decision for a statement")
    explain.add_argument("--sql", required=True)
    explain.add_argument("--params", default=[], type=_json_list,
                         help="JSON list of parameters")
    explain.add_argument("--as", dest="as_", default="alice", help="demo identity")
    explain.add_argument("--token", default=None, help="a bearer token instead of --as")
    explain.add_argument("--url", default="http://127.0.0.1:8080")
    explain.add_argument("--data-dir", default=".querygate")
    explain.add_argument(
        "--policy-dir", default=None,
        help="decide locally with the Rego in this directory (no gateway; docs/policies.md)",
    )
    explain.add_argument(
        "--groups", action="append", default=[],
        help="with --policy-dir: the caller's groups (comma-separated) instead of --as's",
    )
    explain.add_argument(
        "--environment", choices=["dev", "staging", "prod"], default=None,
        help="with --policy-dir: the environment policy sees (default QUERYGATE_ENVIRONMENT)",
    )
    explain.add_argument("--opa-bin", default=None, help="with --policy-dir: the opa binary")

    catalog = sub.add_parser("catalog", help="list columns with their class and its origin")
    catalog.add_argument("--as", dest="as_", default="sec", help="demo identity (an admin)")
    catalog.add_argument("--token", default=None, help="a bearer token instead of --as")
    catalog.add_argument("--url", default="http://127.0.0.1:8080")
    catalog.add_argument("--data-dir", default=".querygate")

    audit = sub.add_parser("audit", help="check the audit trail (docs/audit.md)")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser(
        "verify", help="report gaps, reordering and edits in a copy of the audit trail"
    )
    verify.add_argument("file", nargs="?", default=None, help="a JSONL copy of the trail")
    verify.add_argument("--kafka", metavar="BOOTSTRAP", default=None,
                        help="read the topic from these brokers (host:port,…) instead of a file, "
                        "with the sink's QUERYGATE_AUDIT_KAFKA_* TLS and SASL settings")
    verify.add_argument("--topic", default=None,
                        help="the topic (default QUERYGATE_AUDIT_KAFKA_TOPIC or querygate.audit)")
    verify.add_argument("--timeout", type=float, default=60.0, help="seconds to read the topic")
    verify.add_argument("--allow-partial-start", action="store_true",
                        help="a chain may start after seq 1 (an older part was deleted on purpose)")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")

    bridge = sub.add_parser("mcp", help="a stdio MCP server for desktop agents, forwarding to a "
                            "gateway's /mcp (docs/agents.md)")
    bridge.add_argument("--url", default=None, help="the gateway, e.g. https://querygate.example "
                        "(QUERYGATE_URL)")
    bridge.add_argument("--token-file", default=None, help="the bearer token, re-read when the "
                        "file changes (QUERYGATE_TOKEN_FILE)")
    bridge.add_argument("--on-behalf-of-token-file", default=None,
                        help="a token of the person the agent acts for (X-Querygate-On-Behalf-Of)")
    bridge.add_argument("--timeout", type=float, default=120.0, help="seconds per tool call")
    bridge.add_argument("--log-level", default="warning", help="logs go to stderr")
    console = sub.add_parser(
        "console", help="the audit console and its index (docs/console.md; QUERYGATE_CONSOLE_*)"
    )
    console_sub = console.add_subparsers(dest="console_command")
    console_sub.add_parser("serve", help="serve the console and fill the index (the default)")
    ingest = console_sub.add_parser("ingest", help="fill the audit index only")
    ingest.add_argument("--once", action="store_true",
                        help="stop when the stream is indexed to its current end")

    db = sub.add_parser("db", help="prepare the database for the masking it enforces (docs/masking.md)")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    init = db_sub.add_parser(
        "init", help="once, as a DBA: roles, masking functions and grants (idempotent)"
    )
    init.add_argument("--dsn", default=os.environ.get("QUERYGATE_DB_ADMIN_URL"),
                      help="a DBA's DSN for the application database (or QUERYGATE_DB_ADMIN_URL)")
    init.add_argument("--login-role", default=None,
                      help="the gateway's login role (default: the user of QUERYGATE_DATABASE_URL)")
    init.add_argument("--schemas", default=None,
                      help="exposed schemas, comma-separated (default: QUERYGATE_SCHEMAS or public)")
    init.add_argument("--db-role", action="append", default=[],
                      help="a role policy may name as db_role (repeatable)")
    sync = db_sub.add_parser(
        "sync", help="re-create the masking views from the catalog, or drop them for a migration"
    )
    sync.add_argument("--dsn", default=None,
                      help="the gateway's DSN (default: QUERYGATE_DATABASE_URL)")
    sync.add_argument("--schemas", default=None, help="as for init")
    sync.add_argument("--drop-views", action="store_true",
                      help="drop every profile's views (before DROP COLUMN or ALTER COLUMN TYPE)")
    return parser


def cmd_db(args: argparse.Namespace) -> int:
    """`db init` (as a DBA) and `db sync` (as the gateway's login role)."""
    import asyncio
    from urllib.parse import urlsplit

    import asyncpg

    from app import profiles
    from app.catalog import introspect

    gateway_dsn = os.environ.get("QUERYGATE_DATABASE_URL")
    schemas = tuple(
        s.strip() for s in (args.schemas or os.environ.get("QUERYGATE_SCHEMAS") or "public").split(",")
        if s.strip()
    )
    dsn = args.dsn or gateway_dsn
    if not dsn:
        print("querygate db: give --dsn (or set QUERYGATE_DATABASE_URL)", file=sys.stderr)  # noqa: T201
        return 2

    async def init() -> int:
        login = args.login_role or (urlsplit(gateway_dsn).username if gateway_dsn else None)
        if not login:
            print("querygate db init: give --login-role (or set QUERYGATE_DATABASE_URL)",  # noqa: T201
                  file=sys.stderr)
            return 2
        conn = await asyncpg.connect(dsn)
        try:
            database = await conn.fetchval("SELECT current_database()")
            grants = await profiles.db_init(conn, login, database, schemas, args.db_role)
        finally:
            await conn.close()
        print(f"querygate db init: {database} ready for login role {login}")  # noqa: T201
        if grants:
            print("PUBLIC holds privileges the gateway refuses to serve with; revoke them:",  # noqa: T201
                  file=sys.stderr)
            for grant in grants:
                print(f"  {grant}", file=sys.stderr)  # noqa: T201
            return 1
        return 0

    async def sync() -> int:
        conn = await asyncpg.connect(dsn)
        try:
            if args.drop_views:
                dropped = await profiles.drop_all_views(conn)
                print(f"querygate db sync: dropped {dropped} masking views; the gateway "  # noqa: T201
                      "creates them again from the new catalog")
                return 0
            catalog = await introspect(conn, schemas, None)
            token = os.environ.get("QUERYGATE_MASK_REDACT_TOKEN", "[REDACTED]")
            synced = await profiles.sync_views(
                conn, await profiles.recorded_profiles(conn), catalog, token
            )
        finally:
            await conn.close()
        print(f"querygate db sync: {synced} masking profiles match the catalog")  # noqa: T201
        return 0

    try:
        return asyncio.run(init() if args.db_command == "init" else sync())
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"querygate db {args.db_command}: {type(exc).__name__}: {exc}", file=sys.stderr)  # noqa: T201
        return 1


def cmd_audit(args: argparse.Namespace) -> int:
    """`audit verify`: 0 when every chain is complete, in order and unedited; 1 otherwise."""
    import asyncio

    from app.audit import AuditError, Verifier, kafka_security, verify_file, verify_topic

    if (args.file is None) == (args.kafka is None):
        print("querygate audit verify: give a FILE or --kafka BOOTSTRAP", file=sys.stderr)  # noqa: T201
        return 2
    verifier: Verifier
    try:
        if args.file is not None:
            verifier = verify_file(Path(args.file), args.allow_partial_start)
        else:
            # The sink's own settings (QUERYGATE_AUDIT_KAFKA_*: TLS, SASL PLAIN, SCRAM,
            # OAUTHBEARER): the same topic is read the way it is written.
            settings = load_settings(audit_kafka_bootstrap=args.kafka)
            topic = args.topic or settings.audit_kafka_topic
            verifier = asyncio.run(verify_topic(
                args.kafka, topic, args.allow_partial_start, args.timeout,
                **kafka_security(settings),
            ))
    except (OSError, AuditError) as exc:
        print(f"querygate audit verify: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    if args.json:
        print(json.dumps(verifier.report(), indent=2))  # noqa: T201
    else:
        print(verifier.summary())  # noqa: T201
    return 0 if verifier.ok else 1


def cmd_mcp(args: argparse.Namespace) -> int:
    """The stdio MCP bridge to a gateway (docs/agents.md); stdout is the protocol's."""
    from app.mcp import bridge

    url = args.url or os.environ.get("QUERYGATE_URL")
    token_file = args.token_file or os.environ.get("QUERYGATE_TOKEN_FILE")
    if not url or not token_file:
        raise ConfigError("querygate mcp needs --url and --token-file (or QUERYGATE_URL and "
                          "QUERYGATE_TOKEN_FILE)")
    if not Path(token_file).is_file():
        raise ConfigError(f"--token-file: {token_file} is not a file")
    _configure_logging(args.log_level)
    bridge.run(url, Path(token_file), Path(args.on_behalf_of_token_file)
               if args.on_behalf_of_token_file else None, args.timeout)
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("querygate")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _json_list(text: str) -> list[Any]:
    """--params: a JSON list, else a usage error (one line, exit 2)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError("must be a JSON list, e.g. '[1, \"a\"]'")
    return value


# Exit codes (README, "Two commands"): 0 done; 1 the gateway answered with a refusal or an error, or the
# check failed; 2 usage or configuration; 3 the gateway (or a service the command needs)
# could not be reached or answered with something that is not its JSON; 130 interrupted.
EXIT_UNREACHABLE = 3


def cmd_console(args: argparse.Namespace) -> int:
    """`console`: the web console and its indexer; `console ingest`: the indexer alone."""
    settings = load_settings()
    _configure_logging(settings.log_level)
    if args.console_command == "ingest":
        import asyncio

        import asyncpg

        from app.console.app import run_ingest

        try:
            asyncio.run(run_ingest(settings, once=args.once))
        except (OSError, RuntimeError, asyncpg.PostgresError) as exc:
            print(f"querygate console ingest: {type(exc).__name__}: {exc}", file=sys.stderr)  # noqa: T201
            return 1
        return 0
    from app.console.web import serve

    serve(settings)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "serve": cmd_serve, "dev": cmd_dev, "token": cmd_token, "explain": cmd_explain,
        "catalog": cmd_catalog, "audit": cmd_audit, "db": cmd_db, "mcp": cmd_mcp,
        "console": cmd_console,
    }
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"querygate: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    except httpx.HTTPError as exc:
        # One line, never a traceback: where it went and what happened.
        where = exc.request.url if _has_request(exc) else None
        print(f"querygate {args.command}: cannot reach {where or 'the gateway'}: "  # noqa: T201
              f"{type(exc).__name__}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except json.JSONDecodeError as exc:  # a body that is not the gateway's JSON
        print(f"querygate {args.command}: the answer is not the gateway's JSON "  # noqa: T201
              f"({type(exc).__name__})", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130


def _has_request(exc: httpx.HTTPError) -> bool:
    try:
        exc.request  # noqa: B018 (raises RuntimeError when the error has no request)
    except RuntimeError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
