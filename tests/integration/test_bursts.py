"""Bursts of orders: the consumers apply runs of the hot event types as sets (a few statements
for hundreds of records), and every order still gets exactly the outcome the one-by-one path
gives it, to the fen. Also: two instances of the gateway and of escrow share the work."""
from __future__ import annotations

import asyncio
import json
import re
import signal
from collections import Counter

import httpx
import pytest

from tests.integration.conftest import ServiceProcess, envelope, eventually, new_id


def _set_path_counts(metrics_text: str) -> dict[tuple[str, str], float]:
    """(type, path) -> records, from danbao_set_path_records_total."""
    counts: dict[tuple[str, str], float] = {}
    for m in re.finditer(r'^danbao_set_path_records_total\{([^}]*)\} (\S+)$', metrics_text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        key = (labels["type"], labels["path"])
        counts[key] = counts.get(key, 0) + float(m.group(2))
    return counts


async def _metrics(url: str) -> dict[tuple[str, str], float]:
    async with httpx.AsyncClient(timeout=5) as client:
        return _set_path_counts((await client.get(f"{url}/metrics")).text)


async def _publish_at_once(kafka, records: list[tuple[str, dict]]) -> None:
    """Send without waiting for each acknowledgement, so the records arrive as one burst."""
    futures = [await kafka.producer.send("orders.events", json.dumps(event).encode(), key=key.encode())
               for key, event in records]
    await asyncio.gather(*futures)


def _order(buyer: str, seller: str, amount: int, order_id: str | None = None) -> dict:
    return {"order_id": order_id or new_id("o"), "buyer_id": buyer, "seller_id": seller, "amount": amount,
            "currency": "CNY", "payment_method": "balance"}


async def _burst(shop, *, buyers: int, per_buyer: int, amount: int) -> tuple[list[str], str, list[str]]:
    rich = [await shop.user(balance=per_buyer * amount) for _ in range(buyers)]
    seller = await shop.user()
    orders = [_order(b, seller, amount) for b in rich for _ in range(per_buyer)]
    await _publish_at_once(shop.kafka, [(o["order_id"], envelope("OrderPlaced", o)) for o in orders])
    return rich, seller, [o["order_id"] for o in orders]


async def test_a_burst_of_mixed_orders_gets_the_one_by_one_outcomes(shop, services):
    before = {s: await _metrics(services[s].url) for s in ("gateway", "escrow")}
    rich = [await shop.user(balance=5_000) for _ in range(6)]
    short = await shop.user(balance=2_500)  # pays two of its five orders of 1 000, then fails
    seller = await shop.user()
    orders: list[dict] = []
    for i in range(5):
        orders += [_order(b, seller, 1_000) for b in rich]
        orders.append(_order(short, seller, 1_000))
    unknown = _order("nobody-" + new_id("x"), seller, 500)
    to_unknown_seller = _order(rich[0], "nobody-" + new_id("y"), 500)
    duplicate = _order(rich[1], seller, 700, order_id=orders[0]["order_id"])  # a second event, same order_id
    records = [(o["order_id"], envelope("OrderPlaced", o)) for o in orders]
    records += [(unknown["order_id"], envelope("OrderPlaced", unknown)),
                (to_unknown_seller["order_id"], envelope("OrderPlaced", to_unknown_seller)),
                (duplicate["order_id"], envelope("OrderPlaced", duplicate)),
                records[-1]]  # a redelivery of one event (the same event_id): no effect
    await _publish_at_once(shop.kafka, records)

    for o in orders:
        await shop.events(o["order_id"], 2 if o is orders[0] else 1, settle=0, timeout=60)
    for o in (unknown, to_unknown_seller):
        await shop.events(o["order_id"], 1, settle=0)
    await asyncio.sleep(2)  # anything extra would show up now
    by_order = shop.outcomes.by_order

    # Each order exactly its outcome; the duplicate order_id is refused once.
    assert sorted((e["type"], e["data"].get("reason_code")) for e in by_order[orders[0]["order_id"]]) == [
        ("PaymentFailed", "DUPLICATE_ORDER"), ("PaymentSucceeded", None)]
    for o in orders[1:]:
        assert len(by_order[o["order_id"]]) == 1, (o, by_order[o["order_id"]])
    assert all(by_order[o["order_id"]][0]["type"] == "PaymentSucceeded" for o in orders[1:] if o["buyer_id"] != short)
    short_outcomes = Counter((by_order[o["order_id"]][0]["type"], by_order[o["order_id"]][0]["data"].get("reason_code"))
                             for o in orders if o["buyer_id"] == short)
    assert short_outcomes == {("PaymentSucceeded", None): 2, ("PaymentFailed", "INSUFFICIENT_BALANCE"): 3}
    assert [e["data"]["reason_code"] for e in by_order[unknown["order_id"]]] == ["UNKNOWN_BUYER"]
    assert [e["data"]["reason_code"] for e in by_order[to_unknown_seller["order_id"]]] == ["UNKNOWN_SELLER"]

    # To the fen: each rich buyer paid five orders; the short one two.
    for b in rich:
        assert await shop.wallet(b) == 0
    assert await shop.wallet(short) == 500
    await shop.audit()

    # And the burst really took the set paths (this test is about them).
    after = {s: await _metrics(services[s].url) for s in ("gateway", "escrow")}
    for service, event_type in (("gateway", "OrderPlaced"), ("gateway", "RiskDecided"), ("gateway", "FundsHeld"),
                                ("escrow", "HoldFunds")):
        gained = after[service].get((event_type, "set"), 0) - before[service].get((event_type, "set"), 0)
        assert gained > 0, f"{service} applied no {event_type} as a set"


@pytest.fixture(scope="module")
async def second_instances(services, service_env):
    """A second gateway and a second escrow (their own HTTP ports), in the same consumer groups."""
    extra = {
        "gateway": ServiceProcess("gateway", {**service_env, "GATEWAY_URL": "http://127.0.0.1:8011"}),
        "escrow": ServiceProcess("escrow", {**service_env, "ESCROW_URL": "http://127.0.0.1:8012"}),
    }
    extra["gateway"].url, extra["escrow"].url = "http://127.0.0.1:8011", "http://127.0.0.1:8012"
    for p in extra.values():
        p.start()
    try:
        await asyncio.gather(*(p.wait_healthy(60) for p in extra.values()))
        await asyncio.sleep(3)  # the consumer groups rebalance onto both instances
        yield extra
    finally:
        for p in extra.values():
            if p.proc and p.proc.poll() is None:
                p.kill(signal.SIGTERM)


async def test_two_gateways_and_two_escrows_share_a_burst_without_doubles(shop, services, second_instances):
    buyers, seller, orders = await _burst(shop, buyers=20, per_buyer=10, amount=100)
    for order_id in orders:
        await shop.events(order_id, 1, settle=0, timeout=90)
    await asyncio.sleep(2)
    assert all([e["type"] for e in shop.outcomes.by_order[o]] == ["PaymentSucceeded"] for o in orders)
    for b in buyers:
        assert await shop.wallet(b) == 0
    assert await shop.wallet(seller) == 0  # held, not released
    # Both gateways did part of the work.
    work = []
    for url in (services["gateway"].url, second_instances["gateway"].url):
        counts = await _metrics(url)
        work.append(counts.get(("OrderPlaced", "set"), 0) + counts.get(("OrderPlaced", "one_by_one"), 0))
    assert work[1] > 0, work
    await shop.audit()


async def test_timers_fire_once_with_two_instances(shop, second_instances):
    """Saga deadlines (two gateways) and auto-confirm (two escrows) each fire exactly once."""
    buyer, seller = await shop.user(balance=3_000), await shop.user()
    silent = [await shop.place(buyer, seller, 100, method="bank_card", card_token="tok_timeout") for _ in range(3)]
    shipped = [await shop.place(buyer, seller, 1_000, auto_confirm_days=1) for _ in range(3)]
    for order in shipped:
        await shop.events(order, 1, settle=0)
        await shop.send("OrderShipped", {"order_id": order})
    for order in shipped:
        await eventually(lambda: _auto_confirm_set(shop, order))
    for order in silent:  # risk decided, card asked: the channel deadline runs (moved before that,
        await eventually(lambda: shop.awaiting_card(order))  # the deadline starts after the move)
    await shop.advance_clock(86_400 + 31)  # past every auto-confirm and every channel deadline
    for order in silent:
        events = await shop.events(order, 1, settle=0)
        assert [(e["type"], e["data"]["reason_code"]) for e in events] == [("PaymentFailed", "CHANNEL_TIMEOUT")]
    for order in shipped:
        await shop.events(order, 2, settle=0)
    await asyncio.sleep(3)  # a second firing would show up now
    for order in silent:
        assert len(shop.outcomes.by_order[order]) == 1, shop.outcomes.by_order[order]
    for order in shipped:
        assert [(e["type"], e["data"].get("trigger")) for e in shop.outcomes.by_order[order]] == [
            ("PaymentSucceeded", None), ("FundsReleased", "auto_confirm")]
    assert await shop.wallet(seller) == 3 * 994
    assert await shop.wallet(buyer) == 0
    await shop.audit()


async def _auto_confirm_set(shop, order):
    return (await shop.escrow(order)).get("auto_confirm_at")
