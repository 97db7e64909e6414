"""Guaranteed transactions end to end through Kafka and Postgres: wallets, the payment saga,
escrow hold, release and refunds. Each scenario checks the exact payments.events sequence,
the balances to the fen, and that the audit still proves conservation."""
from __future__ import annotations

import signal

import httpx
import pytest

from tests.integration.conftest import envelope, eventually, new_id, types


# ---------------------------------------------------------------- wallets
async def test_top_up_is_idempotent_and_withdrawal_charges_the_fee_above_the_quota(shop):
    user = await shop.user()
    first = await shop.top_up(user, 3_000_000, key="k-1")
    assert first["balance"] == 3_000_000
    again = await shop.api("gateway").post(f"/v1/wallets/{user}/top-ups", json={
        "amount": 3_000_000, "card_token": "tok_visa", "idempotency_key": "k-1"})
    assert again.status_code == 201 and again.json() == first
    other = await shop.api("gateway").post(f"/v1/wallets/{user}/top-ups", json={
        "amount": 5, "card_token": "tok_visa", "idempotency_key": "k-1"})
    assert other.status_code == 409 and other.json()["error"]["code"] == "IDEMPOTENCY_CONFLICT"
    assert await shop.wallet(user) == 3_000_000

    gateway = shop.api("gateway")
    free = await gateway.post(f"/v1/wallets/{user}/withdrawals", json={"amount": 1_500_000, "idempotency_key": "w-1"})
    assert free.status_code == 201 and free.json()["fee"] == 0 and free.json()["balance"] == 1_500_000
    # 500 000 of the quota remain: 1 000 000 - 500 000 = 500 000 charged at 0.1 % = 500 fen.
    charged = await gateway.post(f"/v1/wallets/{user}/withdrawals", json={"amount": 1_000_000, "idempotency_key": "w-2"})
    assert charged.status_code == 201, charged.text
    assert charged.json()["fee"] == 500 and charged.json()["balance"] == 1_500_000 - 1_000_000 - 500
    small = await gateway.post(f"/v1/wallets/{user}/withdrawals", json={"amount": 100, "idempotency_key": "w-3"})
    assert small.json()["fee"] == 10  # the minimum whenever a fee applies
    too_much = await gateway.post(f"/v1/wallets/{user}/withdrawals", json={"amount": 499_400, "idempotency_key": "w-4"})
    assert too_much.status_code == 409 and too_much.json()["error"]["code"] == "INSUFFICIENT_BALANCE"
    assert await shop.wallet(user) == 499_390
    await shop.audit()


async def test_the_idempotency_key_may_come_in_a_header(shop):
    user = await shop.user()
    gateway = shop.api("gateway")
    top_ups, withdrawals = f"/v1/wallets/{user}/top-ups", f"/v1/wallets/{user}/withdrawals"
    body = {"amount": 1_000, "card_token": "tok_visa"}
    first = await gateway.post(top_ups, json=body, headers={"Idempotency-Key": "h-1"})
    assert first.status_code == 201, first.text
    # The same request with its key in the body, or in both: the same request, answered once.
    in_body = await gateway.post(top_ups, json={**body, "idempotency_key": "h-1"})
    in_both = await gateway.post(top_ups, json={**body, "idempotency_key": "h-1"}, headers={"Idempotency-Key": "h-1"})
    for again in (in_body, in_both):
        assert again.status_code == 201 and again.json() == first.json()
    other = await gateway.post(top_ups, json={**body, "amount": 5}, headers={"Idempotency-Key": "h-1"})
    assert other.status_code == 409 and other.json()["error"]["code"] == "IDEMPOTENCY_CONFLICT"
    differ = await gateway.post(top_ups, json={**body, "idempotency_key": "h-2"}, headers={"Idempotency-Key": "h-3"})
    neither = await gateway.post(top_ups, json=body)
    assert [r.status_code for r in (differ, neither)] == [400, 400]
    assert {r.json()["error"]["code"] for r in (differ, neither)} == {"INVALID_REQUEST"}
    assert await shop.wallet(user) == 1_000

    # A refusal is the stored answer too, whichever way the key comes.
    refused = await gateway.post(withdrawals, json={"amount": 5_000}, headers={"Idempotency-Key": "w-h"})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "INSUFFICIENT_BALANCE"
    await shop.top_up(user, 10_000)
    replayed = await gateway.post(withdrawals, json={"amount": 5_000, "idempotency_key": "w-h"})
    assert replayed.status_code == 409 and replayed.json() == refused.json()
    assert await shop.wallet(user) == 11_000
    await shop.audit()


