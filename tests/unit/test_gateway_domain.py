import re
import typing
from decimal import Decimal
from pathlib import Path

import pytest

import services.gateway
from services.gateway.domain import (OrderEventState, PaymentMethod, PaymentStatus, RepaymentSource, RepaymentState,
                                     RiskDecision, risk_fallback, Registration, Route, Rules, SagaState, TIMED_STATES,
                                     outcome_for_kept_event, payment_status, registration_outcome, route_order_event,
                                     validation_failure, withdrawal_fee)
from shared import topics
from shared.events import SCHEMAS, PaymentMethod as PaymentMethodLiteral, RiskDecided
from shared.settings import SettingsError

USER = {"user_id": "u-1", "full_name": "A", "birth_date": None, "phone_hash": "1" * 64, "phone_masked": "*1",
        "id_number_hash": None, "id_number_masked": None, "real_name_verified": True}
RULES = Rules()


def test_registration_outcomes():
    assert registration_outcome(None, USER) is Registration.CREATED
    assert registration_outcome({**USER, "registered_at": "whenever"}, USER) is Registration.REPEATED
    assert registration_outcome({**USER, "phone_hash": "2" * 64}, USER) is Registration.CONFLICT  # another phone
    assert registration_outcome({**USER, "id_number_hash": "3" * 64}, USER) is Registration.CONFLICT


@pytest.mark.parametrize("amount, withdrawn_before, fee", [
    (100_000, 0, 0),                   # inside the free quota
    (2_000_000, 0, 0),                 # exactly the quota
    (2_000_001, 0, 10),                # 1 fen over: 0.001 fen -> minimum 10
    (2_010_000, 0, 10),                # 10 000 over: exactly 10
    (2_015_000, 0, 15),                # 15 000 over: 15
    (2_015_500, 0, 16),                # 15 500 over: 15.5 -> 16 (half up)
    (100_000, 1_950_000, 50),          # 50 000 over the remaining 50 000: 50
    (100_000, 2_000_000, 100),         # quota used up
    (5_000, 3_000_000, 10),            # 5 fen -> minimum 10
])
def test_withdrawal_fee(amount, withdrawn_before, fee):
    assert withdrawal_fee(amount, withdrawn_before, RULES) == fee


def test_validation_failure_order():
    assert validation_failure(buyer_known=False, seller_known=False)[0] == "UNKNOWN_BUYER"
    assert validation_failure(buyer_known=True, seller_known=False)[0] == "UNKNOWN_SELLER"
    assert validation_failure(buyer_known=True, seller_known=True) is None  # the money: the funding step decides


@pytest.mark.parametrize("kwargs, status", [
    (dict(failed=True, held=False, released=False, refunded=0), PaymentStatus.FAILED),
    (dict(failed=False, held=False, released=False, refunded=0), PaymentStatus.PENDING),
    (dict(failed=False, held=True, released=False, refunded=0), PaymentStatus.HELD),
    (dict(failed=False, held=True, released=False, refunded=300), PaymentStatus.PARTIALLY_REFUNDED),
    (dict(failed=False, held=True, released=False, refunded=1000), PaymentStatus.REFUNDED),
    (dict(failed=False, held=True, released=True, refunded=0), PaymentStatus.RELEASED),
    (dict(failed=False, held=True, released=True, refunded=200), PaymentStatus.PARTIALLY_REFUNDED),
])
def test_payment_status(kwargs, status):
    assert payment_status(amount=1000, **kwargs) is status


def test_routing_of_upstream_events():
    assert route_order_event("RefundRequested", None) is Route.REJECT_UNKNOWN_ORDER
    assert route_order_event("OrderCancelled", None) is Route.REJECT_UNKNOWN_ORDER
    assert route_order_event("OrderConfirmed", None) is Route.PARK  # waits for its OrderPlaced
    assert route_order_event("OrderShipped", None) is Route.PARK
    assert route_order_event("RefundRequested", SagaState.FAILED) is Route.REJECT_NOT_PAID
    assert route_order_event("OrderShipped", SagaState.FAILED) is Route.IGNORE
    for event in ("OrderShipped", "OrderConfirmed", "OrderCancelled", "RefundRequested"):
        assert route_order_event(event, SagaState.COMPLETED) is Route.FORWARD
    for saga in (SagaState.NEW, SagaState.FUNDING, SagaState.HOLDING):
        assert route_order_event("OrderConfirmed", saga) is Route.KEEP
        assert route_order_event("RefundRequested", saga) is Route.KEEP
        assert route_order_event("OrderCancelled", saga) is Route.CANCEL_IN_FLIGHT


def test_kept_events_after_the_outcome():
    assert outcome_for_kept_event("OrderConfirmed", None) is Route.FORWARD
    assert outcome_for_kept_event("RefundRequested", "CARD_DECLINED") is Route.REJECT_NOT_PAID
    assert outcome_for_kept_event("OrderShipped", "CARD_DECLINED") is Route.IGNORE


def test_rules_from_env():
    assert Rules.from_env({}) == RULES
    assert Rules.from_env({"ESCROW_HOLD_RETRY_SECONDS": " ", "RISK_ENABLED": ""}) == RULES  # blank: the default
    rules = Rules.from_env({"WITHDRAWAL_FEE_PCT": "0.2", "RISK_ENABLED": "off", "BANK_CHANNEL_TIMEOUT_SECONDS": "9",
                            "PARKED_EVENT_TTL_SECONDS": "60"})
    assert (rules.withdrawal_fee_rate, rules.risk_enabled, rules.channel_timeout_seconds,
            rules.parked_event_ttl_seconds) == (Decimal("0.002"), False, 9, 60)


