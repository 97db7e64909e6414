"""orders.events intake: bad records go to orders.events.dlq byte for byte with error headers,
later good records are still processed, and a duplicate delivery has effect once."""
from __future__ import annotations

import json

from tests.integration.conftest import envelope, eventually, new_id, payments_of


def order(order_id: str, **over) -> dict:
    return {"order_id": order_id, "buyer_id": "buyer-1", "seller_id": "seller-1", "amount": 12_345,
            "currency": "CNY", "payment_method": "balance", **over}


async def test_bad_records_are_dead_lettered_and_good_ones_still_processed(services, kafka, api):
    dlq_start = await kafka.end_offsets("orders.events.dlq")
    bad_order = new_id("o")
    missing = order(bad_order)
    del missing["amount"]
    bad = {
        "INVALID_JSON": b'{"event_id": "x", "type": "OrderPlaced", ',
        "UNKNOWN_EVENT_TYPE": json.dumps(envelope("OrderTeleported", {"order_id": bad_order})).encode(),
        "INVALID_DATA:negative": json.dumps(envelope("OrderPlaced", order(bad_order, amount=-5))).encode(),
        "INVALID_DATA:extra": json.dumps(envelope("OrderPlaced", order(bad_order, coupon="FREE"))).encode(),
        "INVALID_DATA:missing": json.dumps(envelope("OrderPlaced", missing)).encode(),
        "INVALID_ENVELOPE": json.dumps({"type": "OrderPlaced", "data": order(bad_order)}).encode(),
        # UTF-8 only: a valid order in UTF-16 or UTF-32 is not JSON the contract accepts.
        "INVALID_JSON:utf16": json.dumps(envelope("OrderPlaced", order(bad_order))).encode("utf-16"),
        "INVALID_JSON:utf32": json.dumps(envelope("OrderPlaced", order(bad_order))).encode("utf-32"),
        # A NUL cannot be carried out (Postgres text): refused by the schema, not failed later.
        "INVALID_DATA:nul": json.dumps(envelope("OrderCancelled", {"order_id": bad_order,
                                                                   "reason": "bad\u0000reason"})).encode(),
        "INVALID_ENVELOPE:nul": json.dumps(envelope("OrderPlaced", order(bad_order), source="shop\u0000")).encode(),
    }
    sent = {}
    for label, raw in bad.items():
        if label == "INVALID_JSON":  # with headers of its own, which the dead letter keeps
            meta = await kafka.producer.send_and_wait("orders.events", raw, key=bad_order.encode(),
                                                      headers=[("shop.trace", b"t-1"), ("shop.system", b"erp")])
            sent[label] = (raw, meta)
            continue
        sent[label] = (raw, await kafka.send("orders.events", raw, key=bad_order))
    good_order = new_id("o")
    await kafka.send("orders.events", envelope("OrderPlaced", order(good_order)), key=good_order)

    records = await kafka.read("orders.events.dlq", dlq_start,
                               until=lambda rs: sum(r.key == bad_order.encode() for r in rs) >= len(bad))
    ours = [r for r in records if r.key == bad_order.encode()]
    assert len(ours) == len(bad)
    by_value = {r.value: r for r in ours}
    for label, (raw, meta) in sent.items():
        record = by_value[raw]  # byte for byte
        headers = {k: v.decode() for k, v in record.headers}
        assert headers["error.code"] == label.split(":")[0], label
        assert headers["error.message"], label
        assert headers["original.topic"] == "orders.events"
        assert headers["original.partition"] == str(meta.partition)
        assert headers["original.offset"] == str(meta.offset)
    own = list(by_value[bad["INVALID_JSON"]].headers)
    assert own[:2] == [("shop.trace", b"t-1"), ("shop.system", b"erp")]  # the record's own, then ours
    nul = {k: v.decode() for k, v in by_value[bad["INVALID_DATA:nul"]].headers}
    assert "NUL" in nul["error.message"] and "asyncpg" not in nul["error.message"]
    negative = {k: v.decode() for k, v in by_value[bad["INVALID_DATA:negative"]].headers}
    assert "amount" in negative["error.message"]
    extra = {k: v.decode() for k, v in by_value[bad["INVALID_DATA:extra"]].headers}
    assert "coupon" in extra["error.message"]

    async def good_processed():
        response = await api("gateway").get(f"/v1/payments/{good_order}")
        return response.status_code == 200 and response.json()
    payment = await eventually(good_processed)
    # Processed: its buyer was never registered, so the payment saga refused it.
    assert payment["amount"] == 12_345
    assert (payment["status"], payment["reason_code"]) == ("FAILED", "UNKNOWN_BUYER")
    assert (await api("gateway").get(f"/v1/payments/{bad_order}")).status_code == 404


async def test_duplicate_delivery_has_effect_once(services, kafka, db):
    payments_start = await kafka.end_offsets("payments.events")
    order_id = new_id("o")
    first = envelope("OrderPlaced", order(order_id))
    await kafka.send("orders.events", first, key=order_id)
    await kafka.send("orders.events", first, key=order_id)  # redelivery: same event_id
    second = envelope("OrderPlaced", order(order_id, amount=999))  # same order, another event
    await kafka.send("orders.events", second, key=order_id)

    records = await kafka.read("payments.events", payments_start,
                               until=lambda rs: len(payments_of(rs, order_id)) >= 2, timeout=30)
    # Give a wrongly applied redelivery time to show up as a third outcome.
    records += await kafka.read("payments.events", {tp: payments_start[tp] for tp in payments_start},
                                until=lambda rs: False, timeout=3)
    outcomes = {e["event_id"]: e for e in payments_of(records, order_id)}
    assert len(outcomes) == 2
    by_cause = {e["causation_id"]: e for e in outcomes.values()}
    # The first delivery opened the payment (refused: buyer-1 is not a registered user) ...
    assert by_cause[first["event_id"]]["data"]["reason_code"] == "UNKNOWN_BUYER"
    # ... its redelivery did nothing, and the other event for the same order is a duplicate order.
    duplicate = by_cause[second["event_id"]]
    assert duplicate["type"] == "PaymentFailed"
    assert duplicate["data"]["reason_code"] == "DUPLICATE_ORDER"
    assert duplicate["correlation_id"] == order_id

    row = await db.fetchrow("SELECT amount, placed_event_id FROM gateway.payments WHERE order_id = $1", order_id)
    assert row["amount"] == 12_345 and row["placed_event_id"] == first["event_id"]
    kept = await db.fetch("SELECT event_id FROM gateway.order_events WHERE order_id = $1", order_id)
    assert sorted(r["event_id"] for r in kept) == sorted([first["event_id"], second["event_id"]])
