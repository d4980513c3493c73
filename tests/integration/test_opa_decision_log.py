"""OPA's own decision log (console, as deploy/k8s/config/opa-config.yaml turns it on) holds
no e-mail and no source IP: rego/system/log/log.rego masks them (issue 20, acceptance 4).

A real OPA, started with the gateway's policy and console decision logs, decides an input
the gateway builds (app.policy.decision_input) for a caller with an e-mail, claims and an
address; its log lines are read back.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from app import policy
from app.catalog import Catalog
from app.devstack import REPO_ROOT, find_opa, free_port, wait_http
from app.facts import QueryFacts
from app.identity import Identity

pytestmark = pytest.mark.integration

EMAIL = "alice.liddell@example.org"
ADDRESS = "203.0.113.77"


def test_decision_log_holds_no_email_and_no_source_ip(tmp_path: Path):
    port = free_port()
    log_file = tmp_path / "opa.log"
    with log_file.open("wb") as sink:
        process = subprocess.Popen(
            [find_opa(None), "run", "--server", "--addr", f"127.0.0.1:{port}",
             "--disable-telemetry", "--log-format", "json", "--log-level", "info",
             "--set", "decision_logs.console=true", str(REPO_ROOT / "rego")],
            stdout=sink, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", timeout_s=30)
        identity = Identity(sub="alice", groups=("analysts",), issuer="https://idp.test",
                            auth="jwt", email=EMAIL, attributes={"phone": "+1 555 0100"})
        facts = QueryFacts(fingerprint="sha256:x", kind="select",
                           tables_read=("public.customers",))
        document = policy.decision_input(
            identity, facts, Catalog(schemas=("public",), relations={}),
            environment="staging", database="appdb", request_id="r-1", source_ip=ADDRESS)
        answer = httpx.post(f"{url}/v1/data/querygate/decision", json={"input": document},
                            timeout=10)
        assert answer.status_code == 200 and "result" in answer.json(), answer.text
        deadline = time.monotonic() + 10
        while True:
            lines = [json.loads(line) for line in log_file.read_text().splitlines()
                     if line.startswith("{")]
            logged = [e for e in lines if e.get("msg") == "Decision Log"]
            if logged or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert logged, log_file.read_text()[-2000:]
    text = json.dumps(logged)
    assert '"alice"' in text  # the decision is logged, with the subject
    assert EMAIL not in text and ADDRESS not in text and "555 0100" not in text, text
    assert "/input/identity/email" in text  # OPA says what it erased
