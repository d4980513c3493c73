"""`make run` on a fresh clone: the README's first command must work on a new machine.

Clones the committed repository (so an uncommitted or unlisted file fails here as it would
in CI), runs `make run` there, waits for /readyz, sends a demo query as alice with the token
`make run` wrote, then stops it with Ctrl-C and checks that PostgreSQL and OPA went too.
The OPA build is reused through OPA_BIN; everything else is installed by the Makefile.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest

from app.devstack import find_opa, free_port, interrupt_group, wait_http
from tests.conftest import REPO

pytestmark = pytest.mark.e2e


def _children_using(path: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(path) in cmdline:
            found.append(proc)
    return found


def test_make_run_from_a_fresh_clone(tmp_path):
    clone = tmp_path / "querygate"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUERYGATE_")}
    env.pop("VIRTUAL_ENV", None)
    env["QUERYGATE_PORT"] = str(port)
    env["QUERYGATE_PG_PORT"] = str(free_port())
    env["QUERYGATE_CONSOLE_PORT"] = str(free_port())
    env["QUERYGATE_CONSOLE_DEV_IDP_PORT"] = str(free_port())
    log_path = tmp_path / "make-run.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["make", "run", f"OPA_BIN={find_opa()}"],
            cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            assert proc.poll() is None, log_path.read_text()[-4000:]
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-4000:]
            time.sleep(1)
        tokens = json.loads((clone / ".querygate" / "dev" / "tokens.json").read_text())
        assert set(tokens) == {"alice", "sam", "dana", "sec", "pat"}
        response = httpx.post(
            f"{base}/v1/query",
            json={"sql": "SELECT id, country FROM customers WHERE id < $1", "params": [4]},
            headers={"authorization": f"Bearer {tokens['alice']}"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        assert response.json()["row_count"] == 3
        denied = httpx.post(
            f"{base}/v1/query", json={"sql": "DROP TABLE orders"},
            headers={"authorization": f"Bearer {tokens['alice']}"}, timeout=10,
        )
        assert denied.status_code == 403
        output = log_path.read_text()
        assert "curl" in output and "Ctrl-C" in output
        # The console (docs/console.md) is started and its URL printed.
        console = f"http://127.0.0.1:{env['QUERYGATE_CONSOLE_PORT']}"
        assert f"Console: {console}" in output
        wait_http(f"{console}/readyz", timeout_s=60)
        # The banner's psql line, pasted as printed (issue 17 acceptance 1).
        line = next(x.strip() for x in output.splitlines() if x.strip().startswith("psql "))
        conninfo = line.removeprefix("psql ").strip('"').replace("$TOKEN", tokens["alice"])
        assert f"port={env['QUERYGATE_PG_PORT']}" in conninfo and "dbname=appdb" in conninfo
        psql = ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose",
                conninfo, "-c"]
        read = "SELECT id, email, ssn, card_number FROM customers ORDER BY id LIMIT 3"
        masked = subprocess.run([*psql, read], capture_output=True, text=True, timeout=30)
        assert masked.returncode == 0, masked.stderr
        rows = [r.split("|") for r in masked.stdout.strip().splitlines()]
        assert len(rows) == 3 and all("*" in r[2] and "*" in r[3] for r in rows), rows
        dropped = subprocess.run([*psql, "DROP TABLE orders"], capture_output=True, text=True,
                                 timeout=30)
        assert dropped.returncode != 0 and "42501" in dropped.stderr, dropped.stderr
        assert "policy_denied" in dropped.stderr
    finally:
        interrupt_group(proc, 60)
    time.sleep(1)
    assert "querygate dev: stopped" in log_path.read_text()
    leftovers = [p for p in _children_using(clone) if p.is_running() and p.status() != "zombie"]
    assert not leftovers, [p.cmdline() for p in leftovers]
