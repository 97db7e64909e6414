"""Tracing across HTTP, the outbox, Kafka and every consumer (shared/tracing.py): the services
run with DANBAO_TRACING=file:<spans.jsonl> (the debugging exporter), and one order's spans, in
three services and the risk engine's hop, share one trace id; its log lines carry its
correlation_id and that trace id. The services are restarted without tracing afterwards."""
from __future__ import annotations

import asyncio
import json
import secrets
import uuid

import pytest

from deploy.ops import story
from tests.integration.conftest import LOGS, envelope, eventually, new_id

TRACED = ("gateway", "escrow", "credit")


@pytest.fixture
async def spans_file(services):
    path = LOGS / f"test-spans-{uuid.uuid4().hex[:8]}.jsonl"
    await asyncio.gather(*(services[n].restart(DANBAO_TRACING=f"file:{path}") for n in TRACED))
    try:
        yield path
    finally:
        await asyncio.gather(*(services[n].restart() for n in TRACED))  # back to the session's settings


def read_spans(path) -> list[dict]:
    """The spans written so far: complete lines only (a service may be in the middle of appending
    one while the test reads)."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]


def log_lines(service: str, needle: str) -> list[dict]:
    out = []
    for line in (LOGS / f"test-{service}.log").read_text(errors="replace").splitlines():
        if needle in line and line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def shop_traceparent() -> tuple[str, str, str]:
    """A traceparent as an upstream shop that traces would send: (header, trace id, span id)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


async def send_traced(kafka, type_: str, data: dict, traceparent: str | None) -> None:
    headers = [("traceparent", traceparent.encode())] if traceparent else None
    await kafka.producer.send_and_wait("orders.events", json.dumps(envelope(type_, data)).encode(),
                                       key=data["order_id"].encode(), headers=headers)


async def test_http_request_to_consumer_is_one_trace(spans_file, api):
    traceparent, trace_id, span_id = shop_traceparent()
    user_id = new_id("u")
    response = await api("gateway").post("/v1/users", headers={"traceparent": traceparent}, json={
        "user_id": user_id, "full_name": "Traced User", "birth_date": "1990-01-01",
        "phone": f"139{uuid.uuid4().int % 10**8:08d}", "id_number": new_id("id").replace("-", ""),
        "real_name_verified": True})
    assert response.status_code == 201, response.text

    def names() -> set[tuple[str, str]]:
        return {(s["service"], s["name"]) for s in read_spans(spans_file) if s["trace_id"] == trace_id}

    async def arrived():
        return ("danbao-credit", "process users.events") in names()
    await eventually(arrived, timeout=60)
    got = names()
    assert {("danbao-gateway", "send users.events"), ("danbao-credit", "process users.events")} <= got
    server = [s for s in read_spans(spans_file) if s["trace_id"] == trace_id and s["kind"] == "SERVER"]
    assert len(server) == 1 and server[0]["service"] == "danbao-gateway"
    assert server[0]["parent_span_id"] == span_id
    # Database calls inside the request are its children; those outside any trace are not recorded.
    assert any(s["kind"] == "CLIENT" and s["parent_span_id"] == server[0]["span_id"] for s in read_spans(spans_file))
    assert all(s["parent_span_id"] for s in read_spans(spans_file) if s["kind"] == "CLIENT")

    # A top-up: its server span continues the caller's trace and names the user (the path's id).
    traceparent, trace_id, span_id = shop_traceparent()
    response = await api("gateway").post(f"/v1/wallets/{user_id}/top-ups", headers={"traceparent": traceparent},
                                         json={"amount": 5_000, "card_token": "tok_visa", "idempotency_key": new_id("k")})
    assert response.status_code == 201, response.text

    async def top_up_span():
        return [s for s in read_spans(spans_file) if s["trace_id"] == trace_id and s["kind"] == "SERVER"]
    [server] = await eventually(top_up_span, timeout=10)
    assert server["parent_span_id"] == span_id and server["attributes"]["danbao.correlation_id"] == user_id


