"""The payment saga's pure core (services/gateway/saga.py): every state × event, and random
event sequences."""
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings, strategies as st

from services.gateway.bank import ChargeResult
from services.gateway.domain import PaymentStatus, Rules, SagaState
from services.gateway.saga import (NOTHING, Bank, CancelRequested, Due, Kept, Payment, Placed, Resolve, ReviewDecided,
                                   Short, Transfer, changes, charges_card, decide, kept_outcomes)
from shared import topics
from shared.events import (ClawbackRequested, CreditRefused, CreditReserved, DrawdownCommitted, EscrowRefunded,
                           EscrowReleased, FundsHeld, HoldRefused, RiskDecided)

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
RULES = Rules()
S = SagaState


def pay(state=S.NEW, method="balance", **kw) -> Payment:
    return Payment(order_id="o-1", payment_id="pay_o-1", buyer_id="b", seller_id="s", amount=1000,
                   payment_method=method, card_token="tok_ok" if method == "bank_card" else None, installments=1,
                   auto_confirm_days=10, accepted_at=T0, state=state, **kw)


def kinds(d) -> list[str]:
    return [type(e.data).__name__ for e in d.emit]


PLACED = Placed(buyer_registered_at=T0, seller_known=True)
SAGA_EVENTS = {
    "placed": PLACED,
    "approve": RiskDecided(order_id="o-1", decision="approve", rules=[], message="ok"),
    "reject": RiskDecided(order_id="o-1", decision="reject", rules=["buyer_velocity"], message="too fast"),
    "review": RiskDecided(order_id="o-1", decision="review", rules=["new_buyer_large_amount"], message="look"),
    "operator_approves": ReviewDecided(True),
    "operator_rejects": ReviewDecided(False),
    "due": Due(),
    "due_card_approved": Due(ChargeResult.APPROVED),
    "due_card_declined": Due(ChargeResult.DECLINED),
    "cancel": CancelRequested(),
    "credit_reserved": CreditReserved(order_id="o-1", user_id="b", amount=1000),
    "credit_refused": CreditRefused(order_id="o-1", user_id="b", reason_code="CREDIT_LIMIT_EXCEEDED", message="no"),
    "drawdown_committed": DrawdownCommitted(order_id="o-1", user_id="b", amount=1000, installments=1, committed_at=T0),
    "held": FundsHeld(order_id="o-1", payment_id="pay_o-1", amount=1000),
    "hold_refused": HoldRefused(order_id="o-1", payment_id="pay_o-1", reason_code="ORDER_CANCELLED", message="gone"),
}

# (state, event) -> the state after it; absent: the event changes nothing in that state.
# The method is the one each state belongs to (RESERVING, COMMITTING: huabei, FUNDING: bank_card, else balance).
MOVES = {
    (S.NEW, "placed"): S.RISK_CHECK,
    (S.RISK_CHECK, "approve"): S.HOLDING, (S.RISK_CHECK, "reject"): S.FAILED, (S.RISK_CHECK, "review"): S.REVIEW,
    (S.RISK_CHECK, "due"): S.HOLDING, (S.RISK_CHECK, "due_card_approved"): S.HOLDING,
    (S.RISK_CHECK, "due_card_declined"): S.HOLDING,  # the fallback approves 1 000 fen; no card is asked
    (S.REVIEW, "operator_approves"): S.HOLDING, (S.REVIEW, "operator_rejects"): S.FAILED,
    (S.REVIEW, "due"): S.FAILED, (S.REVIEW, "due_card_approved"): S.FAILED, (S.REVIEW, "due_card_declined"): S.FAILED,
    (S.RESERVING, "credit_reserved"): S.COMMITTING, (S.RESERVING, "credit_refused"): S.FAILED,
    (S.RESERVING, "due"): S.RESERVING, (S.RESERVING, "due_card_approved"): S.RESERVING,
    (S.RESERVING, "due_card_declined"): S.RESERVING,
    (S.COMMITTING, "drawdown_committed"): S.HOLDING, (S.COMMITTING, "credit_refused"): S.FAILED,
    (S.COMMITTING, "due"): S.COMMITTING, (S.COMMITTING, "due_card_approved"): S.COMMITTING,
    (S.COMMITTING, "due_card_declined"): S.COMMITTING,
    (S.FUNDING, "due"): S.FUNDING, (S.FUNDING, "due_card_approved"): S.HOLDING,
    (S.FUNDING, "due_card_declined"): S.FAILED,
    (S.HOLDING, "held"): S.COMPLETED, (S.HOLDING, "hold_refused"): S.FAILED,
    (S.HOLDING, "due"): S.HOLDING, (S.HOLDING, "due_card_approved"): S.HOLDING,
    (S.HOLDING, "due_card_declined"): S.HOLDING,
}
for _state in (S.NEW, S.RISK_CHECK, S.REVIEW, S.RESERVING, S.COMMITTING, S.FUNDING, S.HOLDING):
    MOVES[(_state, "cancel")] = _state  # only marks the payment