async def test_declined_and_silent_cards_do_not_top_up(shop):
    user = await shop.user()
    gateway = shop.api("gateway")
    declined = await gateway.post(f"/v1/wallets/{user}/top-ups", json={
        "amount": 100, "card_token": "tok_decline", "idempotency_key": new_id("k")})
    assert declined.status_code == 402 and declined.json()["error"]["code"] == "CARD_DECLINED"
    silent = await gateway.post(f"/v1/wallets/{user}/top-ups", json={
        "amount": 100, "card_token": "tok_timeout", "idempotency_key": new_id("k")})
    assert silent.status_code == 402 and silent.json()["error"]["code"] == "CHANNEL_TIMEOUT"
    card_number = await gateway.post(f"/v1/wallets/{user}/top-ups", json={
        "amount": 100, "card_token": "4111111111111111", "idempotency_key": new_id("k")})
    assert card_number.status_code == 400
    assert await shop.wallet(user) == 0
    missing = await gateway.post(f"/v1/wallets/{new_id('nobody')}/top-ups", json={
        "amount": 100, "card_token": "tok_visa", "idempotency_key": new_id("k")})
    assert missing.status_code == 404


# ---------------------------------------------------------------- payment saga
async def test_balance_payment_held_then_released_on_confirmation(shop):
    buyer, seller = await shop.user(balance=100_000), await shop.user()
    order = await shop.place(buyer, seller, 10_001)
    (succeeded,) = await shop.events(order, 1)
    assert succeeded["type"] == "PaymentSucceeded"
    assert succeeded["data"] == {"order_id": order, "payment_id": succeeded["data"]["payment_id"], "buyer_id": buyer,
                                 "seller_id": seller, "amount": 10_001, "payment_method": "balance", "installments": 1}
    assert succeeded["correlation_id"] == order
    assert await shop.wallet(buyer) == 89_999
    assert (await shop.payment(order))["status"] == "HELD"
    escrow = await shop.escrow(order)
    assert (escrow["status"], escrow["held"], escrow["released"], escrow["refunded"]) == ("HELD", 10_001, 0, 0)

    await shop.send("OrderConfirmed", {"order_id": order})
    released = (await shop.events(order, 2))[1]
    # 0.60 % of 10 001 = 60.006 -> 60 fen.
    assert released["type"] == "FundsReleased"
    assert released["data"] == {"order_id": order, "seller_id": seller, "gross_amount": 10_001, "fee_amount": 60,
                                "net_amount": 9_941, "trigger": "confirmed"}
    assert await shop.wallet(seller) == 9_941
    assert (await shop.payment(order))["status"] == "RELEASED"
    assert (await shop.escrow(order))["status"] == "RELEASED"
    await shop.audit()


async def test_card_payment_released_with_the_card_fee(shop):
    buyer, seller = await shop.user(), await shop.user()
    order = await shop.place(buyer, seller, 250, method="bank_card", card_token="tok_visa")
    assert types(await shop.events(order, 1)) == ["PaymentSucceeded"]
    await shop.send("OrderConfirmed", {"order_id": order})
    released = (await shop.events(order, 2))[1]["data"]
    assert (released["fee_amount"], released["net_amount"]) == (2, 248)  # 1.5 -> 2, half up
    assert await shop.wallet(seller) == 248
    assert await shop.wallet(buyer) == 0
    await shop.audit()