async def test_one_orders_spans_and_logs_share_its_trace(spans_file, shop, kafka):
    buyer = await shop.user("buyer", balance=50_000)
    seller = await shop.user("seller")
    order_id = new_id("o")
    traceparent, trace_id, shop_span = shop_traceparent()
    since = await kafka.end_offsets("payments.events")
    # The shipment first (parked until its order arrives: logged), then the order, both traced by the shop.
    await send_traced(kafka, "OrderShipped", {"order_id": order_id}, traceparent)
    await asyncio.sleep(1)
    await send_traced(kafka, "OrderPlaced", {"order_id": order_id, "buyer_id": buyer, "seller_id": seller,
                                             "amount": 12_000, "currency": "CNY", "payment_method": "balance"},
                      traceparent)
    assert [e["type"] for e in await shop.events(order_id, 1, timeout=60)] == ["PaymentSucceeded"]

    expected = {("danbao-gateway", "process orders.events"), ("danbao-gateway", "send risk.requests"),
                ("danbao-gateway", "process risk.decisions"), ("danbao-gateway", "send escrow.commands"),
                ("danbao-escrow", "process escrow.commands"), ("danbao-escrow", "send escrow.events"),
                ("danbao-gateway", "process escrow.events"), ("danbao-gateway", "send payments.events")}

    async def complete():
        got = {(s["service"], s["name"]) for s in read_spans(spans_file) if s["trace_id"] == trace_id}
        return expected <= got and got
    await eventually(complete, timeout=30)
    trace = [s for s in read_spans(spans_file) if s["trace_id"] == trace_id]
    consumed = [s for s in trace if s["name"] == "process orders.events"]
    assert len(consumed) == 2 and all(s["parent_span_id"] == shop_span for s in consumed)
    held = [s for s in trace if s["name"] == "process escrow.commands"]
    assert {s["attributes"]["danbao.event_type"] for s in held} >= {"HoldFunds", "ShipOrder"}
    assert "FundsHeld" in [s["attributes"]["danbao.event_type"] for s in trace if s["name"] == "process escrow.events"]
    # Each consumer span's parent is the send span of its record (or the shop's span); the risk
    # engine passes the request's traceparent on to its decision.
    by_id = {s["span_id"]: s for s in trace}
    for s in trace:
        if s["name"].startswith("process ") and s["parent_span_id"] != shop_span:
            topic = s["name"].split(" ", 1)[1]
            assert by_id[s["parent_span_id"]]["name"] == "send " + {"risk.decisions": "risk.requests"}.get(topic, topic), s
    # The public outcome carries the order's trace to the shop.
    records = await kafka.read("payments.events", since, lambda rs: any(order_id.encode() == r.key for r in rs))
    [outcome] = [r for r in records if r.key == order_id.encode()]
    assert dict(outcome.headers)["traceparent"].decode().split("-")[1] == trace_id

    lines = log_lines("gateway", order_id)
    events = {line["event"] for line in lines}
    assert {"order event parked until its order arrives", "parked order event released"} <= events, lines
    for line in lines:
        assert line["correlation_id"] == order_id and line["trace_id"] == trace_id, line


