"""shared/tracing.py: settings, W3C inject/extract, the consumer and relay spans, the set-run
contexts for the outbox and the logs, the debugging exporter, and the HTTP log context."""
from __future__ import annotations

import contextlib

import json
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import structlog
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from shared import tracing
from shared.settings import SettingsError

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    tracing.enable("danbao-test", SimpleSpanProcessor(exporter))
    yield exporter
    tracing.shutdown()
    assert not tracing.ENABLED


def record(headers=(), offset=7):
    return SimpleNamespace(headers=tuple(headers), topic="escrow.commands", partition=2, offset=offset, key=b"o-1")


@dataclass
class Decoded:  # the consumer's _Decoded: record, envelope, data
    record: Any
    env: Any
    data: Any


def decoded(event_id: str, order_id: str, headers=(), correlation_id: str | None = None) -> Decoded:
    env = SimpleNamespace(event_id=event_id, type="HoldFunds", correlation_id=correlation_id)
    return Decoded(record(headers), env, SimpleNamespace(order_id=order_id))


# ---------------------------------------------------------------- settings
def test_off_by_default_and_on_with_an_otlp_endpoint():
    assert tracing.settings_from_env("escrow", {}).mode == "off"
    on = tracing.settings_from_env("escrow", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert (on.mode, on.service_name, on.ratio) == ("otlp", "danbao-escrow", 1.0)
    assert tracing.settings_from_env("escrow", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}).mode == "otlp"
    # An explicit off wins over an endpoint; so does the SDK's own switch.
    assert tracing.settings_from_env("escrow", {"DANBAO_TRACING": "off", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}).mode == "off"
    assert tracing.settings_from_env("escrow", {"DANBAO_TRACING": "on", "OTEL_SDK_DISABLED": "true"}).mode == "off"


def test_modes_ratio_and_service_name():
    assert tracing.settings_from_env("gateway", {"DANBAO_TRACING": "on"}).mode == "otlp"
    f = tracing.settings_from_env("gateway", {"DANBAO_TRACING": "file:/tmp/spans.jsonl", "DANBAO_TRACING_SAMPLE_RATIO": "0.25",
                                              "OTEL_SERVICE_NAME": "gw-eu"})
    assert (f.mode, f.path, f.ratio, f.service_name, f.describe()) == ("file", "/tmp/spans.jsonl", 0.25, "gw-eu",
                                                                       "file:/tmp/spans.jsonl")


@pytest.mark.parametrize("environ", [{"DANBAO_TRACING": "yes please"}, {"DANBAO_TRACING": "file:"},
                                     {"DANBAO_TRACING": "on", "DANBAO_TRACING_SAMPLE_RATIO": "2"},
                                     {"DANBAO_TRACING_SAMPLE_RATIO": "half"}])
def test_bad_settings_are_refused(environ):
    with pytest.raises(SettingsError, match="DANBAO_TRACING"):
        tracing.settings_from_env("gateway", environ)


def test_off_loads_nothing_and_creates_no_span():
    assert tracing.configure("gateway", {}).mode == "off"
    assert not tracing.ENABLED
    assert not trace.get_current_span().get_span_context().is_valid


# ---------------------------------------------------------------- inject / extract
def test_extract_reads_a_records_traceparent_in_any_header_shape():
    for headers in ([("traceparent", TRACEPARENT.encode())], {"traceparent": TRACEPARENT.encode()},
                    (("other", b"x"), ("traceparent", TRACEPARENT.encode()))):
        sc = tracing.extract(headers)
        assert (f"{sc.trace_id:032x}", f"{sc.span_id:016x}", sc.is_remote, sc.trace_flags.sampled) == (TRACE, PARENT, True, True)


@pytest.mark.parametrize("headers", [(), None, [("traceparent", b"garbage")], [("other", b"1")],
                                     [("traceparent", b"00-" + b"0" * 32 + b"-" + PARENT.encode() + b"-01")]])
def test_extract_gives_none_without_a_valid_traceparent(headers):
    assert tracing.extract(headers) is None


@pytest.mark.parametrize("value", [TRACEPARENT, f"00-{TRACE}-{PARENT}-00", f"01-{TRACE}-{PARENT}-01-extra",
                                   f"00-{TRACE}-{PARENT}-01-extra", f"ff-{TRACE}-{PARENT}-01", TRACEPARENT.upper(),
                                   f" {TRACEPARENT} ", f"00-{TRACE}-{'0' * 16}-01", f"00-{TRACE}-{PARENT}-1", ""])
