"""W3C trace context across HTTP, the outbox, Kafka and the consumers (OpenTelemetry), off by default.

Settings (README, docs/contract.md §1):
- `DANBAO_TRACING`: `off` (the default), `on` (OTLP over HTTP/protobuf to
  `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`, default
  http://localhost:4318), or `file:/path/spans.jsonl`, a debugging exporter that appends every
  finished span as one JSON line. Unset, tracing is on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
  `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; `OTEL_SDK_DISABLED=true` turns it off.
- `DANBAO_TRACING_SAMPLE_RATIO` (1.0): share of new traces recorded; a trace's later spans follow
  its first (the decision travels in the traceparent's flags).
- `OTEL_SERVICE_NAME` (`danbao-<service>`): the service.name of the spans.

How the context travels (docs/design.md, "Tracing"):
- HTTP: the FastAPI instrumentation starts a server span per request (from an incoming
  `traceparent`, if any); asyncpg spans below it.
- Outbox: `outbox.add` / `add_many` store the `traceparent` (and `tracestate`) of the span the
  event is written in, in the row's headers. In a set-based batch, each row gets the context of
  the record that caused it (by causation id, else correlation id), not the batch's.
- Relay: per row with a traceparent, a `send <topic>` producer span, child of the stored
  context; the Kafka record carries the producer span's traceparent.
- Consumers: a `process <topic>` consumer span per record handled one by one, child of the
  record's traceparent (a new trace without one); for a run applied as a set, one span with a
  link to each record's context (a record without one gets a `receive <topic>` root span, so
  every order still has its own trace).
- Timers: the gateway keeps each payment's context (its OrderPlaced record's, as its outbox rows
  would get it) in `payments.traceparent`; the saga worker runs each step for the payment in a
  `saga step` span, child of that context (`resuming`), so the card charge, the re-sent
  commands and the timeouts it emits stay in the order's trace. Escrow (a hold's
  `escrows.traceparent`, from its HoldFunds) and credit (a reservation's, from its
  ReserveCredit) do the same for the auto-confirm release and the reservation expiry.
- Logs: the consumer binds `trace_id` / `span_id` next to `correlation_id` per record; HTTP
  requests bind `correlation_id` (X-Correlation-ID, else the path's first *_id) and `trace_id`.

When off, nothing here creates a span: call sites check the module-level `ENABLED` first, and
the SDK and the instrumentations are not even loaded.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags,
                                 TraceState)

from shared.settings import SettingsError, env, env_fraction

ENABLED = False  # set by configure(); every hot-path call site checks it before calling in here
_tracer: trace.Tracer = trace.NoOpTracer()
_provider: Any = None
_ROOT = otel_context.Context()  # an empty context: a span started in it begins a new trace
TRACE_HEADERS = ("traceparent", "tracestate")

# The run a consumer is applying as a set (its decoded records), and, with tracing on, the span
# context of each of its records by event id and by order (correlation) id.
_SET_RUN: contextvars.ContextVar[list | None] = contextvars.ContextVar("danbao_set_run", default=None)
_SET_CONTEXTS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("danbao_set_contexts", default=None)


# ---------------------------------------------------------------- settings
@dataclass(frozen=True)
class TracingSettings:
    mode: str  # off | otlp | file
    path: str | None = None
    ratio: float = 1.0
    service_name: str = ""

    def describe(self) -> str:
        return {"off": "off", "otlp": "otlp", "file": f"file:{self.path}"}[self.mode]


def settings_from_env(service: str, environ: Mapping[str, str] | None = None) -> TracingSettings:
    def get(name: str) -> str:
        return env(name, "", environ=environ)

    raw = get("DANBAO_TRACING")
    low = raw.lower()
    name = get("OTEL_SERVICE_NAME") or f"danbao-{service}"
    ratio = env_fraction("DANBAO_TRACING_SAMPLE_RATIO", 1.0, environ=environ)
    if get("OTEL_SDK_DISABLED").lower() == "true":
        return TracingSettings("off", service_name=name)
    if not raw:
        endpoint = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return TracingSettings("otlp" if endpoint else "off", ratio=ratio, service_name=name)
    if low in ("off", "false", "0", "no"):
        return TracingSettings("off", service_name=name)
    if low in ("on", "true", "1", "yes", "otlp"):
        return TracingSettings("otlp", ratio=ratio, service_name=name)
    if low.startswith("file:") and raw[5:].strip():
        return TracingSettings("file", path=raw[5:].strip(), ratio=ratio, service_name=name)
    raise SettingsError(f"DANBAO_TRACING must be off, on or file:/path/spans.jsonl, not {raw!r}")


# ---------------------------------------------------------------- set-up
def configure(service: str, environ: Mapping[str, str] | None = None) -> TracingSettings:
    """Read the settings; if tracing is on, start the SDK, its exporter and the asyncpg
    instrumentation. Call once per process, before the clients start."""
    settings = settings_from_env(service, environ)
    if settings.mode == "off":
        return settings
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    if settings.mode == "file":
        processor = SimpleSpanProcessor(JsonLinesExporter(settings.path))  # written at once: a debugging aid
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        processor = BatchSpanProcessor(OTLPSpanExporter())
    provider = enable(settings.service_name, processor, settings.ratio)
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

    AsyncPGInstrumentor().instrument(tracer_provider=provider)
    return settings


def enable(service_name: str, processor: Any, ratio: float = 1.0) -> Any:
    """Turn tracing on with this span processor (tests pass an in-memory exporter's)."""
    global ENABLED, _tracer, _provider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}), sampler=_sampler(ratio))
    provider.add_span_processor(processor)
    _provider, _tracer, ENABLED = provider, provider.get_tracer("danbao"), True
    return provider


