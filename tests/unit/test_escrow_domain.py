from collections import Counter
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings, strategies as st

from services.escrow.domain import (NOTHING, Escrow, FeeRates, Refund, RefundKind, RefundState, Status, Transfer,
                                    due_for_auto_confirm, on_auto_confirm, on_cancel, on_clawback_settled,
                                    on_confirm, on_hold, on_refund, on_ship, release_amounts)
from shared.events import (ClawbackRequested, EscrowRefunded, EscrowRefundRejected, EscrowReleased, FundsHeld,
                           HoldFunds, HoldRefused, RefundOrder)

NOW = datetime(2026, 11, 25, 10, 0, tzinfo=timezone.utc)
RATES = FeeRates()


def hold_cmd(amount=10_000, payment_id="p-1", method="balance", days=10):
    return HoldFunds(order_id="o-1", payment_id=payment_id, buyer_id="b-1", seller_id="s-1", amount=amount,
                     payment_method=method, installments=1, auto_confirm_days=days)


def held(amount=10_000, method="balance", days=10) -> Escrow:
    return on_hold(None, hold_cmd(amount, method=method, days=days)).escrow


def refund_cmd(refund_id, amount):
    return RefundOrder(order_id="o-1", refund_id=refund_id, amount=amount, reason="r")


def released(amount=10_000) -> Escrow:
    return on_confirm(held(amount), NOW, RATES).escrow


# ---------------------------------------------------------------- fees
@pytest.mark.parametrize("gross, method, expected", [
    (10_001, "balance", (10_001, 60, 9_941)),     # 60.006 -> 60
    (10_000, "bank_card", (10_000, 60, 9_940)),
    (10_000, "huabei", (10_000, 80, 9_920)),
    (250, "balance", (250, 2, 248)),             # 1.5 -> 2: half up
    (83, "balance", (83, 0, 83)),                # 0.498 -> 0
    (187_500, "huabei", (187_500, 1_500, 186_000)),
    (0, "balance", (0, 0, 0)),
])
def test_release_amounts_round_the_fee_half_up(gross, method, expected):
    assert release_amounts(gross, method, RATES) == expected


def test_fee_rates_from_env():
    rates = FeeRates.from_env({"MERCHANT_FEE_HUABEI_PCT": "1.25", "MERCHANT_FEE_BALANCE_PCT": " "})
    assert rates == FeeRates(balance=Decimal("0.006"), bank_card=Decimal("0.006"), huabei=Decimal("0.0125"))
    assert release_amounts(10_000, "huabei", rates) == (10_000, 125, 9_875)
    assert FeeRates.from_env({}) == FeeRates()
    for bad in ("abc", "-0.1", "101", "NaN", "inf"):
        with pytest.raises(ValueError, match="MERCHANT_FEE_BANK_CARD_PCT"):
            FeeRates.from_env({"MERCHANT_FEE_BANK_CARD_PCT": bad})


# ---------------------------------------------------------------- hold
def test_hold_creates_the_escrow_moves_the_money_and_answers():
    d = on_hold(None, hold_cmd(amount=12_345, method="huabei", days=7))
    assert d.escrow == Escrow(order_id="o-1", status=Status.HELD, payment_id="p-1", buyer_id="b-1", seller_id="s-1",
                              payment_method="huabei", installments=1, amount=12_345, auto_confirm_days=7)
    assert d.escrow.held == 12_345
    assert d.transfers == (Transfer("hold:o-1", "gateway", "hold:o-1", 12_345, "hold"),)
    assert d.emit == (FundsHeld(order_id="o-1", payment_id="p-1", amount=12_345),)
    assert d.refund is None


def test_hold_retry_answers_again_and_changes_nothing():
    escrow = held(10_000)
    d = on_hold(escrow, hold_cmd(amount=10_000))
    assert d.escrow is None and d.transfers == () and d.refund is None
    assert d.emit == (FundsHeld(order_id="o-1", payment_id="p-1", amount=10_000),)
    # Even after release, a late retry is answered with what was held.
    assert on_hold(released(), hold_cmd()).emit == (FundsHeld(order_id="o-1", payment_id="p-1", amount=10_000),)


def test_hold_of_another_payment_for_the_same_order_is_refused():
    d = on_hold(held(), hold_cmd(payment_id="p-2"))
    assert d.escrow is None and d.transfers == ()
    assert len(d.emit) == 1 and isinstance(d.emit[0], HoldRefused)
    assert (d.emit[0].payment_id, d.emit[0].reason_code) == ("p-2", "DUPLICATE_ORDER")


