"""OpenTelemetry traces (issue 20, acceptance 3): with QUERYGATE_OTEL_ENABLED and the otel
extra, one /v1/query is a request span with a child span per stage, all under the trace of
the caller's ``traceparent``, and OPA receives that trace: a real OPA with distributed
tracing on writes the same trace id into its decision log. Spans are caught by the SDK's
in-memory exporter, installed as this process's tracer provider before the gateway starts
(which then keeps it, app/tracing.py)."""

from __future__ import annotations

import json
import logging
import subprocess
import time

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from app import tracing
from app.devstack import REPO_ROOT, find_opa, free_port, wait_http
from app.metrics import JsonFormatter

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
STAGES = {"auth", "facts", "policy", "database", "masking"}


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    memory = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return memory


@pytest.fixture(scope="module")
def traced_opa(tmp_path_factory):
    """OPA with the gateway's policy, console decision logs and distributed tracing on (its
    exporter points at a closed port: only the propagated context matters here)."""
    port = free_port()
    log_file = tmp_path_factory.mktemp("opa-traced") / "opa.log"
    with log_file.open("wb") as sink:
        process = subprocess.Popen(
            [find_opa(None), "run", "--server", "--addr", f"127.0.0.1:{port}",
             "--disable-telemetry", "--log-format", "json", "--log-level", "info",
             "--set", "decision_logs.console=true",
             "--set", "distributed_tracing.type=grpc",
             "--set", f"distributed_tracing.address=127.0.0.1:{free_port()}",
             str(REPO_ROOT / "rego")],
            stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", timeout_s=30)
    yield url, log_file
    process.terminate()
    process.wait(timeout=10)


def test_a_query_is_one_trace_with_a_span_per_stage_and_opa_in_it(
    exporter, traced_opa, make_gateway, tmp_path, alice
):
    url, opa_log = traced_opa
    gateway = make_gateway(audit_spool_dir=str(tmp_path / "spool"), opa_url=url,
                           otel_enabled=True, decision_cache_entries=0)
    exporter.clear()
    headers = {**alice, "traceparent": f"00-{TRACE_ID}-{PARENT}-01"}
    response = gateway.query("SELECT id, email FROM customers WHERE id < $1", headers, [3])
    assert response.status_code == 200, response.text
    spans = [s for s in exporter.get_finished_spans()
             if f"{s.context.trace_id:032x}" == TRACE_ID]
    (request,) = [s for s in spans if s.name == "querygate.request"]
    assert f"{request.parent.span_id:016x}" == PARENT  # the caller's span is its parent
    assert request.attributes["querygate.decision"] == "allow"
    assert request.attributes["http.route"] == "/v1/query"
    children = {s.name.removeprefix("querygate."): s for s in spans if s is not request}
    assert STAGES <= set(children), sorted(children)
    for stage in STAGES:
        assert children[stage].parent.span_id == request.context.span_id, stage
    # Nothing of the statement or the caller in the spans.
    text = json.dumps([dict(s.attributes or {}) for s in spans])
    assert "email" not in text and "alice" not in text and "customers" not in text

    deadline = time.monotonic() + 10
    while True:
        logged = [json.loads(line) for line in opa_log.read_text().splitlines()
                  if line.startswith("{") and '"Decision Log"' in line]
        traced = [e for e in logged if e.get("trace_id") == TRACE_ID]
        if traced or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert traced, [e.get("trace_id") for e in logged]


def test_log_lines_carry_the_current_trace(exporter):
    from app.config import load_settings

    assert tracing.configure(load_settings(otel_enabled=True))
    try:
        record = logging.LogRecord("querygate.test", logging.INFO, __file__, 1, "hello", None,
                                   None)
        with trace.get_tracer("test").start_as_current_span("outer") as span:
            line = json.loads(JsonFormatter().format(record))
        assert line["trace_id"] == f"{span.get_span_context().trace_id:032x}"
        assert line["span_id"] == f"{span.get_span_context().span_id:016x}"
        assert "trace_id" not in json.loads(JsonFormatter().format(record))  # no span
    finally:
        tracing.release()


def test_tracing_is_off_by_default(make_gateway, tmp_path, alice, exporter):
    gateway = make_gateway(audit_spool_dir=str(tmp_path / "spool"))
    exporter.clear()
    headers = {**alice, "traceparent": f"00-{TRACE_ID}-{PARENT}-01"}
    assert gateway.query("SELECT 1 FROM orders LIMIT 1", headers).status_code == 200
    assert exporter.get_finished_spans() == ()


def test_a_wire_statement_is_a_trace_with_a_span_per_stage_and_opa_in_it(
    exporter, traced_opa, make_gateway, tmp_path, keys
):
    """The wire protocol carries no trace context: each governed statement is a root span
    (querygate.statement) with its stage spans under it, current while it is decided, so
    OPA's decision log has its trace id; a denied one ends with its refusal."""
    import psycopg

    url, opa_log = traced_opa
    gateway = make_gateway(audit_spool_dir=str(tmp_path / "spool"), opa_url=url,
                           otel_enabled=True, decision_cache_entries=0,
                           pg_port=free_port(), dev_mode=True)
    exporter.clear()
    token = keys.token("alice", ["analysts"])
    with psycopg.connect(host="127.0.0.1", port=gateway.settings.pg_port, dbname="appdb",
                         user="alice", password=token, sslmode="disable",
                         autocommit=True) as conn:
        rows = conn.execute("SELECT id, email FROM customers WHERE id < %s", [3]).fetchall()
        with pytest.raises(psycopg.Error):
            conn.execute("DELETE FROM customers")
    assert len(rows) == 2
    spans = exporter.get_finished_spans()
    statements = [s for s in spans if s.name == "querygate.statement"]
    assert [s.attributes["querygate.outcome"] for s in statements] == ["ok", "deny"], [
        dict(s.attributes or {}) for s in statements]
    read = statements[0]
    assert read.parent is None and read.attributes["querygate.channel"] == "pgwire"
    children = {s.name.removeprefix("querygate."): s for s in spans
                if s.parent is not None and s.parent.span_id == read.context.span_id}
    # The stages the wire times (its statement's database time spans messages: metrics only).
    assert {"facts", "policy"} <= set(children), sorted(children)
    assert all(s.context.trace_id == read.context.trace_id for s in children.values())
    text = json.dumps([dict(s.attributes or {}) for s in spans])
    assert "email" not in text and "alice" not in text and "customers" not in text

    trace_id = f"{read.context.trace_id:032x}"
    deadline = time.monotonic() + 10
    while True:
        logged = [json.loads(line) for line in opa_log.read_text().splitlines()
                  if line.startswith("{") and '"Decision Log"' in line]
        if any(e.get("trace_id") == trace_id for e in logged) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert any(e.get("trace_id") == trace_id for e in logged), [e.get("trace_id") for e in logged]