def test_extract_agrees_with_the_sdks_w3c_propagator(value):
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {"traceparent": value, "tracestate": "a=1,b=2"}
    sdk = trace.get_current_span(TraceContextTextMapPropagator().extract(carrier)).get_span_context()
    ours = tracing.extract([(k, v.encode()) for k, v in carrier.items()])
    if not sdk.is_valid:
        assert ours is None
    else:
        assert (ours.trace_id, ours.span_id, ours.trace_flags, ours.trace_state.to_header(), ours.is_remote) == (
            sdk.trace_id, sdk.span_id, sdk.trace_flags, sdk.trace_state.to_header(), True)


def test_inject_and_extract_round_trip_with_tracestate(spans):
    headers = [("traceparent", TRACEPARENT.encode()), ("tracestate", b"vendor=abc,other=1")]
    with trace.get_tracer("t").start_as_current_span("x", context=tracing._parent(tracing.extract(headers))):
        out = dict(tracing.inject())
        current = trace.get_current_span().get_span_context()
    assert out["traceparent"].decode() == f"00-{TRACE}-{current.span_id:016x}-01"
    assert out["tracestate"] == b"vendor=abc,other=1"
    back = tracing.extract(out.items())
    assert (back.trace_id, back.span_id, back.trace_state.to_header()) == (current.trace_id, current.span_id,
                                                                           "vendor=abc,other=1")


def test_inject_outside_a_span_gives_no_headers():
    assert tracing.inject() == []
    assert tracing.outbox_headers({"causation_id": "e-1"}) == []


def test_trace_headers_keeps_only_the_trace_context_as_it_is():
    headers = [("a", b"1"), ("traceparent", TRACEPARENT.encode()), ("tracestate", b"k=v")]
    assert tracing.trace_headers(headers) == headers[1:]
    assert tracing.trace_headers(None) == []


# ---------------------------------------------------------------- consumers
def test_a_record_handled_one_by_one_gets_a_child_consumer_span(spans):
    env = SimpleNamespace(event_id="e-1", type="HoldFunds", correlation_id="o-1")
    with tracing.consuming("escrow.commands", record([("traceparent", TRACEPARENT.encode())]), env) as ids:
        headers = dict(tracing.outbox_headers({"causation_id": "e-1"}))
    [span] = spans.get_finished_spans()
    assert (span.name, span.kind, f"{span.context.trace_id:032x}", f"{span.parent.span_id:016x}") == (
        "process escrow.commands", SpanKind.CONSUMER, TRACE, PARENT)
    assert span.attributes["messaging.message.conversation_id"] == "o-1"
    assert span.attributes["messaging.message.id"] == "e-1"
    assert ids == {"trace_id": TRACE, "span_id": f"{span.context.span_id:016x}"}
    # What the handler writes to the outbox continues from the consumer span.
    assert headers["traceparent"].decode() == f"00-{TRACE}-{span.context.span_id:016x}-01"


def test_a_record_without_context_starts_a_trace_and_a_failure_is_recorded(spans):
    env = SimpleNamespace(event_id="e-2", type="HoldFunds", correlation_id=None)
    with tracing.consuming("escrow.commands", record(), env):
        tracing.failed(ValueError("boom"))
    [span] = spans.get_finished_spans()
    assert span.parent is None and span.context.trace_id != int(TRACE, 16)
    assert span.status.status_code.name == "ERROR" and span.events[0].name == "exception"


def test_a_set_run_links_every_record_and_its_rows_keep_their_own_trace(spans):
    traced = decoded("e-1", "o-1", [("traceparent", TRACEPARENT.encode())])
    untraced = decoded("e-2", "o-2", correlation_id="o-2")
    with tracing.set_run("escrow.commands", "HoldFunds", [traced, untraced]):
        by_cause = dict(tracing.outbox_headers({"causation_id": "e-1", "correlation_id": "o-1"}))
        by_order = dict(tracing.outbox_headers({"causation_id": "other", "correlation_id": "o-2"}))
        neither = dict(tracing.outbox_headers({"causation_id": "x", "correlation_id": "y"}))
        batch = trace.get_current_span().get_span_context()
    assert tracing.outbox_headers({"causation_id": "e-1"}) == []  # the run's contexts are gone after it
    finished = {s.name: s for s in spans.get_finished_spans()}
    root, batch_span = finished["receive escrow.commands"], finished["process escrow.commands"]
    assert root.parent is None and batch_span.parent is None
    assert batch_span.attributes["messaging.batch.message_count"] == 2
    assert {(link.context.trace_id, link.context.span_id) for link in batch_span.links} == {
        (int(TRACE, 16), int(PARENT, 16)), (root.context.trace_id, root.context.span_id)}
    assert by_cause["traceparent"].decode() == TRACEPARENT  # the record's own context
    assert by_order["traceparent"] == tracing.headers_of(root.context)[0][1]
    assert by_order["traceparent"].decode().startswith(f"00-{root.context.trace_id:032x}-{root.context.span_id:016x}-")
    assert neither["traceparent"] == tracing.headers_of(batch)[0][1]