@pytest.mark.parametrize("state", list(SagaState))
@pytest.mark.parametrize("name", list(SAGA_EVENTS))
def test_every_state_and_event(state, name):
    method = {S.RESERVING: "huabei", S.COMMITTING: "huabei", S.FUNDING: "bank_card"}.get(state, "balance")
    timer = T0 if state.in_progress and state is not S.NEW else None
    p = pay(state, method=method, next_action_at=timer, deadline_at=T0 + timedelta(seconds=30))
    d = decide(p, SAGA_EVENTS[name], T0, RULES)
    expected = MOVES.get((state, name))
    if expected is None:
        assert d is NOTHING
        return
    assert d.payment is not None and d.payment.state is expected
    outcomes = [k for k in kinds(d) if k in ("PaymentSucceeded", "PaymentFailed")]
    assert outcomes == (["PaymentSucceeded"] if expected is S.COMPLETED else ["PaymentFailed"]
                        if expected is S.FAILED else [])
    if expected.in_progress:
        assert d.payment.next_action_at is not None or expected is S.NEW  # a timer watches a saga in flight
    else:
        assert d.payment.next_action_at is None and d.kept is not None


@pytest.mark.parametrize("terminal", [S.COMPLETED, S.FAILED])
def test_terminal_states_absorb_every_repeat(terminal):
    p = pay(terminal, status=PaymentStatus.HELD if terminal is S.COMPLETED else PaymentStatus.FAILED)
    for event in SAGA_EVENTS.values():
        assert decide(p, event, T0 + timedelta(days=1), RULES) is NOTHING


def test_a_new_order_asks_the_risk_engine_with_its_deadline():
    d = decide(pay(), PLACED, T0, RULES)
    assert kinds(d) == ["RiskCheckRequested"] and d.emit[0].topic == topics.RISK_REQUESTS and d.emit[0].key == "b"
    assert d.payment.next_action_at == d.payment.deadline_at == T0 + timedelta(seconds=RULES.risk_timeout_seconds)
    assert set(changes(pay(), d.payment)) == {"saga_state", "next_action_at", "deadline_at"}


@pytest.mark.parametrize("placed, code", [(Placed(None, True), "UNKNOWN_BUYER"), (Placed(T0, False), "UNKNOWN_SELLER")])
def test_unknown_users_fail_without_telling_the_risk_engine(placed, code):
    d = decide(pay(), placed, T0, RULES)
    assert d.payment.reason_code == code and kinds(d) == ["PaymentFailed"] and d.kept == Kept(code)


@pytest.mark.parametrize("method, state, emitted", [("balance", S.HOLDING, ["HoldFunds"]),
                                                    ("huabei", S.RESERVING, ["ReserveCredit"]),
                                                    ("bank_card", S.FUNDING, [])])
def test_without_risk_control_the_order_is_funded_at_once(method, state, emitted):
    d = decide(pay(method=method), PLACED, T0, replace(RULES, risk_enabled=False))
    assert d.payment.state is state and kinds(d) == emitted