def shutdown() -> None:
    """Flush what is buffered and turn tracing off."""
    global ENABLED, _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _provider, _tracer, ENABLED = None, trace.NoOpTracer(), False


def _sampler(ratio: float) -> Any:
    from opentelemetry.sdk.trace.sampling import (ALWAYS_ON, Decision, ParentBased, Sampler, SamplingResult,
                                                  TraceIdRatioBased)

    class DanbaoSampler(Sampler):
        """Parent-based; a new trace is kept with probability `ratio`; a database call outside
        any trace (timer scans, the relay's polling, health checks) is not recorded at all."""

        def __init__(self) -> None:
            self.inner = ParentBased(ALWAYS_ON if ratio >= 1 else TraceIdRatioBased(ratio))

        def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None,
                          trace_state=None):
            if kind is SpanKind.CLIENT and not trace.get_current_span(parent_context).get_span_context().is_valid:
                return SamplingResult(Decision.DROP)
            return self.inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

        def get_description(self) -> str:
            return f"DanbaoSampler({self.inner.get_description()})"

    return DanbaoSampler()


# ---------------------------------------------------------------- the debugging exporter
def span_json(span: Any) -> dict[str, Any]:
    """A finished span as one JSON-ready dict (ids in hex, times in ns since the epoch)."""
    ctx = span.context
    return {
        "name": span.name,
        "service": span.resource.attributes.get("service.name"),
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_span_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "kind": span.kind.name,
        "start": span.start_time,
        "end": span.end_time,
        "status": span.status.status_code.name,
        "attributes": {k: v if isinstance(v, (str, int, float, bool)) else list(v)
                       for k, v in (span.attributes or {}).items()},
        "links": [{"trace_id": f"{link.context.trace_id:032x}", "span_id": f"{link.context.span_id:016x}"}
                  for link in span.links],
    }


class JsonLinesExporter:
    """`DANBAO_TRACING=file:/path`: appends each finished span to the file as a JSON line (one
    write per batch, O_APPEND, so several processes may share a file). For debugging and tests."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def export(self, spans) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        data = "".join(json.dumps(span_json(s), separators=(",", ":")) + "\n" for s in spans).encode()
        os.write(self.fd, data)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        os.close(self.fd)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


# ---------------------------------------------------------------- inject / extract
def header_pairs(headers: Any) -> Iterable[tuple[str, bytes]]:
    """A Kafka record's headers (aiokafka: tuples; faust: a list or a dict) as (key, bytes)."""
    if not headers:
        return ()
    items = headers.items() if hasattr(headers, "items") else headers
    return ((k, v if isinstance(v, bytes) else bytes(v or b"")) for k, v in items)