def test_log_lines_about_an_order_of_a_set_run_get_its_ids(spans):
    traced = decoded("e-1", "o-1", [("traceparent", TRACEPARENT.encode())], correlation_id="c-1")
    with tracing.set_run("escrow.commands", "HoldFunds", [decoded("e-0", "o-0"), traced]):
        line = tracing.add_set_run_ids(None, "info", {"event": "x", "order_id": "o-1"})
        other = tracing.add_set_run_ids(None, "info", {"event": "x", "order_id": "o-9"})
    assert (line["correlation_id"], line["event_id"], line["trace_id"]) == ("c-1", "e-1", TRACE)
    assert "correlation_id" not in other
    assert "correlation_id" not in tracing.add_set_run_ids(None, "info", {"event": "x", "order_id": "o-1"})


def test_set_run_ids_in_logs_with_tracing_off():
    with tracing.set_run("escrow.commands", "HoldFunds", [decoded("e-1", "o-1")]):
        line = tracing.add_set_run_ids(None, "info", {"event": "x", "order_id": "o-1"})
    assert line == {"event": "x", "order_id": "o-1", "correlation_id": "o-1", "event_id": "e-1"}


# ---------------------------------------------------------------- timers: work resumed later
def test_the_context_kept_for_later_is_the_one_the_records_rows_get(spans):
    env = SimpleNamespace(event_id="e-1", type="OrderPlaced", correlation_id="o-1")
    with tracing.consuming("orders.events", record([("traceparent", TRACEPARENT.encode())]), env):
        kept = tracing.traceparent_for("e-1", "o-1")
        rows = dict(tracing.outbox_headers({"causation_id": "e-1", "correlation_id": "o-1"}))
    assert kept == rows["traceparent"].decode() and kept.startswith(f"00-{TRACE}-")
    # In a set-based run, each order keeps its own record's context, not the run's span.
    traced = decoded("e-2", "o-2", [("traceparent", TRACEPARENT.encode())])
    with tracing.set_run("orders.events", "OrderPlaced", [decoded("e-3", "o-3", correlation_id="o-3"), traced]):
        assert tracing.traceparent_for("e-2", "o-2") == TRACEPARENT
        other = tracing.traceparent_for("e-3", "o-3")
    receive = next(s for s in spans.get_finished_spans() if s.name == "receive orders.events")
    assert other.startswith(f"00-{receive.context.trace_id:032x}-{receive.context.span_id:016x}-")
    assert tracing.traceparent_for("e-9", "o-9") is None  # outside any span: nothing to keep


def test_a_timer_step_resumes_the_kept_context_and_its_rows_stay_in_it(spans):
    with tracing.resuming(TRACEPARENT, "saga step", {"danbao.saga_state": "FUNDING"}) as ids:
        headers = dict(tracing.outbox_headers({"causation_id": None, "correlation_id": "o-1"}))
    [span] = spans.get_finished_spans()
    assert (span.name, span.kind, f"{span.context.trace_id:032x}", f"{span.parent.span_id:016x}") == (
        "saga step", SpanKind.INTERNAL, TRACE, PARENT)
    assert span.attributes["danbao.saga_state"] == "FUNDING"
    assert ids == {"trace_id": TRACE, "span_id": f"{span.context.span_id:016x}"}
    assert headers["traceparent"].decode() == f"00-{TRACE}-{span.context.span_id:016x}-01"


@pytest.mark.parametrize("kept", [None, "", "garbage", f"00-{'0' * 32}-{PARENT}-01"])
def test_a_timer_step_without_a_kept_context_starts_no_trace(spans, kept):
    with tracing.resuming(kept, "saga step", {}) as ids:
        assert tracing.inject() == []
    assert ids == {} and spans.get_finished_spans() == ()


