"""Huabei end to end: activation, drawdowns as try/confirm/cancel inside the payment saga, the
line following refunds, freezing, and restarts — with the audit after each."""
from __future__ import annotations

import asyncio
import json
import signal
import uuid

from tests.integration.conftest import envelope, eventually, new_id, types


async def test_activation_accepted_and_refused_per_rule(shop):
    api = shop.api("credit")
    adult = await shop.user()
    account = await shop.activate(adult)
    assert account["status"] == "active" and 50_000 <= account["credit_limit"] <= 5_000_000
    again = await api.post(f"/v1/huabei/{adult}/activation")
    assert again.status_code == 200 and again.json() == account
    state = await shop.huabei(adult)
    assert (state["available"], state["used"], state["credit_limit"]) == (account["credit_limit"], 0,
                                                                            account["credit_limit"])

    shared_phone = f"137{uuid.uuid4().int % 10**8:08d}"
    cases = {
        "age": dict(birth_date="2015-01-01"),
        "real_name_verified": dict(real_name_verified=False),
        "phone": dict(phone=None),
    }
    for rule, over in cases.items():
        user = await shop.user(**over)
        await eventually(lambda: _profile(shop, user))
        refused = await api.post(f"/v1/huabei/{user}/activation")
        assert refused.status_code == 422, rule
        assert refused.json()["error"]["code"] == "HUABEI_NOT_ELIGIBLE"
        assert refused.json()["error"]["message"].startswith(rule)
    first = await shop.user(phone=shared_phone)
    await shop.activate(first)
    second = await shop.user(phone=shared_phone)
    await eventually(lambda: _profile(shop, second))
    refused = await api.post(f"/v1/huabei/{second}/activation")
    assert refused.status_code == 422 and refused.json()["error"]["message"].startswith("phone")
    assert (await api.get(f"/v1/huabei/{second}")).status_code == 404


async def _profile(shop, user):
    return (await shop.api("credit").get(f"/v1/credit-profiles/{user}")).status_code == 200


async def test_huabei_order_paid_held_and_released_with_the_huabei_fee(shop):
    buyer, seller = await shop.user(), await shop.user()
    limit = (await shop.activate(buyer))["credit_limit"]
    order = await shop.place(buyer, seller, 10_000, method="huabei", installments=3)
    (succeeded,) = await shop.events(order, 1)
    assert succeeded["type"] == "PaymentSucceeded"
    assert (succeeded["data"]["payment_method"], succeeded["data"]["installments"]) == ("huabei", 3)
    await eventually(lambda: _used(shop, buyer, 10_000))
    line = await shop.huabei(buyer)
    assert (line["available"], line["reserved"]) == (limit - 10_000, 0)
    await shop.send("OrderConfirmed", {"order_id": order})
    released = (await shop.events(order, 2))[1]["data"]
    assert (released["gross_amount"], released["fee_amount"], released["net_amount"]) == (10_000, 80, 9_920)
    assert await shop.wallet(seller) == 9_920
    assert await shop.wallet(buyer) == 0
    await shop.audit()


async def _used(shop, user, amount):
    line = await shop.huabei(user)
    return line["used"] == amount and line["reserved"] == 0


async def test_purchase_over_the_available_credit_is_refused(shop):
    buyer, seller = await shop.user(), await shop.user()
    limit = (await shop.activate(buyer))["credit_limit"]
    await shop.advance_clock(86_401)  # no longer a new buyer: large amounts skip the risk review
    order = await shop.place(buyer, seller, limit + 1, method="huabei")
    (failed,) = await shop.events(order, 1)
    assert (failed["type"], failed["data"]["reason_code"]) == ("PaymentFailed", "CREDIT_LIMIT_EXCEEDED")
    assert (await shop.huabei(buyer))["available"] == limit
    stranger = await shop.user()
    order = await shop.place(stranger, seller, 100, method="huabei")
    assert (await shop.events(order, 1))[0]["data"]["reason_code"] == "HUABEI_NOT_ACTIVE"
    await shop.audit()