def trace_headers(headers: Any) -> list[tuple[str, bytes]]:
    """Just the traceparent / tracestate headers of a record, as they are (the risk engine
    copies them onto its decision)."""
    return [(k, v) for k, v in header_pairs(headers) if k in TRACE_HEADERS]


def headers_of(span_context: SpanContext) -> list[tuple[str, bytes]]:
    """traceparent (and tracestate) headers for a span context; none for an invalid one."""
    if not span_context.is_valid:
        return []
    out = [("traceparent", f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-"
                           f"{int(span_context.trace_flags):02x}".encode())]
    if span_context.trace_state:
        out.append(("tracestate", span_context.trace_state.to_header().encode()))
    return out


def inject() -> list[tuple[str, bytes]]:
    """The headers of the current span, if there is one."""
    return headers_of(trace.get_current_span().get_span_context())


_TRACEPARENT = re.compile(rb"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


def extract(headers: Any) -> SpanContext | None:
    """The (remote) span context a record's traceparent names; None without a valid one (W3C
    Trace Context: version ff, all-zero ids, or extra fields in version 00 are invalid). Parsed
    here rather than by the SDK's propagator: this runs for every record."""
    parent = state = None
    for k, v in header_pairs(headers):
        if k == "traceparent":
            parent = v
        elif k == "tracestate":
            state = v
    if parent is None:
        return None
    match = _TRACEPARENT.match(parent.strip())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == b"ff" or (version == b"00" and rest) or trace_id == b"0" * 32 or span_id == b"0" * 16:
        return None
    trace_state = None
    if state:
        try:
            trace_state = TraceState.from_header([state.decode("latin-1")])
        except Exception:  # a malformed tracestate is dropped, the traceparent still counts
            trace_state = None
    return SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=TraceFlags(int(flags, 16)),
                       trace_state=trace_state)


def _parent(sc: SpanContext | None) -> otel_context.Context:
    return trace.set_span_in_context(NonRecordingSpan(sc), _ROOT) if sc is not None else _ROOT


def log_ids(span_context: SpanContext) -> dict[str, str]:
    if not span_context.is_valid:
        return {}
    return {"trace_id": f"{span_context.trace_id:032x}", "span_id": f"{span_context.span_id:016x}"}


# ---------------------------------------------------------------- the outbox and its relay
def outbox_headers(envelope: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    """Headers for an outbox row written now: in a set-based run, the context of the record that
    caused the event (by causation id, else correlation id); otherwise the current span's."""
    contexts = _SET_CONTEXTS.get()
    if contexts is not None:
        sc = contexts.get(envelope.get("causation_id")) or contexts.get(envelope.get("correlation_id"))
        if sc is not None:
            return headers_of(sc)
    return inject()


def publishing(topic: str, headers: list[tuple[str, bytes]], key: bytes | None = None
               ) -> tuple[list[tuple[str, bytes]], Any]:
    """For the relay: a `send <topic>` producer span, child of the row's stored traceparent, and
    the headers with the producer span's traceparent in its place. (headers, None) for a row
    without a traceparent."""
    parent = extract(headers)
    if parent is None:
        return headers, None
    attributes = {"messaging.system": "kafka", "messaging.destination.name": topic}
    if key is not None:  # the order (or user) id: records are keyed by their aggregate
        attributes["messaging.kafka.message.key"] = key.decode("utf-8", "replace")
    span = _tracer.start_span(f"send {topic}", context=_parent(parent), kind=SpanKind.PRODUCER, attributes=attributes)
    own = headers_of(span.get_span_context())
    if not own:
        return headers, span
    return [("traceparent", own[0][1]) if k == "traceparent" else (k, v) for k, v in headers], span


def end_all(spans: list, error: BaseException | None = None) -> None:
    for span in spans:
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, repr(error)))
        span.end()