def test_approval_reserves_the_wallet_and_asks_escrow_to_hold():
    d = decide(pay(S.RISK_CHECK), SAGA_EVENTS["approve"], T0, RULES)
    assert d.ledger == (Transfer("payment:o-1", "wallet:b", "escrow", 1000, "payment", pending=True),)
    assert kinds(d) == ["HoldFunds"] and d.emit[0].topic == topics.ESCROW_COMMANDS
    assert d.payment.attempts == 1 and d.payment.risk_decision == "approve"
    assert d.payment.next_action_at == T0 + timedelta(seconds=RULES.hold_retry_seconds)


def test_a_short_wallet_fails_the_payment_and_the_risk_engine_forgets_it():
    d = decide(pay(S.RISK_CHECK), Short(SAGA_EVENTS["approve"], 300), T0, RULES)
    assert d.payment.state is S.FAILED and d.payment.reason_code == "INSUFFICIENT_BALANCE" and not d.ledger
    assert "300 fen available" in d.payment.message and d.payment.risk_decision == "approve"
    assert kinds(d) == ["PaymentFailed", "PaymentAbandoned"]


def test_engine_rejection_is_not_abandoned_but_an_operator_rejection_is():
    assert kinds(decide(pay(S.RISK_CHECK), SAGA_EVENTS["reject"], T0, RULES)) == ["PaymentFailed"]
    review = decide(pay(S.RISK_CHECK), SAGA_EVENTS["review"], T0, RULES).payment
    assert review.next_action_at == T0 + timedelta(seconds=RULES.review_timeout_seconds)
    rejected = decide(review, ReviewDecided(False), T0, RULES)
    assert kinds(rejected) == ["PaymentFailed", "PaymentAbandoned"]
    assert rejected.payment.message == "rejected by an operator after review (new_buyer_large_amount)"


@pytest.mark.parametrize("amount, state", [(100_000, S.HOLDING), (100_001, S.FAILED)])
def test_risk_fallback_on_the_deadline(amount, state):
    d = decide(replace(pay(S.RISK_CHECK), amount=amount), Due(), T0, RULES)
    assert d.payment.state is state and d.payment.risk_rules == ("risk_engine_timeout",)


def test_card_declined_tells_the_risk_engine():
    p = pay(S.FUNDING, method="bank_card", deadline_at=T0 + timedelta(seconds=30))
    assert charges_card(p)
    d = decide(p, Due(ChargeResult.DECLINED), T0, RULES)
    assert d.payment.reason_code == "CARD_DECLINED" and kinds(d) == ["PaymentFailed", "PaymentAbandoned",
                                                                      "CardDeclined"]


def test_card_no_answer_retries_until_the_deadline_then_voids():
    p = pay(S.FUNDING, method="bank_card", deadline_at=T0 + timedelta(seconds=30))
    waiting = decide(p, Due(ChargeResult.NO_ANSWER), T0 + timedelta(seconds=29.5), RULES)
    assert waiting.payment.state is S.FUNDING and waiting.payment.next_action_at == p.deadline_at
    late = decide(p, Due(ChargeResult.NO_ANSWER), p.deadline_at, RULES)
    assert late.payment.reason_code == "CHANNEL_TIMEOUT" and late.bank == (Bank("void", "charge:o-1"),)


def test_a_cancel_in_flight_stops_a_card_charge():
    p = decide(pay(S.FUNDING, method="bank_card"), CancelRequested(), T0, RULES).payment
    assert p.cancel_requested and not charges_card(p)
    d = decide(p, Due(), T0, RULES)
    assert d.payment.reason_code == "ORDER_CANCELLED" and d.bank == (Bank("void", "charge:o-1"),)