async def test_concurrent_purchases_never_exceed_the_line(shop):
    buyer, seller = await shop.user(), await shop.user()
    limit = (await shop.activate(buyer))["credit_limit"]
    await shop.advance_clock(86_401)  # no longer a new buyer: large amounts skip the risk review
    share = limit * 6 // 10
    orders = await asyncio.gather(*(shop.place(buyer, seller, share, method="huabei") for _ in range(2)))
    outcomes = [(await shop.events(o, 1))[0] for o in orders]
    assert sorted(e["type"] for e in outcomes) == ["PaymentFailed", "PaymentSucceeded"]
    failed = next(e for e in outcomes if e["type"] == "PaymentFailed")
    assert failed["data"]["reason_code"] == "CREDIT_LIMIT_EXCEEDED"
    await eventually(lambda: _used(shop, buyer, share))
    await shop.audit()


async def test_escrow_refusing_after_the_reservation_restores_the_credit(shop):
    buyer, seller = await shop.user(), await shop.user()
    limit = (await shop.activate(buyer))["credit_limit"]
    order = new_id("o")
    await shop.kafka.send("escrow.commands", envelope("CancelOrder", {"order_id": order, "reason": "race"}), key=order)
    await eventually(lambda: _escrow_cancelled(shop, order))
    await shop.send("OrderPlaced", {"order_id": order, "buyer_id": buyer, "seller_id": seller, "amount": 5_000,
                                    "currency": "CNY", "payment_method": "huabei"})
    (failed,) = await shop.events(order, 1)
    assert failed["data"]["reason_code"] == "ORDER_CANCELLED"
    await eventually(lambda: _used(shop, buyer, 0))
    assert (await shop.huabei(buyer))["available"] == limit
    await shop.audit()


async def _escrow_cancelled(shop, order):
    response = await shop.api("escrow").get(f"/v1/escrows/{order}")
    return response.status_code == 200 and response.json()["status"] == "CANCELLED"


async def test_refunds_restore_the_credit(shop):
    buyer, seller = await shop.user(), await shop.user()
    limit = (await shop.activate(buyer))["credit_limit"]
    order = await shop.place(buyer, seller, 20_000, method="huabei")
    await shop.events(order, 1)
    await shop.send("RefundRequested", {"order_id": order, "refund_id": "r-1", "amount": 5_000, "reason": "x"})
    refund = (await shop.events(order, 2))[1]
    assert refund["type"] == "RefundCompleted" and refund["data"]["payment_method"] == "huabei"
    await eventually(lambda: _used(shop, buyer, 15_000))
    await shop.send("OrderConfirmed", {"order_id": order})
    released = (await shop.events(order, 3))[2]["data"]
    assert (released["gross_amount"], released["fee_amount"], released["net_amount"]) == (15_000, 120, 14_880)
    await shop.send("RefundRequested", {"order_id": order, "refund_id": "r-2", "amount": 4_000, "reason": "y"})
    assert types(await shop.events(order, 4))[3] == "RefundCompleted"
    await eventually(lambda: _used(shop, buyer, 11_000))
    assert (await shop.huabei(buyer))["available"] == limit - 11_000
    assert await shop.wallet(seller) == 10_880
    await shop.audit()


async def test_frozen_account_refuses_purchases_until_settled(shop):
    buyer, seller = await shop.user(), await shop.user()
    await shop.activate(buyer)
    now = "2026-11-25T00:00:00Z"
    await shop.kafka.send("billing.events", envelope("AccountOverdue", {"user_id": buyer, "days_overdue": 3,
                                                                        "as_of": now}), key=buyer)
    await eventually(lambda: _status(shop, buyer, "frozen"))
    order = await shop.place(buyer, seller, 100, method="huabei")
    assert (await shop.events(order, 1))[0]["data"]["reason_code"] == "HUABEI_FROZEN"
    await shop.kafka.send("billing.events", envelope("AccountSettled", {"user_id": buyer, "as_of": now}), key=buyer)
    await eventually(lambda: _status(shop, buyer, "active"))
    order = await shop.place(buyer, seller, 100, method="huabei")
    assert types(await shop.events(order, 1)) == ["PaymentSucceeded"]
    await shop.audit()


async def _status(shop, user, status):
    return (await shop.huabei(user))["status"] == status


async def test_credit_service_killed_mid_saga_loses_nothing(shop, services):
    buyers = [await shop.user() for _ in range(3)]
    seller = await shop.user()
    for b in buyers:
        await shop.activate(b)
    services["credit"].kill(signal.SIGKILL)
    orders = [await shop.place(b, seller, 7_000, method="huabei") for b in buyers]
    await asyncio.sleep(1)
    await services["credit"].restart()
    for order in orders:
        assert types(await shop.events(order, 1, settle=0)) == ["PaymentSucceeded"]
    for b in buyers:
        await eventually(lambda: _used(shop, b, 7_000))
    await shop.audit()