def test_payments_keep_their_context_only_with_tracing_on():
    """The set path's payment rows (services/gateway/store.py, written by `place_orders`) keep no
    trace context when tracing is off; on, each payment gets its own traceparent in the same order."""
    from datetime import datetime, timezone

    from services.gateway import saga, store
    from shared.events import OrderPlaced

    now = datetime(2026, 11, 29, tzinfo=timezone.utc)
    payments = [saga.Payment.new(OrderPlaced(order_id=o, buyer_id="b", seller_id="s", amount=100, currency="CNY",
                                             payment_method="balance"), f"e-{o}", now) for o in ("o-1", "o-2")]
    off = store._payment_rows(payments, now, None)
    on = store._payment_rows(payments, now, [TRACEPARENT, None])
    assert [r["traceparent"] for r in off] == [None, None]
    assert [r["traceparent"] for r in on] == [TRACEPARENT, None]
    assert [r["order_id"] for r in on] == ["o-1", "o-2"] and on[0]["accepted_at"] == now
    with pytest.raises(ValueError):
        store._payment_rows(payments, now, [TRACEPARENT])


# Escrow's auto-confirm and credit's expiry resume the order's trace the same way.
def _pool() -> SimpleNamespace:
    """A stand-in pool whose acquire() yields a fresh _Conn."""
    @contextlib.asynccontextmanager
    async def acquire():
        yield _Conn()
    return SimpleNamespace(acquire=acquire)


class _Conn:
    """Records the statements the escrow store sends (execute, executemany)."""

    def __init__(self):
        self.calls = []

    async def execute(self, sql, *args):
        self.calls.append((sql, args))

    async def executemany(self, sql, rows):
        self.calls.append((sql, rows))

    def transaction(self):
        return _Nothing()


class _Nothing:
    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False


def _hold(order_id: str):
    from shared.events import HoldFunds

    return HoldFunds(order_id=order_id, payment_id=f"p-{order_id}", buyer_id="b", seller_id="s", amount=100,
                     payment_method="balance", installments=1, auto_confirm_days=1)


async def test_holds_keep_their_context_only_with_tracing_on():
    """escrow's save is the statement it was when tracing is off, save_many keeps no context;
    on, a new hold gets its traceparent (an existing row keeps its own: the upsert does not touch it)."""
    import json
    from datetime import datetime, timezone

    from services.escrow import domain, store

    now = datetime(2026, 11, 29, tzinfo=timezone.utc)
    escrows = [domain.on_hold(None, _hold(o)).escrow for o in ("o-1", "o-2")]
    conn = _Conn()
    await store.save(conn, escrows[0], now)
    await store.save(conn, escrows[0], now, TRACEPARENT)
    await store.save_many(conn, escrows, now)
    await store.save_many(conn, escrows, now, [TRACEPARENT, None])
    (off, off_args), (on, on_args), (many_off, (off_json, _)), (many_on, (on_json, _)) = conn.calls
    assert off == store._SAVE and "traceparent" not in off
    assert on == store._SAVE_TRACED and on_args[-1] == TRACEPARENT
    assert many_off == many_on == store._SAVE_MANY
    assert [r["traceparent"] for r in json.loads(off_json)] == [None, None]
    assert [r["traceparent"] for r in json.loads(on_json)] == [TRACEPARENT, None]
    for sql in (on, many_on):
        assert "traceparent = " not in sql.split("DO UPDATE", 1)[1]


@pytest.mark.parametrize("traced", [False, True])
async def test_the_set_path_gives_each_new_hold_its_own_records_context(traced, monkeypatch):
    from datetime import datetime, timezone

    from services.escrow import handlers, store
    from shared import ledger, outbox

    saved = []

    async def nothing(*args, **kwargs):
        return {}

    async def save_many(conn, escrows, now, traceparents=None, emit=()):
        saved.append(([e.order_id for e in escrows], traceparents))
        assert [key for _, key, _ in emit] == ["o-1", "o-2"]  # each new hold's FundsHeld, in the same statement

    monkeypatch.setattr(store, "lock_many", nothing)
    monkeypatch.setattr(store, "save_many", save_many)
    monkeypatch.setattr(ledger, "transfer_many", nothing)
    monkeypatch.setattr(outbox, "add_many", nothing)
    ctx = SimpleNamespace(clock=SimpleNamespace(now=lambda: datetime(2026, 11, 29, tzinfo=timezone.utc)))
    items = [(SimpleNamespace(event_id=f"e-{o}", correlation_id=o), _hold(o)) for o in ("o-1", "o-2")]
    if traced:
        exporter = InMemorySpanExporter()
        tracing.enable("danbao-test", SimpleSpanProcessor(exporter))
    try:
        run = [decoded("e-o-1", "o-1"), decoded("e-o-2", "o-2", [("traceparent", TRACEPARENT.encode())])]
        with tracing.set_run("escrow.commands", "HoldFunds", run):
            assert await handlers.holds(ctx, _Conn(), items) == []
    finally:
        tracing.shutdown()
    [(orders, traceparents)] = saved
    assert orders == ["o-1", "o-2"]
    if not traced:
        assert traceparents is None
        return
    receive = next(s for s in exporter.get_finished_spans() if s.name == "receive escrow.commands")
    assert traceparents[0].startswith(f"00-{receive.context.trace_id:032x}-") and traceparents[1] == TRACEPARENT