@pytest.mark.parametrize("case", ["declined", "insufficient", "unknown_buyer", "unknown_seller", "huabei"])
async def test_payment_failures(shop, case):
    buyer, seller = await shop.user(balance=500), await shop.user()
    if case == "declined":
        order, code = await shop.place(buyer, seller, 100, method="bank_card", card_token="tok_decline"), "CARD_DECLINED"
    elif case == "insufficient":
        order, code = await shop.place(buyer, seller, 501), "INSUFFICIENT_BALANCE"
    elif case == "unknown_buyer":
        order, code = await shop.place(new_id("ghost"), seller, 100), "UNKNOWN_BUYER"
    elif case == "unknown_seller":
        order, code = await shop.place(buyer, new_id("ghost"), 100), "UNKNOWN_SELLER"
    else:
        order, code = await shop.place(buyer, seller, 100, method="huabei"), "HUABEI_NOT_ACTIVE"
    (failed,) = await shop.events(order, 1)
    assert failed["type"] == "PaymentFailed" and failed["data"]["reason_code"] == code
    assert failed["data"]["message"]
    assert await shop.wallet(buyer) == 500
    payment = await shop.payment(order)
    assert (payment["status"], payment["reason_code"]) == ("FAILED", code)
    # Refunds and cancels of an unpaid order are rejected, one outcome each.
    await shop.send("RefundRequested", {"order_id": order, "refund_id": "r-1", "amount": 50, "reason": "x"})
    await shop.send("OrderCancelled", {"order_id": order, "reason": "x"})
    events = await shop.events(order, 3)
    assert [(e["type"], e["data"].get("refund_id"), e["data"]["reason_code"]) for e in events[1:]] == [
        ("RefundRejected", "r-1", "NOT_PAID"), ("RefundRejected", None, "NOT_PAID")]
    await shop.audit()


async def test_silent_channel_times_out_by_the_clock(shop):
    buyer, seller = await shop.user(), await shop.user()
    order = await shop.place(buyer, seller, 100, method="bank_card", card_token="tok_timeout")
    await eventually(lambda: shop.awaiting_card(order))
    assert shop.outcomes.by_order.get(order) is None
    await shop.advance_clock(31)
    (failed,) = await shop.events(order, 1)
    assert failed["data"]["reason_code"] == "CHANNEL_TIMEOUT"
    await shop.audit()


async def test_duplicate_order_and_duplicate_deliveries(shop):
    buyer, seller = await shop.user(balance=10_000), await shop.user()
    order = await shop.place(buyer, seller, 1_000, times=2)  # the same event delivered twice
    await shop.send("OrderPlaced", {"order_id": order, "buyer_id": buyer, "seller_id": seller, "amount": 2_000,
                                    "currency": "CNY", "payment_method": "balance"})
    await shop.send("OrderConfirmed", {"order_id": order}, times=2)
    events = await shop.events(order, 3, settle=2)
    assert sorted(types(events)) == ["FundsReleased", "PaymentFailed", "PaymentSucceeded"]
    failed = next(e for e in events if e["type"] == "PaymentFailed")
    assert failed["data"]["reason_code"] == "DUPLICATE_ORDER"
    assert await shop.wallet(buyer) == 9_000
    assert await shop.wallet(seller) == 994
    await shop.audit()


# ---------------------------------------------------------------- refunds and cancellations
async def test_cancel_while_held_refunds_everything_to_the_wallet(shop):
    buyer, seller = await shop.user(balance=5_000), await shop.user()
    order = await shop.place(buyer, seller, 5_000)
    await shop.events(order, 1)
    await shop.send("OrderCancelled", {"order_id": order, "reason": "changed my mind"})
    events = await shop.events(order, 2)
    assert types(events) == ["PaymentSucceeded", "RefundCompleted"]
    assert events[1]["data"] == {"order_id": order, "refund_id": None, "amount": 5_000, "payment_method": "balance"}
    assert await shop.wallet(buyer) == 5_000
    assert (await shop.payment(order))["status"] == "REFUNDED"
    # Confirming afterwards releases nothing; cancelling again is rejected.
    await shop.send("OrderConfirmed", {"order_id": order})
    await shop.send("OrderCancelled", {"order_id": order, "reason": "again"})
    events = await shop.events(order, 3)
    assert types(events) == ["PaymentSucceeded", "RefundCompleted", "RefundRejected"]
    assert await shop.wallet(seller) == 0
    await shop.audit()