async def test_huabei_events_delivered_twice_draw_down_once(shop):
    buyer, seller = await shop.user(), await shop.user()
    limit = (await shop.activate(buyer))["credit_limit"]
    order = await shop.place(buyer, seller, 3_000, method="huabei", times=2)
    await shop.send("OrderConfirmed", {"order_id": order}, times=2)
    events = await shop.events(order, 2, settle=2)
    assert types(events) == ["PaymentSucceeded", "FundsReleased"]
    await eventually(lambda: _used(shop, buyer, 3_000))
    assert (await shop.huabei(buyer))["available"] == limit - 3_000
    await shop.audit()


async def test_a_reservation_answer_after_expiry_never_takes_the_line_over_its_limit(shop, services, kafka):
    """Issue 12: the answer to a reservation reaches the gateway after the reservation expired
    (HUABEI_RESERVATION_TTL_SECONDS, 1 800 s) and its credit went to another order of the buyer.
    The drawdown is committed before escrow holds anything, so credit can still refuse it: the
    order fails CREDIT_LIMIT_EXCEEDED, once, no money moved, and the line stays within its limit."""
    buyer, seller = await shop.user(), await shop.user()
    limit = (await shop.activate(buyer))["credit_limit"]
    await shop.advance_clock(86_401)  # no longer a new buyer: large amounts skip the risk review
    amount = limit * 6 // 10  # two such orders do not fit in the line
    since = await kafka.end_offsets("credit.commands")
    credit, gateway = services["credit"], services["gateway"]
    try:
        credit.kill()  # the reservation waits in credit.commands ...
        order = await shop.place(buyer, seller, amount, method="huabei")
        sent = await kafka.read("credit.commands", since, lambda records: _command(records, "ReserveCredit", order))
        assert _command(sent, "ReserveCredit", order)
        gateway.kill()  # ... and its answer in credit.events, until the gateway comes back
        await credit.restart()
        await eventually(lambda: _line(shop, buyer, used=0, reserved=amount))
        moved = await shop.api("credit").post("/admin/clock", json={"advance_seconds": 1801})
        assert moved.status_code == 200
        await eventually(lambda: _line(shop, buyer, used=0, reserved=0))  # expired: the credit is free again
        # Another order of the buyer (from a second gateway instance) takes it meanwhile.
        other = new_id("o")
        await kafka.send("credit.commands", envelope("ReserveCredit", {
            "order_id": other, "user_id": buyer, "amount": amount, "installments": 1}), key=other)
        await eventually(lambda: _line(shop, buyer, used=0, reserved=amount))
    finally:
        for service in (credit, gateway):
            if service.proc.poll() is not None:
                await service.restart()
    # The late CreditReserved: its commit is refused, the order fails once, with nothing to give back.
    (failed,) = await shop.events(order, 1, timeout=60, settle=3)
    assert (failed["type"], failed["data"].get("reason_code")) == ("PaymentFailed", "CREDIT_LIMIT_EXCEEDED")
    assert (await shop.payment(order))["status"] == "FAILED"
    assert (await shop.api("escrow").get(f"/v1/escrows/{order}")).status_code == 404  # nothing was ever held
    line = await shop.huabei(buyer)
    assert line["used"] + line["reserved"] <= line["credit_limit"] == limit
    assert (line["used"], line["reserved"]) == (0, amount)
    assert await shop.wallet(buyer) == 0
    # The other order's saga compensates: the whole line is free again, and every ledger agrees.
    await kafka.send("credit.commands", envelope("CancelCredit", {"order_id": other}), key=other)
    await eventually(lambda: _line(shop, buyer, used=0, reserved=0))
    await shop.audit()


def _command(records, type_: str, order_id: str) -> bool:
    return any(json.loads(r.value)["type"] == type_ and json.loads(r.value)["data"]["order_id"] == order_id
               for r in records)


async def _line(shop, user, *, used: int, reserved: int) -> bool:
    line = await shop.huabei(user)
    return (line["used"], line["reserved"]) == (used, reserved)