def test_credit_reservations_are_re_sent_at_the_hold_pace_unless_told_otherwise():
    assert Rules.from_env({"ESCROW_HOLD_RETRY_SECONDS": "12"}).credit_reserve_retry_seconds == 12
    rules = Rules.from_env({"ESCROW_HOLD_RETRY_SECONDS": "12", "CREDIT_RESERVE_RETRY_SECONDS": "3"})
    assert (rules.hold_retry_seconds, rules.credit_reserve_retry_seconds) == (12, 3)


@pytest.mark.parametrize("name, bad", [
    ("WITHDRAWAL_FEE_PCT", "ten"), ("WITHDRAWAL_FREE_QUOTA_FEN", "-1"), ("WITHDRAWAL_MIN_FEE_FEN", "1.5"),
    ("BANK_CHANNEL_TIMEOUT_SECONDS", "0"), ("ESCROW_HOLD_RETRY_SECONDS", "30s"), ("CREDIT_RESERVE_RETRY_SECONDS", "0"),
    ("RISK_ENABLED", "maybe"), ("RISK_DECISION_TIMEOUT_SECONDS", "five"), ("RISK_FALLBACK_APPROVE_MAX_FEN", "1e5"),
    ("RISK_REVIEW_TIMEOUT_SECONDS", "-3"), ("PARKED_EVENT_TTL_SECONDS", "7d"),
])
def test_a_bad_rule_setting_is_one_error_naming_it(name, bad):
    with pytest.raises(SettingsError, match=rf"^{name} must ") as info:
        Rules.from_env({name: bad})
    assert "\n" not in str(info.value)


def test_risk_fallback_approves_small_payments_only():
    assert risk_fallback(100_000, RULES) == "approve"
    assert risk_fallback(100_001, RULES) == "reject"
    assert Rules(risk_fallback_approve_max=0).risk_timeout_seconds == 5


def test_risk_states_are_in_flight():
    assert SagaState.RISK_CHECK.in_progress and SagaState.REVIEW.in_progress
    assert route_order_event("OrderConfirmed", SagaState.REVIEW) is Route.KEEP


def test_which_failed_payments_the_risk_engine_counted():
    from services.gateway.domain import counted_by_risk_engine
    assert counted_by_risk_engine("INSUFFICIENT_BALANCE", "approve")
    assert counted_by_risk_engine("CREDIT_LIMIT_EXCEEDED", "approve")
    assert counted_by_risk_engine("RISK_REJECTED", "review")  # an operator or the review timeout rejected it
    assert not counted_by_risk_engine("RISK_REJECTED", None)  # the engine rejected it: never counted
    assert not counted_by_risk_engine("UNKNOWN_BUYER", None)
    assert not counted_by_risk_engine("UNKNOWN_SELLER", None)


# ---------------------------------------------------------------- closed sets: code and CHECK constraints agree
def _check_values(table: str, column: str) -> set[str]:
    """The values a CHECK constraint of the gateway's migrations allows `column` of `table`."""
    sql = "\n".join(p.read_text() for p in sorted(MIGRATIONS.glob("*.sql")))
    found = set()
    for statement in sql.split(";"):
        if re.search(rf"\b(TABLE|ALTER TABLE)\s+{table}\b", statement):
            for values in re.findall(rf"\b{column}\s+(?:IN\s*\(([^)]*)\)|=\s*('[^']*'))", statement):
                found |= {v.strip().strip("'") for v in ",".join(values).split(",") if v.strip()}
    return found


MIGRATIONS = Path(services.gateway.__file__).parent / "migrations"


@pytest.mark.parametrize("table, column, values", [
    ("payments", "payment_method", {m.value for m in PaymentMethod}),
    ("payments", "saga_state", {s.value for s in SagaState}),
    ("payments", "status", {s.value for s in PaymentStatus}),
    ("payments", "risk_decision", {d.value for d in RiskDecision}),
    ("payments", "installments", {"1", "3", "6", "9", "12"}),
    ("order_events", "state", {s.value for s in OrderEventState}),
    ("order_events", "type", set(SCHEMAS[topics.ORDERS])),
    ("repayments", "source", {s.value for s in RepaymentSource}),
    ("repayments", "state", {s.value for s in RepaymentState}),
])
def test_enums_match_the_check_constraints(table, column, values):
    assert _check_values(table, column) == values


def test_payment_methods_are_the_events_methods():
    assert {m.value for m in PaymentMethod} == set(typing.get_args(PaymentMethodLiteral))
    assert {s.value for s in RepaymentSource} < {m.value for m in PaymentMethod}
    assert set(typing.get_args(typing.get_type_hints(RiskDecided)["decision"])) == {d.value for d in RiskDecision}


def test_the_saga_workers_states_are_its_partial_indexs():
    """store._DUE is written with literals so that the planner uses payments_saga_due."""
    sql = "\n".join(p.read_text() for p in sorted(MIGRATIONS.glob("*.sql")))
    newest = re.findall(r"CREATE INDEX payments_saga_due .*?WHERE saga_state IN \(([^)]*)\)", sql, re.S)[-1]
    assert {v.strip().strip("'") for v in newest.split(",")} == {s.value for s in TIMED_STATES}
    assert {s for s in SagaState if s.in_progress} == {SagaState.NEW, *TIMED_STATES}