async def test_a_card_orders_worker_driven_steps_stay_in_its_trace(spans_file, shop, kafka, ops_env):
    """The saga worker charges a card and times a silent channel out on its own timer, outside
    any consumed record: each step resumes the order's trace kept on its payment, so the hold,
    escrow's answer and the outcome are in the order's one trace."""
    buyer, seller = await shop.user("buyer"), await shop.user("seller")
    paid, silent = new_id("o"), new_id("o")
    traces = {}
    since = await kafka.end_offsets("payments.events")
    for order_id, token in ((paid, "tok_visa"), (silent, "tok_timeout")):
        traceparent, trace_id, shop_span = shop_traceparent()
        traces[order_id] = (trace_id, shop_span)
        await send_traced(kafka, "OrderPlaced", {"order_id": order_id, "buyer_id": buyer, "seller_id": seller,
                                                 "amount": 3_000, "currency": "CNY", "payment_method": "bank_card",
                                                 "card_token": token}, traceparent)
    assert [e["type"] for e in await shop.events(paid, 1, timeout=60)] == ["PaymentSucceeded"]

    def trace_of(order_id: str) -> list[dict]:
        return [s for s in read_spans(spans_file) if s["trace_id"] == traces[order_id][0]]

    # (The two OrderPlaced may be applied as a set: then the `process orders.events` span is linked
    # to the order's trace rather than in it; see the set test below.)
    expected = {("danbao-gateway", "send risk.requests"),
                ("danbao-gateway", "process risk.decisions"), ("danbao-gateway", "saga step"),
                ("danbao-gateway", "send escrow.commands"), ("danbao-escrow", "process escrow.commands"),
                ("danbao-escrow", "send escrow.events"), ("danbao-gateway", "process escrow.events"),
                ("danbao-gateway", "send payments.events")}

    async def complete():
        got = {(s["service"], s["name"]) for s in trace_of(paid)}
        return expected <= got and got
    await eventually(complete, timeout=30)
    trace = trace_of(paid)
    by_id = {s["span_id"]: s for s in trace}
    assert [s for s in read_spans(spans_file) if s["name"] == "process orders.events" and traces[paid][0] in
            {s["trace_id"], *(link["trace_id"] for link in s["links"])}]
    # Each worker step is a child of the order's context (the record, or the span that consumed
    # it); the hold sent once the card is authorized is the FUNDING step's child. (A slow risk
    # engine or escrow would add a timeout or re-send step: the checks allow for them.)
    steps = [s for s in trace if s["name"] == "saga step"]
    for step in steps:
        assert step["parent_span_id"] == traces[paid][1] or by_id[step["parent_span_id"]]["name"] == "process orders.events"
        assert step["attributes"]["danbao.correlation_id"] == paid
    charged = {s["span_id"] for s in steps if s["attributes"]["danbao.saga_state"] == "FUNDING"}
    assert [s for s in trace if s["name"] == "send escrow.commands" and s["parent_span_id"] in charged]
    assert "HoldFunds" in [s["attributes"]["danbao.event_type"] for s in trace if s["name"] == "process escrow.commands"]
    # The order's story names its trace (kept on the payment), to look it up in a tracing backend.
    assert (await story.order_story(paid))["status"]["gateway"]["trace_id"] == traces[paid][0]

    # The silent channel: the worker asks the bank again every second (no answer yet), each time
    # in the order's trace; the timeout it decides once the clock has passed the deadline (30 s,
    # moved on here if it has not come yet) is too, and so is its outcome.
    async def looked_at():
        return [s for s in trace_of(silent) if s["name"] == "saga step"]
    await eventually(looked_at, timeout=30)
    if silent not in shop.outcomes.by_order:
        await shop.advance_clock(31)
    [failed] = await shop.events(silent, 1, timeout=60)
    assert failed["data"]["reason_code"] == "CHANNEL_TIMEOUT"

    async def outcome_sent():
        return [s for s in trace_of(silent) if s["name"] == "send payments.events"]
    [sent] = await eventually(outcome_sent, timeout=30)
    steps = {s["span_id"]: s for s in trace_of(silent) if s["name"] == "saga step"}
    assert sent["parent_span_id"] in steps and len(steps) >= 2
    records = await kafka.read("payments.events", since, lambda rs: any(silent.encode() == r.key for r in rs))
    [outcome] = [r for r in records if r.key == silent.encode()]
    assert dict(outcome.headers)["traceparent"].decode().split("-")[1] == traces[silent][0]


async def test_orders_applied_as_a_set_each_keep_their_own_trace(spans_file, shop, kafka, services):
    buyer = await shop.user("buyer", balance=200_000)
    seller = await shop.user("seller")
    # Published while the gateway is down, so that it takes them in one batch: a set-based run.
    services["gateway"].kill()
    orders = [new_id("o") for _ in range(12)]
    for order_id in orders:
        await send_traced(kafka, "OrderPlaced", {"order_id": order_id, "buyer_id": buyer, "seller_id": seller,
                                                 "amount": 1_000, "currency": "CNY", "payment_method": "balance"},
                          None)
    await services["gateway"].restart(DANBAO_TRACING=f"file:{spans_file}")
    for order_id in orders:
        assert [e["type"] for e in await shop.events(order_id, 1, timeout=60, settle=0)] == ["PaymentSucceeded"]

    def about(order_id: str, spans: list[dict]) -> list[dict]:
        return [s for s in spans if order_id in (s["attributes"].get("messaging.message.conversation_id"),
                                                 s["attributes"].get("messaging.kafka.message.key"))]

    async def sent():
        spans = read_spans(spans_file)
        return all(any(s["name"] == "send payments.events" for s in about(o, spans)) for o in orders) and spans
    spans = await eventually(sent, timeout=30)
    traces = set()
    for order_id in orders:
        mine = about(order_id, spans)
        ids = {s["trace_id"] for s in mine}
        assert len(ids) == 1, (order_id, mine)  # every span naming the order is in one trace
        # (risk.requests is keyed by buyer: its spans are in the trace, but do not name the order)
        assert {"send escrow.commands", "send payments.events"} <= {s["name"] for s in mine}
        traces |= ids
    assert len(traces) == len(orders)  # and each order has its own
    # The set-based run: one span linked to the orders' traces (the orders started at `receive`).
    sets = [s for s in spans if s["name"] == "process orders.events" and s["attributes"].get("danbao.set_path")]
    assert sets and max(len(s["links"]) for s in sets) > 1
    linked = {link["trace_id"] for s in sets for link in s["links"]}
    receive = {s["trace_id"] for s in spans if s["name"] == "receive orders.events"}
    assert linked & traces and linked & traces <= receive