@pytest.mark.parametrize("traced", [False, True])
async def test_auto_confirm_resumes_each_holds_kept_context(traced, monkeypatch):
    """Each due hold is released inside its own kept context (none for a hold kept without one);
    with tracing off, no span and no lookup at all."""
    from datetime import datetime, timezone

    from services.escrow import domain, handlers, store

    held = [domain.on_hold(None, _hold(o)).escrow for o in ("o-1", "o-2")]

    async def lock_due(conn, now, limit):
        return [(held[0], TRACEPARENT), (held[1], None)]

    seen = {}

    async def apply(ctx, conn, order_id, decision, cause, traceparent=None):
        seen[order_id] = dict(tracing.inject()).get("traceparent")

    monkeypatch.setattr(store, "lock_due", lock_due)
    monkeypatch.setattr(handlers, "apply", apply)
    ctx = SimpleNamespace(clock=SimpleNamespace(now=lambda: datetime(2026, 11, 29, tzinfo=timezone.utc)),
                          pool=_pool())
    if traced:
        exporter = InMemorySpanExporter()
        tracing.enable("danbao-test", SimpleSpanProcessor(exporter))
    try:
        assert await handlers.release_due(ctx, domain.FeeRates.from_env({})) == (2, 2)
    finally:
        tracing.shutdown()
    if not traced:
        assert seen == {"o-1": None, "o-2": None}
        return
    [span] = exporter.get_finished_spans()
    assert (span.name, f"{span.parent.span_id:016x}", span.attributes["danbao.correlation_id"]) == (
        "auto-confirm", PARENT, "o-1")
    assert seen == {"o-1": f"00-{TRACE}-{span.context.span_id:016x}-01".encode(), "o-2": None}



async def test_reservation_expiry_resumes_each_reservations_kept_context(spans, monkeypatch):
    from datetime import datetime, timezone

    from services.credit import handlers, store

    now = datetime(2026, 11, 29, tzinfo=timezone.utc)
    rows = [{"order_id": o, "user_id": "u", "amount": 100, "installments": 1, "state": "reserved", "expires_at": now,
             "reason_code": None, "message": None, "committed_at": None, "traceparent": t}
            for o, t in (("o-1", TRACEPARENT), ("o-2", None))]
    seen = {}

    async def expired_reservations(conn, at, limit):
        return rows

    async def apply(ctx, conn, d, user_id, order_id, **kwargs):
        seen[order_id] = dict(tracing.inject()).get("traceparent")

    monkeypatch.setattr(store, "expired_reservations", expired_reservations)
    monkeypatch.setattr(handlers, "_apply", apply)
    ctx = SimpleNamespace(clock=SimpleNamespace(now=lambda: now), pool=_pool())
    assert await handlers.expire_reservations(ctx) == 2
    [span] = spans.get_finished_spans()
    assert (span.name, f"{span.parent.span_id:016x}", span.attributes["danbao.correlation_id"]) == (
        "reservation expiry", PARENT, "o-1")
    assert seen == {"o-1": f"00-{TRACE}-{span.context.span_id:016x}-01".encode(), "o-2": None}


# ---------------------------------------------------------------- the relay
def test_the_relay_sends_the_producer_spans_traceparent_in_place(spans):
    stored = [("traceparent", TRACEPARENT.encode()), ("error.code", b"HANDLER_ERROR")]
    headers, span = tracing.publishing("escrow.events", stored, b"o-1")
    tracing.end_all([span])
    [finished] = spans.get_finished_spans()
    assert finished.attributes["messaging.kafka.message.key"] == "o-1"
    assert (finished.name, finished.kind, f"{finished.parent.span_id:016x}") == ("send escrow.events",
                                                                                 SpanKind.PRODUCER, PARENT)
    assert headers == [("traceparent", f"00-{TRACE}-{finished.context.span_id:016x}-01".encode()),
                       ("error.code", b"HANDLER_ERROR")]
    assert tracing.publishing("escrow.events", [("a", b"1")]) == ([("a", b"1")], None)


