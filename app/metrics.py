"""Observability: Prometheus metrics, per-request stage clocks and JSON log lines.

Every gateway has its own ``CollectorRegistry`` (several run in one test process), served
at ``GET /metrics``. The series are documented in docs/audit.md; their names are a public
API for dashboards and alerts, like error codes.

Log lines are one JSON object each, carrying the request id of the request that caused
them (a context variable set by the request-id middleware).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

import orjson
from prometheus_client import (
    PLATFORM_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from app import tracing

__all__ = ["CONTENT_TYPE_LATEST", "REQUEST_ID", "JsonFormatter", "Metrics", "MetricsMiddleware", "StageClock"]

# A counter's ``_created`` twin is one more series per label set that no dashboard reads.
disable_created_metrics()  # type: ignore[no-untyped-call]

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "querygate_request_id", default=None
)

# Stage latencies are sub-millisecond (facts from the cache) to seconds (a slow statement).
_STAGE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)
_APPEND_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)


class _SpoolCollector(Collector):
    """Spool gauges read at scrape time from the audit log's own counters."""

    def __init__(self) -> None:
        self.source: Callable[[], dict[str, Any]] | None = None

    def collect(self) -> Iterator[Metric]:
        if self.source is None:
            return
        status = self.source()
        labels = ["instance"]
        instance = [str(status.get("instance", ""))]
        for name, key, doc in (
            ("querygate_audit_spool_events", "depth",
             "audit events appended to the spool and not yet shipped to the sink"),
            ("querygate_audit_spool_bytes", "bytes", "bytes the spool holds on disk"),
            ("querygate_audit_spool_limit_bytes", "limit_bytes", "the spool's disk quota"),
            ("querygate_audit_spool_oldest_age_seconds", "oldest_age_s",
             "age of the oldest unshipped event (0 when everything is shipped)"),
            ("querygate_audit_last_sequence", "last_seq",
             "sequence number of the last event durably appended (compare with the topic)"),
            ("querygate_audit_shipped_sequence", "shipped_seq",
             "sequence number of the last event the sink acknowledged"),
            ("querygate_audit_sink_up", "sink_up", "1 while the last delivery to the sink worked"),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=labels)
            gauge.add_metric(instance, float(status.get(key) or 0))
            yield gauge