async def test_partial_refunds_while_held_then_release_pays_the_remainder(shop):
    buyer, seller = await shop.user(), await shop.user()
    order = await shop.place(buyer, seller, 10_000, method="bank_card", card_token="tok_mastercard")
    await shop.events(order, 1)
    await shop.send("RefundRequested", {"order_id": order, "refund_id": "r-1", "amount": 3_000, "reason": "one broken"})
    await shop.send("RefundRequested", {"order_id": order, "refund_id": "r-1", "amount": 3_000, "reason": "again"})
    await shop.send("RefundRequested", {"order_id": order, "refund_id": "r-2", "amount": 7_001, "reason": "too much"})
    await shop.send("OrderConfirmed", {"order_id": order})
    events = await shop.events(order, 4, settle=2)
    assert [(e["type"], e["data"].get("refund_id"), e["data"].get("reason_code")) for e in events] == [
        ("PaymentSucceeded", None, None), ("RefundCompleted", "r-1", None),
        ("RefundRejected", "r-2", "REFUND_EXCEEDS_PAID"), ("FundsReleased", None, None)]
    assert events[1]["data"]["payment_method"] == "bank_card" and events[1]["data"]["amount"] == 3_000
    released = events[3]["data"]
    assert (released["gross_amount"], released["fee_amount"], released["net_amount"]) == (7_000, 42, 6_958)
    assert await shop.wallet(seller) == 6_958
    assert (await shop.payment(order))["status"] == "PARTIALLY_REFUNDED"
    escrow = await shop.escrow(order)
    assert (escrow["held"], escrow["released"], escrow["refunded"]) == (0, 7_000, 3_000)
    await shop.audit()


async def test_refund_after_release_comes_from_the_sellers_wallet_or_is_rejected(shop):
    buyer, seller = await shop.user(balance=20_000), await shop.user()
    order = await shop.place(buyer, seller, 20_000)
    await shop.events(order, 1)
    await shop.send("OrderConfirmed", {"order_id": order})
    await shop.events(order, 2)
    assert await shop.wallet(seller) == 19_880  # 120 fen fee
    await shop.send("OrderCancelled", {"order_id": order, "reason": "late"})
    await shop.send("RefundRequested", {"order_id": order, "refund_id": "r-a", "amount": 15_000, "reason": "broken"})
    await shop.send("RefundRequested", {"order_id": order, "refund_id": "r-b", "amount": 5_000, "reason": "broken"})
    events = await shop.events(order, 5)
    assert [(e["type"], e["data"].get("refund_id"), e["data"].get("reason_code")) for e in events[2:]] == [
        ("RefundRejected", None, "ALREADY_RELEASED"), ("RefundCompleted", "r-a", None),
        ("RefundRejected", "r-b", "SELLER_INSUFFICIENT_FUNDS")]
    assert await shop.wallet(seller) == 4_880
    assert await shop.wallet(buyer) == 15_000
    assert (await shop.payment(order))["status"] == "PARTIALLY_REFUNDED"
    # r-b's rejection freed its share: a smaller refund now fits.
    await shop.send("RefundRequested", {"order_id": order, "refund_id": "r-c", "amount": 4_880, "reason": "rest"})
    assert types(await shop.events(order, 6))[-1] == "RefundCompleted"
    assert await shop.wallet(seller) == 0
    await shop.audit()


