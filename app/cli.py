"""The ``querygate`` command: serve, dev (the whole local stack), token, explain."""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import sys
from pathlib import Path

import httpx

from app.config import ConfigError, Settings, load_settings

log = logging.getLogger("querygate")


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format='{"time":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","message":"%(message)s"}',
    )
    # Per-request client chatter and pgserver's start-up transcript drown the useful lines.
    for noisy in ("httpx", "httpcore", "pgserver"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _serve(settings: Settings) -> None:
    import uvicorn

    from app.api import create_app

    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        loop="uvloop",
        http="httptools",
        # Behind a mesh or ingress the proxy's own headers are handled by identity, not here.
        proxy_headers=False,
        server_header=False,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    settings = load_settings()
    _configure_logging(settings.log_level)
    _serve(settings)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from app.identity import mint_dev_token

    settings = load_settings()
    groups = [g for part in args.groups for g in part.split(",") if g]
    print(mint_dev_token(settings, args.sub, groups, ttl_s=args.ttl, email=args.email))  # noqa: T201
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    """Start embedded PostgreSQL with demo data, OPA with rego/, and the gateway; Ctrl-C stops all."""
    from app.demo import DEMO_IDENTITIES
    from app.devstack import start_opa, start_postgres
    from app.identity import mint_dev_token

    # uvicorn re-raises SIGTERM after its shutdown; turning it into KeyboardInterrupt lets the
    # finally below stop OPA and PostgreSQL instead of the process dying first.
    signal.signal(signal.SIGTERM, _interrupt)
    # make run is staging unless told otherwise; dev mode only ever outside prod.
    os.environ.setdefault("QUERYGATE_ENVIRONMENT", "staging")
    # The demo's security officer administers the gateway (catalog refresh).
    os.environ.setdefault("QUERYGATE_ADMIN_GROUPS", "security")
    data_dir = Path(args.data_dir).resolve()
    # A stable hash-masking key for the demo, so hashes survive a restart of make run.
    mask_key_file = data_dir / "dev" / "mask-key"
    if not mask_key_file.exists():
        mask_key_file.parent.mkdir(parents=True, exist_ok=True)
        mask_key_file.touch(mode=0o600)
        mask_key_file.write_text(secrets.token_hex(32))
    os.environ.setdefault("QUERYGATE_MASK_HMAC_KEY", mask_key_file.read_text().strip())
    probe = load_settings(dev_mode=True, dev_signing_key_file=data_dir / "dev" / "signing-key.pem")
    _configure_logging(probe.log_level)
    print(f"querygate dev: starting PostgreSQL in {data_dir / 'pg'} …", flush=True)  # noqa: T201
    postgres = start_postgres(data_dir / "pg")
    opa = None
    try:
        print("querygate dev: starting OPA with rego/ …", flush=True)  # noqa: T201
        opa = start_opa(opa_bin=args.opa_bin)
        settings = load_settings(
            dev_mode=True,
            dev_signing_key_file=data_dir / "dev" / "signing-key.pem",
            database_url=postgres.app_dsn,
            opa_url=opa.url,
        )
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
            f"Demo tokens (also in {token_file}):\n"
            + "".join(
                f"  {sub:<6} {','.join(DEMO_IDENTITIES[sub]):<12} {tok[:24]}…\n"
                for sub, tok in tokens.items()
            )
            + "\nTry:\n"
            f"  TOKEN=$(python3 -c 'import json;print(json.load(open(\"{token_file}\"))[\"alice\"])')\n"
            f"  curl -s {base}/v1/query -H \"Authorization: Bearer $TOKEN\" "
            "-H 'content-type: application/json' "
            "-d '{\"sql\": \"SELECT id, country FROM customers WHERE id < $1\", \"params\": [5]}'\n"
            "Then try (docs/approvals.md, docs/masking.md):\n"
            "  as alice: SELECT email, ssn, card_number FROM customers LIMIT 3   -> masked\n"
            "  as alice: SELECT id FROM customers WHERE ssn LIKE '1%'            -> masked_column_predicate\n"
            "  as alice: DROP TABLE orders                                       -> destructive_ddl\n"
            "  as dana:  DELETE FROM orders WHERE 1 = 1                          -> unbounded_write\n"
            "  as dana:  UPDATE orders SET status = 'x' WHERE id < 2000         -> blast_radius_exceeded\n"
            "  as dana:  UPDATE customers SET country = 'DE' WHERE id = 1        -> 202, approve as sec\n"
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        _serve(settings)
    finally:
        if opa is not None:
            opa.stop()
        postgres.stop()
        print("querygate dev: stopped", flush=True)  # noqa: T201
    return 0


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
    token = _token(args)
    if token is None:
        return 2
    response = httpx.post(
        f"{args.url}/v1/explain",
        json={"sql": args.sql, "params": json.loads(args.params)},
        headers={"authorization": f"Bearer {token}"},
        timeout=10,
    )
    print(json.dumps(response.json(), indent=2))  # noqa: T201
    return 0 if response.status_code == 200 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="querygate", description=__doc__)
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
    explain.add_argument("--params", default="[]", help="JSON list of parameters")
    explain.add_argument("--as", dest="as_", default="alice", help="demo identity")
    explain.add_argument("--token", default=None, help="a bearer token instead of --as")
    explain.add_argument("--url", default="http://127.0.0.1:8080")
    explain.add_argument("--data-dir", default=".querygate")

    catalog = sub.add_parser("catalog", help="list columns with their class and its origin")
    catalog.add_argument("--as", dest="as_", default="sec", help="demo identity (an admin)")
    catalog.add_argument("--token", default=None, help="a bearer token instead of --as")
    catalog.add_argument("--url", default="http://127.0.0.1:8080")
    catalog.add_argument("--data-dir", default=".querygate")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "serve": cmd_serve, "dev": cmd_dev, "token": cmd_token, "explain": cmd_explain,
        "catalog": cmd_catalog,
    }
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"querygate: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