def test_cancel_before_hold_leaves_a_marker_and_the_hold_is_refused():
    d = on_cancel(None, "o-1")
    assert d.escrow == Escrow(order_id="o-1", status=Status.CANCELLED)
    assert d.emit == () and d.transfers == () and d.refund is None
    marker = d.escrow
    refused = on_hold(marker, hold_cmd())
    assert refused.escrow is None and refused.transfers == ()  # status stays CANCELLED
    (event,) = refused.emit
    assert isinstance(event, HoldRefused)
    assert (event.order_id, event.payment_id, event.reason_code) == ("o-1", "p-1", "ORDER_CANCELLED")
    assert "o-1" in event.message
    # A second cancel does nothing, and a retried hold is refused again.
    assert on_cancel(marker, "o-1") is NOTHING
    assert on_hold(marker, hold_cmd()).emit[0].reason_code == "ORDER_CANCELLED"


# ---------------------------------------------------------------- ship and the timer
def test_shipping_starts_the_timer_and_shipping_again_does_not_move_it():
    escrow = held(days=7)
    shipped = on_ship(escrow, NOW).escrow
    assert shipped.auto_confirm_at == datetime(2026, 12, 2, 10, 0, tzinfo=timezone.utc)
    assert shipped.status is Status.HELD
    assert on_ship(shipped, NOW + timedelta(days=3)) is NOTHING


def test_ship_without_a_hold_or_after_release_is_ignored():
    assert on_ship(None, NOW) is NOTHING
    assert on_ship(released(), NOW) is NOTHING
    assert on_ship(on_cancel(None, "o-1").escrow, NOW) is NOTHING


def test_auto_confirm_fires_at_its_time_once():
    shipped = on_ship(held(10_000, days=10), NOW).escrow
    due = NOW + timedelta(days=10)
    assert not due_for_auto_confirm(shipped, due - timedelta(microseconds=1))
    assert on_auto_confirm(shipped, due - timedelta(seconds=1), RATES) is NOTHING
    assert due_for_auto_confirm(shipped, due)
    d = on_auto_confirm(shipped, due, RATES)
    assert d.escrow.status is Status.RELEASED and d.escrow.released_at == due
    assert d.emit == (EscrowReleased(order_id="o-1", buyer_id="b-1", seller_id="s-1", payment_method="balance",
                                     gross_amount=10_000, fee_amount=60, net_amount=9_940, trigger="auto_confirm"),)
    assert not due_for_auto_confirm(d.escrow, due + timedelta(days=1))
    assert on_auto_confirm(d.escrow, due + timedelta(days=1), RATES) is NOTHING


def test_no_auto_confirm_without_shipment():
    assert not due_for_auto_confirm(held(), NOW + timedelta(days=365))


# ---------------------------------------------------------------- confirm / release
def test_confirm_releases_everything_held_less_the_fee():
    d = on_confirm(held(10_001), NOW, RATES)
    e = d.escrow
    assert (e.status, e.released_gross, e.fee_amount, e.net_amount, e.held, e.released_at) == (
        Status.RELEASED, 10_001, 60, 9_941, 0, NOW)
    assert d.transfers == (Transfer("release-fee:o-1", "hold:o-1", "revenue:merchant_fee", 60, "fee"),
                           Transfer("release-net:o-1", "hold:o-1", "gateway", 9_941, "release"))
    assert d.emit == (EscrowReleased(order_id="o-1", buyer_id="b-1", seller_id="s-1", payment_method="balance",
                                     gross_amount=10_001, fee_amount=60, net_amount=9_941, trigger="confirmed"),)


def test_a_zero_fee_is_not_a_ledger_transfer():
    d = on_confirm(held(83), NOW, RATES)
    assert d.transfers == (Transfer("release-net:o-1", "hold:o-1", "gateway", 83, "release"),)


def test_confirm_twice_or_without_a_hold_is_ignored():
    assert on_confirm(released(), NOW, RATES) is NOTHING
    assert on_confirm(None, NOW, RATES) is NOTHING
    assert on_confirm(on_cancel(None, "o-1").escrow, NOW, RATES) is NOTHING


def test_partial_refund_then_release_pays_only_the_remainder():
    d = on_refund(held(10_000), refund_cmd("r-1", 3_000), seen_before=False)
    assert d.emit == (EscrowRefunded(order_id="o-1", refund_id="r-1", buyer_id="b-1", payment_method="balance",
                                     amount=3_000),)
    assert d.transfers == (Transfer("refund:o-1:r-1", "hold:o-1", "gateway", 3_000, "refund"),)
    assert d.refund == Refund("o-1", "r-1", 3_000, RefundKind.FROM_HOLD, RefundState.COMPLETED)
    assert (d.escrow.status, d.escrow.held, d.escrow.refunded_total) == (Status.HELD, 7_000, 3_000)
    r = on_confirm(d.escrow, NOW, RATES)
    assert (r.escrow.released_gross, r.escrow.fee_amount, r.escrow.net_amount) == (7_000, 42, 6_958)
    assert r.emit[0].gross_amount == 7_000 and r.emit[0].net_amount == 6_958