@pytest.mark.parametrize("method, ledger, bank, emitted", [
    ("balance", (Resolve("payment-post:o-1", "payment:o-1", True),), (), ["PaymentSucceeded"]),
    ("bank_card", (Transfer("charge:o-1", "bank", "escrow", 1000, "card_payment"),),
     (Bank("capture", "charge:o-1", 1000),), ["PaymentSucceeded"]),
    ("huabei", (), (), ["PaymentSucceeded"]),  # the drawdown was committed before the hold
])
def test_held_settles_the_funding_by_method(method, ledger, bank, emitted):
    d = decide(pay(S.HOLDING, method=method), SAGA_EVENTS["held"], T0, RULES)
    assert (d.ledger, d.bank, kinds(d)) == (ledger, bank, emitted)
    assert d.payment.status is PaymentStatus.HELD and d.kept == Kept(None)


@pytest.mark.parametrize("method, ledger, bank, emitted", [
    ("balance", (Resolve("payment-void:o-1", "payment:o-1", False),), (), []),
    ("bank_card", (), (Bank("void", "charge:o-1"),), []),
    ("huabei", (Transfer("huabei-return:o-1", "escrow", "lender", 1000, "huabei_cancel"),), (), ["CancelCredit"]),
])
def test_hold_refused_compensates_by_method(method, ledger, bank, emitted):
    d = decide(pay(S.HOLDING, method=method, risk_decision="approve"), SAGA_EVENTS["hold_refused"], T0, RULES)
    assert (d.ledger, d.bank) == (ledger, bank)
    assert kinds(d) == emitted + ["PaymentFailed", "PaymentAbandoned"] and d.kept == Kept("ORDER_CANCELLED")


def test_huabei_commits_the_drawdown_before_any_money_moves():
    d = decide(pay(S.RESERVING, method="huabei"), SAGA_EVENTS["credit_reserved"], T0, RULES)
    assert d.payment.state is S.COMMITTING and not d.ledger and kinds(d) == ["CommitCredit"]
    assert d.emit[0].topic == topics.CREDIT_COMMANDS and d.emit[0].key == "o-1"
    assert d.payment.next_action_at == T0 + timedelta(seconds=RULES.credit_reserve_retry_seconds)
    later = T0 + timedelta(seconds=RULES.credit_reserve_retry_seconds)
    again = decide(d.payment, Due(), later, RULES)  # no answer yet: the idempotent command again
    assert again.payment.state is S.COMMITTING and kinds(again) == ["CommitCredit"] and not again.ledger
    assert again.payment.next_action_at == later + timedelta(seconds=RULES.credit_reserve_retry_seconds)
    held = decide(d.payment, SAGA_EVENTS["drawdown_committed"], T0, RULES)
    assert held.ledger == (Transfer("huabei:o-1", "lender", "escrow", 1000, "huabei_payment"),)
    assert held.payment.state is S.HOLDING and kinds(held) == ["HoldFunds"]
    assert decide(held.payment, SAGA_EVENTS["drawdown_committed"], T0, RULES) is NOTHING  # answer to a re-send


def test_a_commit_refused_after_the_reservation_expired_fails_with_nothing_to_compensate():
    """Credit refuses the commit of a reservation that expired while the line went to other
    orders: no money moved yet, so the payment just fails with credit's reason."""
    p = decide(pay(S.RESERVING, method="huabei", risk_decision="approve"), SAGA_EVENTS["credit_reserved"], T0,
               RULES).payment
    refused = CreditRefused(order_id="o-1", user_id="b", reason_code="CREDIT_LIMIT_EXCEEDED",
                            message="the reservation expired before the payment was confirmed; ...")
    d = decide(p, refused, T0 + timedelta(hours=1), RULES)
    assert (d.payment.state, d.payment.reason_code, d.payment.message) == (S.FAILED, "CREDIT_LIMIT_EXCEEDED",
                                                                           refused.message)
    assert not d.ledger and not d.bank and kinds(d) == ["PaymentFailed", "PaymentAbandoned"]
    assert d.kept == Kept("CREDIT_LIMIT_EXCEEDED")