async def test_refunds_of_unknown_orders_are_rejected(shop):
    order = new_id("o")
    await shop.send("RefundRequested", {"order_id": order, "refund_id": "r-1", "amount": 1, "reason": "?"})
    await shop.send("OrderConfirmed", {"order_id": order})  # parked: it waits for its order
    (rejected,) = await shop.events(order, 1)
    assert (rejected["type"], rejected["data"]["reason_code"]) == ("RefundRejected", "UNKNOWN_ORDER")


async def _parked(shop) -> dict[str, list[str]]:
    response = await shop.api("gateway").get("/admin/parked-events")
    assert response.status_code == 200, response.text
    parked: dict[str, list[str]] = {}
    for e in response.json():
        parked.setdefault(e["order_id"], []).append(e["type"])
    return parked


async def test_shipment_and_confirmation_before_the_order_wait_for_it(shop):
    buyer, seller = await shop.user(balance=2_000), await shop.user()
    confirmed, shipped = new_id("o"), new_id("o")
    await shop.send("OrderConfirmed", {"order_id": confirmed})
    await shop.send("OrderShipped", {"order_id": shipped})
    await eventually(lambda: _has_parked(shop, {confirmed: ["OrderConfirmed"], shipped: ["OrderShipped"]}))
    for order in (confirmed, shipped):
        await shop.send("OrderPlaced", {"order_id": order, "buyer_id": buyer, "seller_id": seller, "amount": 1_000,
                                        "currency": "CNY", "payment_method": "balance", "auto_confirm_days": 2})
    events = await shop.events(confirmed, 2)
    assert [(e["type"], e["data"].get("trigger")) for e in events] == [("PaymentSucceeded", None),
                                                                        ("FundsReleased", "confirmed")]
    assert types(await shop.events(shipped, 1)) == ["PaymentSucceeded"]
    await eventually(lambda: _auto_confirm_set(shop, shipped))  # the early shipment started the timer
    parked = await _parked(shop)
    assert confirmed not in parked and shipped not in parked
    await shop.advance_clock(2 * 86_400 + 1)
    events = await shop.events(shipped, 2)
    assert events[1]["type"] == "FundsReleased" and events[1]["data"]["trigger"] == "auto_confirm"
    assert await shop.wallet(seller) == 2 * 994
    await shop.audit()


async def _has_parked(shop, expected: dict[str, list[str]]) -> bool:
    parked = await _parked(shop)
    return all(parked.get(order) == types_ for order, types_ in expected.items())


async def test_parked_events_of_an_order_that_never_comes_expire(shop, services):
    order = new_id("o")
    await shop.send("OrderShipped", {"order_id": order})
    await eventually(lambda: _has_parked(shop, {order: ["OrderShipped"]}))
    await shop.advance_clock(7 * 86_400 + 10)
    await eventually(lambda: _not_parked(shop, order))
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(f"{services['gateway'].url}/metrics")).text
    assert 'danbao_parked_events_expired_total{type="OrderShipped"}' in metrics
    assert order not in shop.outcomes.by_order  # nothing was published for it


async def _not_parked(shop, order) -> bool:
    return order not in await _parked(shop)


# ---------------------------------------------------------------- out of order, timers, faults
async def test_confirmation_before_the_payment_completes_is_kept_and_applied(shop):
    buyer, seller = await shop.user(), await shop.user()
    order = await shop.place(buyer, seller, 1_000, method="bank_card", card_token="tok_visa")
    await shop.send("OrderConfirmed", {"order_id": order})  # right behind the order, before escrow holds it
    events = await shop.events(order, 2)
    assert types(events) == ["PaymentSucceeded", "FundsReleased"]
    assert events[1]["data"]["trigger"] == "confirmed"
    await shop.audit()


async def test_cancel_before_the_card_is_charged_fails_the_payment(shop):
    buyer, seller = await shop.user(), await shop.user()
    order = await shop.place(buyer, seller, 1_000, method="bank_card", card_token="tok_timeout")
    await shop.send("OrderCancelled", {"order_id": order, "reason": "too slow"})
    (failed,) = await shop.events(order, 1, settle=2)
    assert (failed["type"], failed["data"]["reason_code"]) == ("PaymentFailed", "ORDER_CANCELLED")
    await shop.audit()