# ---------------------------------------------------------------- timers: work resumed later
def traceparent_for(event_id: str, correlation_id: str | None) -> str | None:
    """The traceparent to keep with state created now by record `event_id` (the payment row of
    an OrderPlaced, the hold of a HoldFunds, the reservation of a ReserveCredit), so that steps a timer drives later resume its trace: the context its
    outbox rows get (outbox_headers). None without one. Call with tracing on only."""
    for key, value in outbox_headers({"causation_id": event_id, "correlation_id": correlation_id}):
        if key == "traceparent":
            return value.decode("latin-1")
    return None


@contextlib.contextmanager
def resuming(traceparent: str | None, name: str, attributes: Mapping[str, Any]) -> Iterator[dict[str, str]]:
    """A span `name`, current while a timer works on something whose trace context was kept as
    `traceparent` (e.g. the saga worker on a payment), child of that context, so that what it
    emits stays in that trace. Nothing without a valid kept context (the work was not traced,
    or predates tracing): a timer's scans do not start traces of their own. Yields the ids to
    bind to the logs."""
    parent = extract((("traceparent", traceparent.encode("latin-1")),)) if traceparent else None
    if parent is None:
        yield {}
        return
    with _tracer.start_as_current_span(name, context=_parent(parent), kind=SpanKind.INTERNAL,
                                       attributes=dict(attributes)) as span:
        yield log_ids(span.get_span_context())


# ---------------------------------------------------------------- consumers
def _record_attributes(topic: str, record: Any, env: Any) -> dict[str, Any]:
    # Few attributes: each costs microseconds per record (the span name says `process`).
    attributes = {"messaging.system": "kafka", "messaging.destination.name": topic,
                  "messaging.message.id": env.event_id, "danbao.event_type": env.type}
    if env.correlation_id:
        attributes["messaging.message.conversation_id"] = env.correlation_id
    return attributes


@contextlib.contextmanager
def consuming(topic: str, record: Any, env: Any) -> Iterator[dict[str, str]]:
    """A `process <topic>` consumer span for one record, current while it is handled, child of
    the record's traceparent (a new trace without one). Yields the ids to bind to the logs."""
    with _tracer.start_as_current_span(f"process {topic}", context=_parent(extract(record.headers)),
                                       kind=SpanKind.CONSUMER, attributes=_record_attributes(topic, record, env)) as span:
        yield log_ids(span.get_span_context())


def failed(exc: BaseException) -> None:
    """Mark the current span failed (a handler raised and its record was dead-lettered)."""
    span = trace.get_current_span()
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def _order_key(d: Any) -> str | None:
    return getattr(d.data, "order_id", None) or d.env.correlation_id


@contextlib.contextmanager
def set_run(topic: str, event_type: str, run: list) -> Iterator[None]:
    """Around a set-based batch handler (`run`: the consumer's decoded records). Always: log lines
    naming one of the run's orders get its correlation_id (add_set_run_ids). With tracing on:
    one `process <topic>` span linked to every record's context; a record without a context
    gets a `receive <topic>` root span (its order's trace starts there); outbox rows written in
    the run carry their own record's context (outbox_headers)."""
    run_token = _SET_RUN.set(run)
    if not ENABLED:
        try:
            yield
        finally:
            _SET_RUN.reset(run_token)
        return
    contexts: dict[str, SpanContext] = {}
    links, roots = [], []
    for d in run:
        sc = extract(d.record.headers)
        if sc is None:
            root = _tracer.start_span(f"receive {topic}", context=_ROOT, kind=SpanKind.CONSUMER,
                                      attributes=_record_attributes(topic, d.record, d.env))
            roots.append(root)
            sc = root.get_span_context()
        links.append(Link(sc))
        contexts[d.env.event_id] = sc
        key = _order_key(d)
        if key is not None:
            contexts.setdefault(key, sc)
    contexts_token = _SET_CONTEXTS.set(contexts)
    error = None
    try:
        # A run of one record: its span is that record's child, as one by one.
        parent = trace.set_span_in_context(NonRecordingSpan(links[0].context), _ROOT) if len(run) == 1 else _ROOT
        with _tracer.start_as_current_span(
                f"process {topic}", context=parent, kind=SpanKind.CONSUMER, links=links,
                attributes={"messaging.system": "kafka",
                            "messaging.destination.name": topic, "messaging.batch.message_count": len(run),
                            "danbao.event_type": event_type, "danbao.set_path": True}):
            yield
    except BaseException as exc:
        error = exc
        raise
    finally:
        _SET_CONTEXTS.reset(contexts_token)
        _SET_RUN.reset(run_token)
        end_all(roots, error)