def test_an_unsampled_trace_is_propagated_but_not_recorded():
    exporter = InMemorySpanExporter()
    tracing.enable("danbao-test", SimpleSpanProcessor(exporter), ratio=0.0)
    try:
        unsampled = f"00-{TRACE}-{PARENT}-00"
        headers, span = tracing.publishing("escrow.events", [("traceparent", unsampled.encode())])
        tracing.end_all([span])
        env = SimpleNamespace(event_id="e-1", type="HoldFunds", correlation_id="o-1")
        with tracing.consuming("escrow.commands", record(), env) as ids:  # a new trace, not chosen
            pass
    finally:
        tracing.shutdown()
    assert exporter.get_finished_spans() == ()
    assert headers[0][1].decode().startswith(f"00-{TRACE}-") and headers[0][1].decode().endswith("-00")
    assert "trace_id" in ids  # the logs still name the trace


def test_database_calls_outside_a_trace_are_not_recorded(spans):
    tracer = tracing._tracer
    assert not tracer.start_span("SELECT", kind=SpanKind.CLIENT).is_recording()
    with tracer.start_as_current_span("process x", kind=SpanKind.CONSUMER):
        assert tracer.start_span("SELECT", kind=SpanKind.CLIENT).is_recording()


# ---------------------------------------------------------------- the debugging exporter
def test_the_file_exporter_writes_one_json_line_per_span(tmp_path):
    path = tmp_path / "spans.jsonl"
    tracing.enable("danbao-escrow", SimpleSpanProcessor(tracing.JsonLinesExporter(str(path))))
    try:
        env = SimpleNamespace(event_id="e-1", type="HoldFunds", correlation_id="o-1")
        with tracing.consuming("escrow.commands", record([("traceparent", TRACEPARENT.encode())]), env):
            pass
        with tracing.set_run("escrow.commands", "HoldFunds", [decoded("e-2", "o-2")]):
            pass
    finally:
        tracing.shutdown()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["name"] for line in lines] == ["process escrow.commands", "process escrow.commands",
                                                "receive escrow.commands"]
    first = lines[0]
    assert (first["service"], first["trace_id"], first["parent_span_id"], first["kind"], first["status"]) == (
        "danbao-escrow", TRACE, PARENT, "CONSUMER", "UNSET")
    assert first["attributes"]["messaging.destination.name"] == "escrow.commands"
    assert lines[1]["links"] == [{"trace_id": lines[2]["trace_id"], "span_id": lines[2]["span_id"]}]


# ---------------------------------------------------------------- HTTP
def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/v1/users/{user_id}/statements/{statement_id}")
    async def statements(user_id: str, statement_id: str):
        return structlog.contextvars.get_contextvars()

    @app.get("/admin/payments/{order_id}")
    async def payment(order_id: str):
        return structlog.contextvars.get_contextvars()

    tracing.instrument_app(app)
    return app


async def _get(app: FastAPI, path: str, **headers) -> dict:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        response = await client.get(path, headers=headers)
    assert response.status_code == 200
    return response.json()


async def test_http_requests_bind_their_correlation_id_with_tracing_off():
    app = _app()
    assert await _get(app, "/v1/users/u-1/statements/s-1") == {"correlation_id": "u-1"}
    assert await _get(app, "/admin/payments/o-1") == {"correlation_id": "o-1"}
    assert await _get(app, "/admin/payments/o-1", **{"X-Correlation-ID": "shop-42"}) == {"correlation_id": "shop-42"}
    assert await _get(app, "/admin/payments/o-1", **{"X-Correlation-ID": "bad id\t"}) == {"correlation_id": "o-1"}


async def test_http_requests_continue_an_incoming_trace_and_log_its_id(spans):
    app = _app()
    ids = await _get(app, "/admin/payments/o-7", traceparent=TRACEPARENT)
    [server] = [s for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert (f"{server.context.trace_id:032x}", f"{server.parent.span_id:016x}") == (TRACE, PARENT)
    assert ids == {"correlation_id": "o-7", "trace_id": TRACE, "span_id": f"{server.context.span_id:016x}"}
    assert server.attributes["danbao.correlation_id"] == "o-7"