async def test_timer_driven_releases_and_expiries_stay_in_the_orders_trace(spans_file, shop, kafka):
    """Escrow's auto-confirm and credit's reservation expiry act on an order later, on their own
    timers: each resumes the order's trace kept on the hold (the reservation), so the release,
    the EscrowReleased it emits and the FundsReleased outcome, and the freed credit, are in the
    order's trace."""
    buyer, seller = await shop.user("buyer", balance=5_000), await shop.user("seller")
    order_id = new_id("o")
    traceparent, trace_id, _ = shop_traceparent()
    since = await kafka.end_offsets("payments.events")
    await send_traced(kafka, "OrderPlaced", {"order_id": order_id, "buyer_id": buyer, "seller_id": seller,
                                             "amount": 1_000, "currency": "CNY", "payment_method": "balance",
                                             "auto_confirm_days": 1}, traceparent)
    assert [e["type"] for e in await shop.events(order_id, 1, timeout=60)] == ["PaymentSucceeded"]
    await shop.send("OrderShipped", {"order_id": order_id})  # untraced: the timer's trace is the hold's

    async def timer_set():
        return (await shop.escrow(order_id)).get("auto_confirm_at")
    await eventually(timer_set, timeout=30)

    # A Huabei reservation nobody commits (a gateway that went away): credit's timer expires it.
    huabei = await shop.user("hb")
    await shop.activate(huabei)
    reserved = new_id("o")
    reserve_parent, reserve_trace, _ = shop_traceparent()
    await kafka.producer.send_and_wait(
        "credit.commands", json.dumps(envelope("ReserveCredit", {"order_id": reserved, "user_id": huabei,
                                                                 "amount": 1_000, "installments": 1})).encode(),
        key=reserved.encode(), headers=[("traceparent", reserve_parent.encode())])

    async def line_reserved():
        return (await shop.huabei(huabei))["reserved"] == 1_000
    await eventually(line_reserved, timeout=30)

    await shop.advance_clock(86_400 + 1)  # past the auto-confirm time and the reservation's expiry
    events = await shop.events(order_id, 2, timeout=60)
    assert [(e["type"], e["data"].get("trigger")) for e in events] == [("PaymentSucceeded", None),
                                                                        ("FundsReleased", "auto_confirm")]

    def trace_of(trace: str) -> list[dict]:
        return [s for s in read_spans(spans_file) if s["trace_id"] == trace]

    async def released():
        trace = trace_of(trace_id)
        return [s for s in trace if s["name"] == "process escrow.events"
                and s["attributes"]["danbao.event_type"] == "EscrowReleased"] and trace
    trace = await eventually(released, timeout=30)
    by_id = {s["span_id"]: s for s in trace}
    [auto] = [s for s in trace if s["name"] == "auto-confirm"]
    assert auto["service"] == "danbao-escrow" and auto["attributes"]["danbao.correlation_id"] == order_id
    # The hold's context: its HoldFunds record, or the span that consumed it.
    assert by_id[auto["parent_span_id"]]["name"] in ("send escrow.commands", "process escrow.commands")
    assert [s for s in trace if s["name"] == "send escrow.events" and s["parent_span_id"] == auto["span_id"]]
    records = await kafka.read("payments.events", since,
                               lambda rs: len([r for r in rs if r.key == order_id.encode()]) >= 2)
    outcomes = [r for r in records if r.key == order_id.encode()]
    assert [dict(r.headers)["traceparent"].decode().split("-")[1] for r in outcomes] == [trace_id, trace_id]

    async def expired():
        return (await shop.huabei(huabei))["reserved"] == 0 and \
            [s for s in trace_of(reserve_trace) if s["name"] == "reservation expiry"]
    [expiry] = await eventually(expired, timeout=30)
    assert expiry["service"] == "danbao-credit" and expiry["attributes"]["danbao.correlation_id"] == reserved
    assert expiry["parent_span_id"] in {s["span_id"] for s in trace_of(reserve_trace)
                                        if s["name"] == "process credit.commands"} | {reserve_parent.split("-")[2]}
    # Its statements (the freed credit) are its children.
    assert [s for s in trace_of(reserve_trace) if s["kind"] == "CLIENT" and s["parent_span_id"] == expiry["span_id"]]