async def test_escrow_refusing_the_hold_compensates_the_wallet_debit(shop):
    """A cancel that reaches escrow before the hold (a race the gateway cannot always prevent)."""
    buyer, seller = await shop.user(balance=3_000), await shop.user()
    order = new_id("o")
    await shop.kafka.send("escrow.commands", envelope("CancelOrder", {"order_id": order, "reason": "race"}), key=order)
    await eventually(lambda: _escrow_status(shop, order, "CANCELLED"))
    data = {"order_id": order, "buyer_id": buyer, "seller_id": seller, "amount": 3_000, "currency": "CNY",
            "payment_method": "balance"}
    await shop.send("OrderPlaced", data)
    (failed,) = await shop.events(order, 1)
    assert (failed["type"], failed["data"]["reason_code"]) == ("PaymentFailed", "ORDER_CANCELLED")
    assert await shop.wallet(buyer) == 3_000
    await shop.audit()


async def _escrow_status(shop, order, status):
    response = await shop.api("escrow").get(f"/v1/escrows/{order}")
    return response.status_code == 200 and response.json()["status"] == status


async def test_auto_confirm_after_shipment_survives_an_escrow_restart(shop, services):
    buyer, seller = await shop.user(balance=1_000), await shop.user()
    order = await shop.place(buyer, seller, 1_000, auto_confirm_days=3)
    await shop.events(order, 1)
    await shop.advance_clock(10 * 86_400)  # no shipment yet: nothing happens
    await shop.send("OrderShipped", {"order_id": order})
    await eventually(lambda: _auto_confirm_set(shop, order))
    services["escrow"].kill(signal.SIGKILL)
    await shop.advance_clock(3 * 86_400 - 600)
    await services["escrow"].restart()
    assert types(await shop.events(order, 1, settle=2)) == ["PaymentSucceeded"]  # not yet due
    await shop.advance_clock(601)
    events = await shop.events(order, 2, settle=2)
    assert types(events) == ["PaymentSucceeded", "FundsReleased"]
    assert events[1]["data"]["trigger"] == "auto_confirm"
    assert await shop.wallet(seller) == 994
    await shop.audit()


async def _auto_confirm_set(shop, order):
    return (await shop.escrow(order)).get("auto_confirm_at")


async def test_gateway_killed_mid_saga_completes_every_payment_once(shop, services):
    buyers = [await shop.user(balance=1_000) for _ in range(3)]
    seller = await shop.user()
    orders = [await shop.place(b, seller, 400) for b in buyers]
    orders += [await shop.place(b, seller, 300, method="bank_card", card_token="tok_visa") for b in buyers]
    services["gateway"].kill(signal.SIGKILL)
    await services["gateway"].restart()
    for order in orders:
        assert types(await shop.events(order, 1, settle=0)) == ["PaymentSucceeded"], order
    for b in buyers:
        assert await shop.wallet(b) == 600
    await shop.audit()


async def test_every_upstream_event_delivered_twice_has_effect_once(shop):
    buyer, seller = await shop.user(balance=10_000), await shop.user()
    order = await shop.place(buyer, seller, 8_000, times=2)
    await shop.events(order, 1)
    await shop.send("OrderShipped", {"order_id": order}, times=2)
    await shop.send("RefundRequested", {"order_id": order, "refund_id": "r-1", "amount": 1_000, "reason": "x"}, times=2)
    await shop.send("OrderCancelled", {"order_id": order, "reason": "changed my mind"}, times=2)
    events = await shop.events(order, 3, settle=2)
    assert [(e["type"], e["data"].get("refund_id"), e["data"].get("amount")) for e in events] == [
        ("PaymentSucceeded", None, 8_000), ("RefundCompleted", "r-1", 1_000), ("RefundCompleted", None, 7_000)]
    assert await shop.wallet(buyer) == 10_000
    assert (await shop.payment(order))["status"] == "REFUNDED"
    await shop.audit()