def test_a_cancel_before_the_reservation_answer_releases_the_credit_without_a_drawdown():
    p = decide(pay(S.RESERVING, method="huabei"), CancelRequested(), T0, RULES).payment
    d = decide(p, SAGA_EVENTS["credit_reserved"], T0, RULES)
    assert (d.payment.state, d.payment.reason_code) == (S.FAILED, "ORDER_CANCELLED")
    assert not d.ledger and kinds(d)[:2] == ["CancelCredit", "PaymentFailed"] and d.kept == Kept("ORDER_CANCELLED")


def test_credit_commands_and_holds_are_re_sent_each_at_its_own_pace():
    rules = replace(RULES, hold_retry_seconds=30, credit_reserve_retry_seconds=7)
    reserving = decide(pay(S.RISK_CHECK, method="huabei"), SAGA_EVENTS["approve"], T0, rules).payment
    assert reserving.state is S.RESERVING and reserving.next_action_at == T0 + timedelta(seconds=7)
    again = decide(reserving, Due(), T0, rules)
    assert kinds(again) == ["ReserveCredit"] and again.payment.next_action_at == T0 + timedelta(seconds=7)
    committing = decide(reserving, SAGA_EVENTS["credit_reserved"], T0, rules).payment
    assert committing.state is S.COMMITTING and committing.next_action_at == T0 + timedelta(seconds=7)
    assert decide(committing, Due(), T0, rules).payment.next_action_at == T0 + timedelta(seconds=7)
    holding = decide(committing, SAGA_EVENTS["drawdown_committed"], T0, rules).payment
    assert holding.state is S.HOLDING and holding.next_action_at == T0 + timedelta(seconds=30)
    assert decide(holding, Due(), T0, rules).payment.next_action_at == T0 + timedelta(seconds=30)


def test_release_pays_the_seller_once():
    p = pay(S.COMPLETED, status=PaymentStatus.HELD)
    released = EscrowReleased(order_id="o-1", buyer_id="b", seller_id="s", payment_method="balance", gross_amount=1000,
                               fee_amount=6, net_amount=994, trigger="confirmed")
    d = decide(p, released, T0, RULES)
    assert d.ledger == (Transfer("release:o-1", "escrow", "wallet:s", 994, "release"),)
    assert d.payment.status is PaymentStatus.RELEASED and kinds(d) == ["FundsReleased"]
    assert decide(d.payment, released, T0, RULES) is NOTHING


def test_refunds_go_back_the_way_the_money_came():
    p = pay(S.COMPLETED, method="huabei", status=PaymentStatus.HELD)
    d = decide(p, EscrowRefunded(order_id="o-1", refund_id="r1", buyer_id="b", payment_method="huabei", amount=400),
               T0, RULES)
    assert d.ledger == (Transfer("refund:o-1:r1", "escrow", "lender", 400, "refund"),)
    assert kinds(d) == ["RestoreCredit", "RefundCompleted"] and d.payment.status is PaymentStatus.PARTIALLY_REFUNDED


def test_a_clawback_the_seller_cannot_pay_is_rejected_and_settled():
    p = pay(S.COMPLETED, status=PaymentStatus.RELEASED, released_gross=1000, fee_amount=6, net_amount=994)
    claw = ClawbackRequested(order_id="o-1", refund_id="r1", buyer_id="b", seller_id="s", payment_method="balance",
                             amount=500)
    ok = decide(p, claw, T0, RULES)
    assert ok.ledger == (Transfer("clawback:o-1:r1", "wallet:s", "wallet:b", 500, "clawback"),)
    assert kinds(ok) == ["RefundCompleted", "ClawbackSettled"] and ok.emit[1].data.ok
    short = decide(p, Short(claw, 10), T0, RULES)
    assert short.payment is None and not short.ledger and kinds(short) == ["RefundRejected", "ClawbackSettled"]
    assert not short.emit[1].data.ok