def add_set_run_ids(logger: Any, method: str, event_dict: dict) -> dict:
    """structlog processor: a line logged inside a set-based run that names one of its orders
    (order_id=...) gets that order's correlation_id (and, tracing on, its trace_id)."""
    run = _SET_RUN.get()
    if run is None or "correlation_id" in event_dict:
        return event_dict
    order_id = event_dict.get("order_id")
    if order_id is None:
        return event_dict
    for d in run:
        if getattr(d.data, "order_id", None) == order_id:
            event_dict["correlation_id"] = d.env.correlation_id or order_id
            event_dict.setdefault("event_id", d.env.event_id)
            sc = (_SET_CONTEXTS.get() or {}).get(d.env.event_id)
            if sc is not None:
                event_dict.setdefault("trace_id", f"{sc.trace_id:032x}")
            break
    return event_dict


# ---------------------------------------------------------------- HTTP
_CORRELATION = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def instrument_app(app: Any) -> None:
    """Every request binds its correlation_id (and, tracing on, trace_id) to the logs; with
    tracing on, the FastAPI instrumentation adds a server span per request (not /health,
    /metrics), continuing an incoming traceparent."""
    app.add_middleware(HttpLogContext)
    if ENABLED:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(app, tracer_provider=_provider, excluded_urls="/health,/metrics",
                                           exclude_spans=["receive", "send"])


def correlation_of(scope: dict, paths: Iterable[re.Pattern]) -> str | None:
    """A request's correlation id: its X-Correlation-ID header (when well-formed), else the
    first *_id of its path (the order or the user the request is about; order_id first)."""
    for name, value in scope.get("headers") or ():
        if name == b"x-correlation-id":
            text = value.decode("latin-1").strip()
            if _CORRELATION.match(text):
                return text
    path = scope.get("path", "")
    for pattern in paths:
        match = pattern.match(path)
        if match:
            params = match.groupdict()
            return params.get("order_id") or next((v for k, v in params.items() if k.endswith("_id")), None)
    return None


def id_paths(app: Any) -> list[re.Pattern]:
    """The app's path templates with an *_id in them, compiled once (from its OpenAPI paths:
    the routers' own matching does not expose path parameters before routing)."""
    paths = getattr(app.state, "danbao_id_paths", None)
    if paths is None:
        from starlette.routing import compile_path

        try:
            paths = [compile_path(p)[0] for p in app.openapi().get("paths", {}) if "_id}" in p]
        except Exception:  # no OpenAPI document: the header alone gives correlation ids
            paths = []
        app.state.danbao_id_paths = paths
    return paths


class HttpLogContext:
    """ASGI middleware: binds correlation_id and trace_id for the log lines of one request."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ids: dict[str, str] = {}
        app = scope.get("app")
        correlation = correlation_of(scope, id_paths(app) if app is not None else ())
        if correlation:
            ids["correlation_id"] = correlation
        if ENABLED:
            span = trace.get_current_span()
            ids.update(log_ids(span.get_span_context()))
            if correlation and span.is_recording():
                span.set_attribute("danbao.correlation_id", correlation)
        if not ids:
            await self.app(scope, receive, send)
            return
        with structlog.contextvars.bound_contextvars(**ids):
            await self.app(scope, receive, send)
