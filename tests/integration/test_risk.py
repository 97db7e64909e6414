"""Risk control on the payment path, through the whole platform: the faust engine's decisions
as a step of the payment saga, operator review, and the fallback when the engine is down."""
from __future__ import annotations

import asyncio
import signal

from tests.integration.conftest import eventually, types


async def test_a_buyer_burst_is_rejected_from_the_21st_order(shop):
    buyer, seller = await shop.user(balance=10_000), await shop.user()
    orders = [await shop.place(buyer, seller, 100) for _ in range(23)]
    outcomes = [(await shop.events(o, 1, settle=0))[0] for o in orders]
    rejected = [e for e in outcomes if e["type"] == "PaymentFailed"]
    assert len(rejected) == 3 and len(outcomes) - len(rejected) == 20
    assert all(e["data"]["reason_code"] == "RISK_REJECTED" and "buyer_velocity" in e["data"]["message"]
               for e in rejected)
    payment = await shop.payment(rejected[0]["data"]["order_id"])
    assert payment["risk_decision"] == "reject" and payment["risk_rules"] == ["buyer_velocity"]
    assert await shop.wallet(buyer) == 10_000 - 20 * 100
    await shop.audit()


async def test_a_decline_burst_on_a_card_blocks_it(shop):
    await shop.advance_clock(2 * 3600)  # earlier declines of the shared test token are out of the window
    seller = await shop.user()
    for i in range(5):
        buyer = await shop.user()
        order = await shop.place(buyer, seller, 100, method="bank_card", card_token="tok_decline")
        assert (await shop.events(order, 1, settle=0))[0]["data"]["reason_code"] == "CARD_DECLINED", i
    buyer = await shop.user()
    order = await shop.place(buyer, seller, 100, method="bank_card", card_token="tok_decline")
    (failed,) = await shop.events(order, 1)
    assert failed["data"]["reason_code"] == "RISK_REJECTED" and "card_decline_burst" in failed["data"]["message"]
    order = await shop.place(buyer, seller, 100, method="bank_card", card_token="tok_other_card")
    assert types(await shop.events(order, 1)) == ["PaymentSucceeded"]  # another card is fine
    await shop.advance_clock(3601)  # the window moved on
    order = await shop.place(buyer, seller, 100, method="bank_card", card_token="tok_decline")
    assert (await shop.events(order, 1))[0]["data"]["reason_code"] == "CARD_DECLINED"
    await shop.audit()


async def _risk_decision(shop, order, decision):
    payment = await shop.payment(order)
    return payment.get("risk_decision") == decision and payment


async def test_review_approved_by_an_operator_and_another_timed_out(shop):
    buyer, seller = await shop.user(balance=3_000_000), await shop.user()  # registered just now
    approved = await shop.place(buyer, seller, 1_000_001)
    timed_out = await shop.place(buyer, seller, 1_200_000)
    for order in (approved, timed_out):
        payment = await eventually(lambda: _risk_decision(shop, order, "review"))
        assert payment["status"] == "PENDING" and payment["risk_rules"] == ["new_buyer_large_amount"]
    assert await shop.wallet(buyer) == 3_000_000  # nothing moved while in review

    gateway = shop.api("gateway")
    response = await gateway.post(f"/admin/payments/{approved}/risk-review", json={"decision": "approve"})
    assert response.status_code == 200, response.text
    assert types(await shop.events(approved, 1)) == ["PaymentSucceeded"]
    again = await gateway.post(f"/admin/payments/{approved}/risk-review", json={"decision": "reject"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "NOT_IN_REVIEW"

    await shop.advance_clock(1801)
    (failed,) = await shop.events(timed_out, 1)
    assert failed["data"]["reason_code"] == "RISK_REJECTED"
    assert await shop.wallet(buyer) == 3_000_000 - 1_000_001
    await shop.audit()


async def test_engine_down_payments_follow_the_fallback(shop, services):
    buyer, seller = await shop.user(balance=1_000_000), await shop.user()
    await shop.advance_clock(86_401)
    services["risk"].kill(signal.SIGKILL)
    try:
        small = await shop.place(buyer, seller, 100_000)   # at the fallback's approval limit
        large = await shop.place(buyer, seller, 100_001)
        await asyncio.sleep(1)
        await shop.advance_clock(6)  # past the 5 s decision deadline
        assert types(await shop.events(small, 1)) == ["PaymentSucceeded"]
        (failed,) = await shop.events(large, 1)
        assert failed["data"]["reason_code"] == "RISK_REJECTED" and "did not answer" in failed["data"]["message"]
        assert (await shop.payment(small))["risk_rules"] == ["risk_engine_timeout"]
    finally:
        await services["risk"].restart()
    # Back up: decisions come from the engine again.
    order = await shop.place(buyer, seller, 500)
    assert types(await shop.events(order, 1)) == ["PaymentSucceeded"]
    assert (await shop.payment(order))["risk_decision"] == "approve"
    await shop.audit()


async def test_orders_whose_payment_failed_leave_the_daily_amount_window(shop):
    """Issue 12: a buyer whose earlier orders failed (here: an empty wallet) is not held to their
    amounts by buyer_daily_amount (5 000 000 fen in 24 h)."""
    buyer, seller = await shop.user(), await shop.user()
    failed = [await shop.place(buyer, seller, 1_000_000) for _ in range(4)]  # approved, then unpaid
    for order in failed:
        (event,) = await shop.events(order, 1, settle=0)
        assert (event["type"], event["data"]["reason_code"]) == ("PaymentFailed", "INSUFFICIENT_BALANCE")
    await shop.top_up(buyer, 2_000_000)
    paid = [await shop.place(buyer, seller, 1_000_000) for _ in range(2)]
    for order in paid:
        assert types(await shop.events(order, 1, settle=0)) == ["PaymentSucceeded"], order
    assert await shop.wallet(buyer) == 0
    await shop.audit()