def test_kept_events_of_a_failed_payment():
    cancel = {"type": "OrderCancelled", "data": {"order_id": "o-1"}, "event_id": "c"}
    refund = {"type": "RefundRequested", "data": {"order_id": "o-1", "refund_id": "r"}, "event_id": "r"}
    confirm = {"type": "OrderConfirmed", "data": {"order_id": "o-1"}, "event_id": "k"}
    assert kept_outcomes("ORDER_CANCELLED", [cancel], [refund, confirm]) == [(refund, "event")]
    assert kept_outcomes("CARD_DECLINED", [cancel], [confirm]) == [(cancel, "payment")]


# ---------------------------------------------------------------- random event sequences
ANSWERS = list(SAGA_EVENTS.values()) + [Due(ChargeResult.NO_ANSWER), ReviewDecided(True)]


@settings(max_examples=300, deadline=None)
@given(method=st.sampled_from(["balance", "bank_card", "huabei"]), risk=st.booleans(),
       steps=st.lists(st.tuples(st.sampled_from(range(len(ANSWERS))), st.booleans(), st.integers(0, 4000)),
                      max_size=25))
def test_one_outcome_and_consistent_money_whatever_arrives(method, risk, steps):
    """Whatever order answers, repeats and timers come in: at most one outcome, a terminal state
    never changes, the wallet reservation is resolved at most once, and a saga in flight always
    has a timer."""
    rules = replace(RULES, risk_enabled=risk)
    now = T0
    p = pay(method=method)
    d = decide(p, PLACED, now, rules)
    p, outcomes, resolved = d.payment, kinds(d).count("PaymentFailed"), 0
    reserved = sum(isinstance(t, Transfer) and t.pending for t in d.ledger)
    for index, short, seconds in steps:
        now += timedelta(seconds=seconds)
        event = ANSWERS[index]
        if isinstance(event, Due) and (p.next_action_at is None or p.next_action_at > now):
            continue  # the worker looks only at due sagas
        d = decide(p, Short(event, 0) if short else event, now, rules)
        if p.state in (S.COMPLETED, S.FAILED):
            assert d is NOTHING
        outcomes += sum(k in ("PaymentSucceeded", "PaymentFailed") for k in kinds(d))
        reserved += sum(isinstance(t, Transfer) and t.pending for t in d.ledger)
        resolved += sum(isinstance(t, Resolve) for t in d.ledger)
        if d.payment is not None:
            p = d.payment
        assert p.state is not S.NEW
        assert (p.next_action_at is not None) == p.state.in_progress
        assert (p.status is PaymentStatus.FAILED) == (p.state is S.FAILED)
    assert outcomes <= 1 and resolved <= reserved <= 1
    assert (outcomes == 1) == (p.state in (S.COMPLETED, S.FAILED))


def test_a_payment_row_round_trips_and_only_changed_columns_are_written():
    row = {"order_id": "o-1", "payment_id": "pay_o-1", "buyer_id": "b", "seller_id": "s", "amount": 1000,
           "payment_method": "balance", "card_token": None, "installments": 1, "auto_confirm_days": 10,
           "accepted_at": T0, "placed_event_id": "e", "currency": "CNY", "saga_state": "RISK_CHECK",
           "status": "PENDING", "reason_code": None, "message": None, "next_action_at": T0, "deadline_at": T0,
           "attempts": 0, "cancel_requested": False, "risk_decision": None, "risk_rules": None, "risk_message": None,
           "refunded": 0, "released_gross": None, "fee_amount": None, "net_amount": None, "updated_at": T0}
    p = Payment.from_row(row)
    assert p == pay(S.RISK_CHECK, placed_event_id="e", next_action_at=T0, deadline_at=T0)
    d = decide(p, SAGA_EVENTS["approve"], T0, RULES)
    assert changes(p, d.payment) == {"saga_state": "HOLDING", "risk_decision": "approve", "risk_message": "ok",
                                     "attempts": 1, "next_action_at": T0 + timedelta(seconds=RULES.hold_retry_seconds)}
    with pytest.raises(TypeError):
        p.but(no_such_field=1)