def test_refunding_everything_from_the_hold_leaves_nothing_to_release():
    d = on_refund(held(10_000), refund_cmd("r-1", 10_000), seen_before=False)
    assert (d.escrow.status, d.escrow.held, d.escrow.refunded_total) == (Status.REFUNDED, 0, 10_000)
    assert on_confirm(d.escrow, NOW, RATES) is NOTHING
    assert on_ship(d.escrow, NOW) is NOTHING


# ---------------------------------------------------------------- cancel
def test_cancel_while_held_refunds_everything_still_held():
    partly = on_refund(held(10_000), refund_cmd("r-1", 2_500), seen_before=False).escrow
    d = on_cancel(partly, "o-1")
    assert d.emit == (EscrowRefunded(order_id="o-1", refund_id=None, buyer_id="b-1", payment_method="balance",
                                     amount=7_500),)
    assert d.transfers == (Transfer("cancel:o-1", "hold:o-1", "gateway", 7_500, "refund"),)
    assert d.refund == Refund("o-1", None, 7_500, RefundKind.FROM_HOLD, RefundState.COMPLETED)
    assert (d.escrow.status, d.escrow.held, d.escrow.refunded_total) == (Status.REFUNDED, 0, 10_000)
    # Nothing is left: a second cancel is rejected, not refunded twice.
    assert on_cancel(d.escrow, "o-1").emit == (
        EscrowRefundRejected(order_id="o-1", refund_id=None, reason_code="REFUND_EXCEEDS_PAID"),)


def test_a_refund_id_named_cancel_does_not_collide_with_the_cancel_transfer():
    partly = on_refund(held(10_000), refund_cmd("cancel", 1_000), seen_before=False)
    assert partly.transfers[0].id == "refund:o-1:cancel"
    assert on_cancel(partly.escrow, "o-1").transfers[0].id == "cancel:o-1"


def test_cancel_after_release_is_rejected_already_released():
    d = on_cancel(released(), "o-1")
    assert d.escrow is None and d.transfers == () and d.refund is None
    assert d.emit == (EscrowRefundRejected(order_id="o-1", refund_id=None, reason_code="ALREADY_RELEASED"),)


# ---------------------------------------------------------------- refunds: the sum rule, duplicates
def test_refunds_can_never_exceed_what_was_paid():
    first = on_refund(held(10_000), refund_cmd("r-1", 6_000), seen_before=False).escrow
    d = on_refund(first, refund_cmd("r-2", 4_001), seen_before=False)
    assert d.escrow is None and d.transfers == ()
    assert d.emit == (EscrowRefundRejected(order_id="o-1", refund_id="r-2", reason_code="REFUND_EXCEEDS_PAID"),)
    assert d.refund == Refund("o-1", "r-2", 4_001, RefundKind.FROM_HOLD, RefundState.REJECTED, "REFUND_EXCEEDS_PAID")
    exact = on_refund(first, refund_cmd("r-3", 4_000), seen_before=False)
    assert exact.escrow.refunded_total == 10_000 and exact.escrow.status is Status.REFUNDED


def test_the_same_refund_id_twice_has_no_effect():
    assert on_refund(held(), refund_cmd("r-1", 100), seen_before=True) is NOTHING
    assert on_refund(released(), refund_cmd("r-1", 100), seen_before=True) is NOTHING


def test_refund_without_a_payment_is_rejected_not_paid():
    for escrow in (None, on_cancel(None, "o-1").escrow):
        d = on_refund(escrow, refund_cmd("r-1", 100), seen_before=False)
        assert d.escrow is None
        assert d.emit == (EscrowRefundRejected(order_id="o-1", refund_id="r-1", reason_code="NOT_PAID"),)
        assert d.refund.state is RefundState.REJECTED and d.refund.reason_code == "NOT_PAID"


def test_refund_after_release_requests_a_clawback_and_reserves_it():
    partly = on_refund(held(10_000), refund_cmd("r-1", 1_000), seen_before=False).escrow
    after = on_confirm(partly, NOW, RATES).escrow  # released 9 000
    d = on_refund(after, refund_cmd("r-2", 5_000), seen_before=False)
    assert d.transfers == ()  # the gateway moves the money between wallets
    assert d.emit == (ClawbackRequested(order_id="o-1", refund_id="r-2", buyer_id="b-1", seller_id="s-1",
                                        payment_method="balance", amount=5_000),)
    assert d.refund == Refund("o-1", "r-2", 5_000, RefundKind.CLAWBACK, RefundState.PENDING)
    assert (d.escrow.status, d.escrow.pending_clawbacks, d.escrow.refunded_total) == (Status.RELEASED, 5_000, 1_000)
    # The pending 5 000 counts: 1 000 + 5 000 + 4 001 > 10 000.
    over = on_refund(d.escrow, refund_cmd("r-3", 4_001), seen_before=False)
    assert over.emit[0].reason_code == "REFUND_EXCEEDS_PAID" and over.refund.kind is RefundKind.CLAWBACK
    assert on_refund(d.escrow, refund_cmd("r-3", 4_000), seen_before=False).emit[0].amount == 4_000


