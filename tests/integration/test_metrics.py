"""Observability: the Prometheus series a dashboard relies on, and JSON logs with request ids.

Acceptance 7: /metrics exposes requests by decision and code, per-stage latency histograms,
OPA errors, spool depth and age, and Kafka send errors — checked on real gateways whose
Kafka and OPA are unreachable where the test needs errors.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.devstack import free_port, start_gateway

pytestmark = pytest.mark.integration


def scrape(client: httpx.Client) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        families[family.name] = [(s.name, s.labels, s.value) for s in family.samples]
    return families


def value(families: dict[str, Any], sample: str, **labels: str) -> float:
    name = sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    name = name.removesuffix("_bucket")
    return sum(
        v for n, lab, v in families.get(name, [])
        if n == sample and all(lab.get(k) == want for k, want in labels.items())
    )


def test_metrics_expose_the_named_series(make_gateway, tmp_path, alice):
    gateway = make_gateway(
        audit_spool_dir=str(tmp_path / "spool"), audit_sink="kafka",
        audit_kafka_bootstrap=f"127.0.0.1:{free_port()}", audit_drain_timeout_s=0,
    )
    assert gateway.query("SELECT id, email FROM customers WHERE id < $1", alice, [3]).status_code == 200
    assert gateway.query("DELETE FROM orders WHERE id = 1", alice).status_code == 403
    assert gateway.query("SELECT 1", {"authorization": "Bearer nope"}).status_code == 401
    time.sleep(1.0)  # the shipper has tried Kafka (unreachable) at least once
    families = scrape(gateway.client)

    assert value(families, "querygate_requests_total", route="/v1/query", decision="allow",
                 code="ok") == 1
    assert value(families, "querygate_requests_total", route="/v1/query", decision="deny",
                 code="policy_denied") == 1
    assert value(families, "querygate_requests_total", route="/v1/query", decision="none",
                 code="missing_token") + value(
        families, "querygate_requests_total", route="/v1/query", decision="none",
        code="invalid_token") == 1
    for stage in ("auth", "facts", "policy", "database", "masking"):
        assert value(families, "querygate_stage_duration_seconds_count", stage=stage) >= 1, stage
        assert value(families, "querygate_stage_duration_seconds_bucket", stage=stage, le="+Inf") >= 1
    assert "querygate_opa_errors" in families
    assert value(families, "querygate_audit_kafka_send_errors_total") >= 1
    depth = value(families, "querygate_audit_spool_events")
    assert depth >= 4  # started, decision, execution, decision, auth failure: none shipped
    assert value(families, "querygate_audit_spool_oldest_age_seconds") > 0
    assert value(families, "querygate_audit_spool_bytes") > 0
    assert value(families, "querygate_audit_spool_limit_bytes") == 1 << 30
    assert value(families, "querygate_audit_sink_up") == 0
    assert value(families, "querygate_audit_events_total", type="decision") == 2
    assert value(families, "querygate_audit_events_total", type="auth_failure") == 1
    assert value(families, "querygate_audit_append_duration_seconds_count") >= 4
    assert value(families, "querygate_audit_last_sequence") == depth


def test_opa_errors_are_counted(make_gateway, alice):
    gateway = make_gateway(opa_url=f"http://127.0.0.1:{free_port()}", opa_timeout_ms=500)
    response = gateway.query("SELECT id FROM customers WHERE id = 1", alice)
    assert response.status_code == 503
    families = scrape(gateway.client)
    assert value(families, "querygate_opa_errors_total") == 1
    assert value(families, "querygate_requests_total", route="/v1/query", decision="error",
                 code="policy_unavailable") == 1


def test_log_lines_are_json_with_the_request_id(serve_settings, tmp_path):
    log_path = tmp_path / "gateway.log"
    gateway = start_gateway(
        {**serve_settings, "log_level": "info", "audit_spool_dir": str(tmp_path / "spool")},
        log_path,
    )
    try:
        refused = httpx.post(f"{gateway.url}/v1/query", json={"sql": "SELECT 1"},
                             headers={"authorization": "Bearer not-a-jwt"})
        assert refused.status_code == 401
        request_id = refused.headers["x-request-id"]
    finally:
        gateway.stop()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    mine = [line for line in lines if line.get("request_id") == request_id]
    assert any(line["message"].startswith("authentication refused") for line in mine), mine
    assert "not-a-jwt" not in log_path.read_text()


def test_process_build_and_request_duration_series_and_no_created(make_gateway, tmp_path, alice):
    gateway = make_gateway(audit_spool_dir=str(tmp_path / "spool"))
    assert gateway.query("SELECT id FROM customers WHERE id < $1", alice, [3]).status_code == 200
    response = gateway.client.get("/metrics")
    assert "_created" not in response.text  # no twin series per counter
    families = scrape(gateway.client)
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds",
                 "process_start_time_seconds", "python_info"):
        assert name in families, name
    ((_, labels, one),) = families["querygate_build_info"]
    assert one == 1 and labels["version"] and labels["python"] and labels["sqlglot"], labels
    assert value(families, "querygate_request_duration_seconds_count", route="/v1/query",
                 decision="allow") == 1
    assert value(families, "querygate_request_duration_seconds_sum", route="/v1/query") > 0


def test_metrics_on_a_port_of_their_own(make_gateway, tmp_path, alice):
    """QUERYGATE_METRICS_PORT: /metrics there (for the NetworkPolicy to open to Prometheus
    alone), not on the API port; a client that connects and sends nothing holds no slot."""
    import socket

    from app.metrics import MetricsServer

    port = free_port()
    gateway = make_gateway(audit_spool_dir=str(tmp_path / "spool"), metrics_port=port)
    assert gateway.client.get("/metrics").status_code == 404
    assert gateway.query("SELECT 1 FROM orders LIMIT 1", alice).status_code == 200
    silent = [socket.create_connection(("127.0.0.1", port))
              for _ in range(MetricsServer.MAX_CONNECTIONS + 2)]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15) as client:
            deadline = time.monotonic() + MetricsServer.TIMEOUT_S + 5
            while True:  # the silent ones time out; a scrape then gets through
                try:
                    families = scrape(client)
                    break
                except (httpx.TransportError, AssertionError):
                    assert time.monotonic() < deadline, "the metrics port stayed blocked"
                    time.sleep(0.2)
    finally:
        for sock in silent:
            sock.close()
    assert value(families, "querygate_requests_total", route="/v1/query", decision="allow") == 1
