"""Optional OpenTelemetry traces (``QUERYGATE_OTEL_ENABLED``, the ``otel`` extra).

Off by default, and then nothing here costs more than a ``None`` check. On, an HTTP request
is a span (``querygate.request``, a child of the caller's W3C ``traceparent`` when it sends
one), each stage the request's ``StageClock`` times (auth, facts, policy, database, masking)
a child span of it, and the ``traceparent`` goes on to OPA with every decision request, so
OPA's own spans and decision-log entries carry the same trace id. Log lines written while
a span is current carry its ``trace_id`` and ``span_id`` (app/metrics.py's JsonFormatter).
A statement on the wire protocol is a span of its own (``querygate.statement``, a root: the
protocol carries no trace context), with its facts and policy stage spans under it (its
database time spans several messages, and is in the metrics only); it is current while
the statement is authorized, so its decision request to OPA carries it too, and it ends
with the statement's last audit event.

Spans are exported over OTLP/HTTP as the SDK's standard ``OTEL_EXPORTER_OTLP_*`` variables
say (endpoint, headers, TLS), in batches off the request path. A process that installed a
tracer provider of its own before the gateway started (a test's in-memory exporter, an
embedding application) keeps it.

Attributes hold the route, the request id and the decision's outcome, never SQL, a
parameter, an identity or an address: a trace backend is not the audit trail.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import Any

from app.config import ConfigError, Settings

_tracer: Any = None  # an opentelemetry Tracer while some gateway of this process traces
_users = 0
_propagator: Any = None


def configure(settings: Settings) -> bool:
    """Turn tracing on for this process if ``settings`` ask for it; True if they did."""
    global _tracer, _users, _propagator
    if not settings.otel_enabled:
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError as exc:
        raise ConfigError("QUERYGATE_OTEL_ENABLED needs the otel extra "
                          "(pip install 'querygate[otel]')") from exc
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise ConfigError("QUERYGATE_OTEL_ENABLED needs the otel extra "
                              "(pip install 'querygate[otel]')") from exc
        provider = TracerProvider(resource=Resource.create(
            {"service.name": settings.otel_service_name}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("querygate")
    _propagator = TraceContextTextMapPropagator()
    _users += 1
    return True


def release() -> None:
    """A gateway that traced stops (its lifespan ends); the last one turns tracing off."""
    global _tracer, _users
    _users = max(0, _users - 1)
    if _users == 0:
        _tracer = None


def enabled() -> bool:
    return _tracer is not None


@contextlib.contextmanager
def request_span(scope: Mapping[str, Any]) -> Iterator[Any]:
    """The span of one HTTP request (an ASGI scope), current while it is served."""
    if _tracer is None:
        yield None
        return
    from opentelemetry.trace import SpanKind

    carrier = {}
    for name, value in scope.get("headers") or ():
        if name in (b"traceparent", b"tracestate"):
            carrier[name.decode("latin-1")] = value.decode("latin-1")
    parent = _propagator.extract(carrier) if carrier else None
    with _tracer.start_as_current_span(
        "querygate.request", context=parent, kind=SpanKind.SERVER,
        attributes={"http.request.method": scope.get("method", ""),
                    "url.path": scope.get("path", "")},
    ) as span:
        yield span


def statement_span(channel: str) -> Any:
    """A new span for one statement of a session (the wire protocol), not current; None when
    tracing is off. Its stages name it as their parent (``StageClock.span``)."""
    if _tracer is None:
        return None
    from opentelemetry.trace import SpanKind

    return _tracer.start_span("querygate.statement", kind=SpanKind.SERVER,
                              attributes={"querygate.channel": channel})


@contextlib.contextmanager
def current(span: Any) -> Iterator[None]:
    """``span`` as the current one meanwhile (OPA's traceparent, log lines), left open."""
    if span is None or _tracer is None:
        yield
        return
    from opentelemetry import trace

    with trace.use_span(span, end_on_exit=False):
        yield


def end(span: Any, **attributes: str) -> None:
    """End a ``statement_span`` with what it came to."""
    if span is None:
        return
    span.set_attributes(attributes)
    span.end()


def stage(name: str, seconds: float, parent: Any = None) -> None:
    """A stage that just took ``seconds``, as a child span of ``parent`` (a statement's) or
    else of the current request's."""
    if _tracer is None:
        return
    from opentelemetry import trace

    if parent is not None:
        context = trace.set_span_in_context(parent)
    elif trace.get_current_span().is_recording():
        context = None
    else:
        return  # no request or statement span: no orphan stage spans
    end = time.time_ns()
    span = _tracer.start_span(f"querygate.{name}", context=context,
                              start_time=end - int(seconds * 1e9))
    span.end(end_time=end)


def set_attributes(**attributes: str) -> None:
    """Label the current request's span (its route, request id, outcome)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(attributes)


def traceparent_header() -> bytes:
    """``traceparent`` (and ``tracestate``) header lines for a request to OPA, or b""."""
    if _tracer is None:
        return b""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in carrier.items())


def log_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) in hex of the current span, for a log line."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"