def test_a_settled_clawback_completes_the_refund():
    after = released(10_000)
    asked = on_refund(after, refund_cmd("r-1", 3_000), seen_before=False)
    d = on_clawback_settled(asked.escrow, asked.refund, ok=True)
    assert d.emit == () and d.transfers == ()
    assert (d.escrow.pending_clawbacks, d.escrow.clawed_back, d.escrow.refunded_total) == (0, 3_000, 3_000)
    assert d.refund == replace(asked.refund, state=RefundState.COMPLETED)
    # Settled already: a repeat does nothing.
    assert on_clawback_settled(d.escrow, d.refund, ok=True) is NOTHING
    # 3 000 completed + 7 001 > 10 000.
    assert on_refund(d.escrow, refund_cmd("r-2", 7_001), seen_before=False).emit[0].reason_code == \
        "REFUND_EXCEEDS_PAID"


def test_a_failed_clawback_frees_its_reservation():
    asked = on_refund(released(10_000), refund_cmd("r-1", 10_000), seen_before=False)
    assert on_refund(asked.escrow, refund_cmd("r-2", 1), seen_before=False).emit[0].reason_code == \
        "REFUND_EXCEEDS_PAID"
    d = on_clawback_settled(asked.escrow, asked.refund, ok=False)
    assert d.emit == ()
    assert (d.escrow.pending_clawbacks, d.escrow.clawed_back, d.escrow.refunded_total) == (0, 0, 0)
    assert (d.refund.state, d.refund.reason_code) == (RefundState.REJECTED, "SELLER_INSUFFICIENT_FUNDS")
    assert on_refund(d.escrow, refund_cmd("r-2", 10_000), seen_before=False).emit[0].amount == 10_000


def test_clawback_settled_for_an_unknown_refund_does_nothing():
    assert on_clawback_settled(released(), None, ok=True) is NOTHING
    assert on_clawback_settled(None, None, ok=False) is NOTHING


# ---------------------------------------------------------------- invariants over any sequence
STEP = st.one_of(
    st.tuples(st.just("refund"), st.sampled_from(["r-1", "r-2", "r-3", "r-4"]), st.integers(1, 12_000)),
    st.tuples(st.just("settle"), st.sampled_from(["r-1", "r-2", "r-3", "r-4"]), st.booleans()),
    st.tuples(st.just("confirm")), st.tuples(st.just("cancel")), st.tuples(st.just("ship")),
)


@settings(max_examples=300, deadline=None)
@given(amount=st.integers(1, 10_000), method=st.sampled_from(["balance", "bank_card", "huabei"]),
       steps=st.lists(STEP, max_size=12))
def test_no_fen_is_created_or_lost(amount, method, steps):
    """Replay decisions like handlers.py does and check the ledger and the sum rule after each."""
    first = on_hold(None, hold_cmd(amount, method=method))
    escrow, refunds, balances = first.escrow, {}, Counter()

    def book(d):
        nonlocal escrow
        for t in d.transfers:
            balances[t.debit] -= t.amount
            balances[t.credit] += t.amount
        if d.escrow is not None:
            escrow = d.escrow
        if d.refund is not None and d.refund.refund_id is not None:
            refunds[d.refund.refund_id] = d.refund

    book(first)
    for step in steps:
        if step[0] == "refund":
            d = on_refund(escrow, refund_cmd(step[1], step[2]), seen_before=step[1] in refunds)
        elif step[0] == "settle":
            d = on_clawback_settled(escrow, refunds.get(step[1]), ok=step[2])
        elif step[0] == "confirm":
            d = on_confirm(escrow, NOW, RATES)
        elif step[0] == "cancel":
            d = on_cancel(escrow, "o-1")
        else:
            d = on_ship(escrow, NOW)
        book(d)
        assert balances["hold:o-1"] == escrow.held >= 0
        assert -balances["gateway"] == escrow.held + balances["revenue:merchant_fee"]
        assert balances["revenue:merchant_fee"] == escrow.fee_amount
        assert escrow.refunded_total + escrow.pending_clawbacks <= escrow.amount == amount
        assert escrow.pending_clawbacks == sum(r.amount for r in refunds.values() if r.state is RefundState.PENDING)
        assert escrow.clawed_back == sum(r.amount for r in refunds.values()
                                         if r.kind is RefundKind.CLAWBACK and r.state is RefundState.COMPLETED)