def _versions() -> tuple[str, str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "unknown"

    return of("querygate"), platform.python_version(), of("sqlglot")


class Metrics:
    """The gateway's Prometheus series, on a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # process_* (CPU, memory, open files, start time; from /proc) and python_info.
        ProcessCollector(registry=r)
        r.register(PLATFORM_COLLECTOR)
        self.build_info = Gauge(
            "querygate_build_info", "1, labelled with the running build's versions",
            ["version", "python", "sqlglot"], registry=r,
        )
        self.build_info.labels(*_versions()).set(1)
        self.request_seconds = Histogram(
            "querygate_request_duration_seconds",
            "HTTP requests from the first byte to the last, by route and decision",
            ["route", "decision"], buckets=_STAGE_BUCKETS, registry=r,
        )
        self.requests = Counter(
            "querygate_requests", "requests by route, decision and outcome code",
            ["route", "decision", "code"], registry=r,
        )
        self.stage_seconds = Histogram(
            "querygate_stage_duration_seconds",
            "time spent per stage: auth, facts, policy, database, masking",
            ["stage"], buckets=_STAGE_BUCKETS, registry=r,
        )
        self.opa_errors = Counter(
            "querygate_opa_errors", "decisions that failed closed because OPA could not answer",
            registry=r,
        )
        self.decision_cache = Counter(
            "querygate_decision_cache",
            "decisions by cache result: hit, miss (asked and stored), uncacheable (asked, "
            "policy set no TTL or OPA serves no bundle), revision (a new bundle emptied it)",
            ["result"], registry=r,
        )
        self.audit_events = Counter(
            "querygate_audit_events", "audit events durably appended to the spool, by type",
            ["type"], registry=r,
        )
        self.audit_append_seconds = Histogram(
            "querygate_audit_append_duration_seconds",
            "time from handing an event to the spool to its fsync (what a request waits)",
            buckets=_APPEND_BUCKETS, registry=r,
        )
        self.audit_refused = Counter(
            "querygate_audit_refused", "events the spool could not accept, by reason",
            ["reason"], registry=r,
        )
        self.audit_shipped = Counter(
            "querygate_audit_shipped_events", "audit events acknowledged by the sink", registry=r,
        )
        self.kafka_send_errors = Counter(
            "querygate_audit_kafka_send_errors",
            "failed deliveries to Kafka (each is retried from the spool), by error",
            ["error"], registry=r,
        )
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._spool = _SpoolCollector()
        r.register(self._spool)

    def watch_spool(self, source: Callable[[], dict[str, Any]]) -> None:
        """Read spool gauges from ``source`` at every scrape."""
        self._spool.source = source

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.child(self.stage_seconds, stage).observe(seconds)

    def child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, kept: labels() checks, builds a key and takes a lock
        on every call, and a request makes several. Label values here come from closed
        sets (stages, route templates, decisions, codes, event types), as Prometheus
        needs them to anyway."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every HTTP request by route template, decision and outcome code.

    Handlers leave the request's ``audit`` (its ``label`` is the decision) and
    ``error_code`` in the request state; a request with neither is counted as decision
    ``none`` and code ``ok`` (or its status).
    """

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[..., Awaitable[Any]],
        send: Callable[..., Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0
        started = time.perf_counter()

        async def send_status(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            status = 500
            scope.setdefault("state", {}).setdefault("error_code", "internal_error")
            raise
        finally:
            state = scope.get("state") or {}
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            code = state.get("error_code") or ("ok" if 0 < status < 400 else str(status))
            decision = getattr(state.get("audit"), "label", None) or "none"
            metrics = self.metrics
            metrics.child(metrics.requests, path, decision, code).inc()
            metrics.child(metrics.request_seconds, path, decision).observe(
                time.perf_counter() - started)


class StageClock:
    """Microseconds per stage for one request; each stage also feeds the histogram."""

    __slots__ = ("durations_us", "metrics", "span")

    def __init__(self, metrics: Metrics | None, span: Any = None) -> None:
        self.metrics = metrics
        self.durations_us: dict[str, int] = {}
        # A wire statement's trace span (tracing.statement_span), parent of its stage spans;
        # an HTTP request's stages go under the current span instead.
        self.span = span

    def add(self, stage: str, seconds: float) -> None:
        self.durations_us[stage] = self.durations_us.get(stage, 0) + int(seconds * 1_000_000)
        if self.metrics is not None:
            self.metrics.observe_stage(stage, seconds)
        if tracing.enabled():
            tracing.stage(stage, seconds, self.span)

    def timer(self, stage: str) -> _Timer:
        return _Timer(self, stage)


class _Timer:
    __slots__ = ("clock", "stage", "started")

    def __init__(self, clock: StageClock, stage: str) -> None:
        self.clock = clock
        self.stage = stage
        self.started = 0.0

    def __enter__(self) -> _Timer:
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.clock.add(self.stage, time.perf_counter() - self.started)


# Attributes every LogRecord has; anything else was passed with ``extra=`` and is logged.
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__
) | {"message", "asctime", "taskName", "color_message"}  # uvicorn's ANSI-coloured copy


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id and extras."""

    def format(self, record: logging.LogRecord) -> str:
        line: MutableMapping[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id is not None:
            line["request_id"] = request_id
        ids = tracing.log_ids()
        if ids is not None:
            line["trace_id"], line["span_id"] = ids
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class MetricsServer:
    """``/metrics`` on a port of its own (``QUERYGATE_METRICS_PORT``), so a NetworkPolicy can
    let Prometheus reach it and nothing else (deploy/k8s). prometheus_client's WSGI app in
    a thread, with limits its own ``start_http_server`` lacks: a connection must send its
    request within ``TIMEOUT_S``, and at most ``MAX_CONNECTIONS`` are served at once (more
    are closed), so a client that opens connections and sends nothing holds no thread long.

    With several workers each binds the first free port from ``port`` on (worker spools are
    claimed the same way), and each serves its own process's series.
    """

    TIMEOUT_S = 5.0
    MAX_CONNECTIONS = 8

    def __init__(self, metrics: Metrics, host: str, port: int, ports: int = 1) -> None:
        self.metrics, self.host, self.port, self.ports = metrics, host, port, ports
        self._server: Any = None
        self._thread: Any = None

    def start(self) -> int:
        import socketserver
        import threading
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

        from prometheus_client import make_wsgi_app

        slots = threading.BoundedSemaphore(self.MAX_CONNECTIONS)
        timeout = self.TIMEOUT_S

        class Handler(WSGIRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return None  # scrapes are not log lines

        Handler.timeout = timeout  # the socket's: a silent client is dropped

        class Server(socketserver.ThreadingMixIn, WSGIServer):
            daemon_threads = True

            def process_request(self, request: Any, client_address: Any) -> None:
                if not slots.acquire(blocking=False):
                    self.shutdown_request(request)  # full: closed, not queued
                    return
                super().process_request(request, client_address)

            def process_request_thread(self, request: Any, client_address: Any) -> None:
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    slots.release()

        app = make_wsgi_app(self.metrics.registry)
        last: OSError | None = None
        for port in range(self.port, self.port + self.ports):
            try:
                self._server = make_server(self.host, port, app, Server, handler_class=Handler)
                break
            except OSError as exc:
                last = exc
        else:
            assert last is not None
            raise last
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="querygate-metrics", daemon=True)
        self._thread.start()
        return int(self._server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
