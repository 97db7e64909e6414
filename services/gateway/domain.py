"""Gateway rules, pure: no I/O. Wallet fees, the payment saga's decisions, payment status,
and what to do with an upstream order event given where its payment stands."""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Mapping

from shared.money import apply_rate, percent
from shared.settings import env_bool, env_int, env_non_negative_int, env_percent


class PaymentStatus(StrEnum):
    PENDING = "PENDING"
    FAILED = "FAILED"
    HELD = "HELD"
    RELEASED = "RELEASED"
    REFUNDED = "REFUNDED"
    PARTIALLY_REFUNDED = "PARTIALLY_REFUNDED"


class SagaState(StrEnum):
    NEW = "NEW"
    RISK_CHECK = "RISK_CHECK"  # waiting for the risk engine's decision
    REVIEW = "REVIEW"          # the risk engine asked for an operator's review
    RESERVING = "RESERVING"  # huabei: waiting for the credit service to reserve the drawdown
    COMMITTING = "COMMITTING"  # huabei: reserved; waiting for credit to confirm the drawdown (or refuse it)
    FUNDING = "FUNDING"      # waiting for the bank channel to charge the card
    HOLDING = "HOLDING"      # funded; HoldFunds sent, waiting for escrow's answer
    COMPLETED = "COMPLETED"  # held in escrow: PaymentSucceeded published
    FAILED = "FAILED"        # compensated: PaymentFailed published

    @property
    def in_progress(self) -> bool:
        return self is SagaState.NEW or self in TIMED_STATES


# The in-progress states whose next step is a timer (next_action_at: a deadline, a card to poll,
# a command to re-send), as the saga worker scans them; NEW lasts only inside the transaction that
# creates the payment. The partial index payments_saga_due (gateway migration 010) lists the same.
TIMED_STATES = (SagaState.RISK_CHECK, SagaState.REVIEW, SagaState.RESERVING, SagaState.COMMITTING, SagaState.FUNDING,
                SagaState.HOLDING)


class PaymentMethod(StrEnum):
    """How the buyer pays (OrderPlaced.payment_method; payments.payment_method)."""
    BALANCE = "balance"      # the buyer's wallet: reserved, posted once escrow holds the order
    BANK_CARD = "bank_card"  # a card: authorized by the saga worker, captured once escrow holds the order
    HUABEI = "huabei"        # credit: the credit service reserves the drawdown, committed once escrow holds it


class RiskDecision(StrEnum):
    """The risk engine's (or the fallback's, or an operator's) decision on a payment."""
    APPROVE = "approve"
    REJECT = "reject"
    REVIEW = "review"  # an operator decides (or the review deadline rejects)


class OrderEventState(StrEnum):
    """What became of an upstream order event (order_events.state)."""
    APPLIED = "applied"                    # an OrderPlaced: it made the payment
    DUPLICATE = "duplicate"                # a refund_id seen before: no effect
    FORWARDED = "forwarded"                # sent on to escrow
    PENDING = "pending"                    # kept until the payment has its outcome
    CANCEL_IN_FLIGHT = "cancel_in_flight"  # a cancel forwarded while the payment was in flight
    PARKED = "parked"                      # its order has not arrived yet
    RELEASED = "released"                  # its order arrived: routed in the same transaction
    REJECTED = "rejected"                  # answered with a RefundRejected
    IGNORED = "ignored"                    # nothing to do (e.g. a shipment of a failed payment)
    EXPIRED = "expired"                    # parked longer than PARKED_EVENT_TTL_SECONDS


class RepaymentSource(StrEnum):
    """Where a Huabei repayment's money comes from (repayments.source)."""
    BALANCE = "balance"
    BANK_CARD = "bank_card"


class RepaymentState(StrEnum):
    """repayments.state: taken, then allocated by billing."""
    REQUESTED = "requested"
    ALLOCATED = "allocated"


@dataclass(frozen=True)
class Rules:
    """docs/contract.md §5 defaults; each is a setting."""
    withdrawal_fee_rate: Decimal = percent("0.1")
    withdrawal_free_quota: int = 2_000_000
    withdrawal_min_fee: int = 10
    channel_timeout_seconds: int = 30
    hold_retry_seconds: int = 30  # an unanswered HoldFunds to escrow is re-sent this often
    credit_reserve_retry_seconds: int = 30  # an unanswered ReserveCredit (or CommitCredit) is re-sent this often
    risk_enabled: bool = True
    risk_timeout_seconds: int = 5         # no decision by then: the fallback decides
    risk_fallback_approve_max: int = 100_000  # fallback approves up to 1 000 yuan, rejects above
    review_timeout_seconds: int = 1800    # a review nobody decides is rejected after 30 minutes
    parked_event_ttl_seconds: int = 7 * 86_400  # a shipment/confirmation waits this long for its order

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Rules":
        """The settings of docs/contract.md §5 (README, Settings); unset or blank keeps the default,
        a bad value is a SettingsError naming the variable. CREDIT_RESERVE_RETRY_SECONDS unset
        falls back to ESCROW_HOLD_RETRY_SECONDS (one setting paced both before)."""
        d = cls()
        hold_retry = env_int("ESCROW_HOLD_RETRY_SECONDS", d.hold_retry_seconds, minimum=1, environ=env)
        return cls(
            withdrawal_fee_rate=env_percent("WITHDRAWAL_FEE_PCT", d.withdrawal_fee_rate, environ=env),
            withdrawal_free_quota=env_non_negative_int("WITHDRAWAL_FREE_QUOTA_FEN", d.withdrawal_free_quota,
                                                       environ=env),
            withdrawal_min_fee=env_non_negative_int("WITHDRAWAL_MIN_FEE_FEN", d.withdrawal_min_fee, environ=env),
            channel_timeout_seconds=env_int("BANK_CHANNEL_TIMEOUT_SECONDS", d.channel_timeout_seconds, minimum=1,
                                            environ=env),
            hold_retry_seconds=hold_retry,
            credit_reserve_retry_seconds=env_int("CREDIT_RESERVE_RETRY_SECONDS", hold_retry, minimum=1, environ=env),
            risk_enabled=env_bool("RISK_ENABLED", d.risk_enabled, environ=env),
            risk_timeout_seconds=env_int("RISK_DECISION_TIMEOUT_SECONDS", d.risk_timeout_seconds, minimum=1,
                                         environ=env),
            risk_fallback_approve_max=env_non_negative_int("RISK_FALLBACK_APPROVE_MAX_FEN",
                                                           d.risk_fallback_approve_max, environ=env),
            review_timeout_seconds=env_int("RISK_REVIEW_TIMEOUT_SECONDS", d.review_timeout_seconds, minimum=1,
                                           environ=env),
            parked_event_ttl_seconds=env_int("PARKED_EVENT_TTL_SECONDS", d.parked_event_ttl_seconds, minimum=1,
                                             environ=env),
        )


# ---------------------------------------------------------------- users
class Registration(StrEnum):
    CREATED = "created"      # 201
    REPEATED = "repeated"    # 200: the same body again
    CONFLICT = "conflict"    # 409: the same user_id with a different body


# As stored: phone and id number by their keyed hashes (shared/pii.py).
USER_FIELDS = ("user_id", "full_name", "birth_date", "phone_hash", "id_number_hash", "real_name_verified")


def registration_outcome(existing: dict | None, requested: dict) -> Registration:
    if existing is None:
        return Registration.CREATED
    same = all(existing.get(f) == requested.get(f) for f in USER_FIELDS)
    return Registration.REPEATED if same else Registration.CONFLICT


# ---------------------------------------------------------------- wallets
def withdrawal_fee(amount: int, lifetime_withdrawn: int, rules: Rules) -> int:
    """0.1 % of the part above the remaining lifetime free quota, at least 10 fen when any fee applies."""
    remaining_quota = max(0, rules.withdrawal_free_quota - lifetime_withdrawn)
    charged_part = max(0, amount - remaining_quota)
    if charged_part == 0:
        return 0
    return max(rules.withdrawal_min_fee, apply_rate(charged_part, rules.withdrawal_fee_rate))


# ---------------------------------------------------------------- payment saga
def validation_failure(*, buyer_known: bool, seller_known: bool) -> tuple[str, str] | None:
    """The first rule an order breaks, as (reason_code, message), or None (whether the money is
    there is the funding step's to say, for every method)."""
    if not buyer_known:
        return "UNKNOWN_BUYER", "the buyer is not a registered user"
    if not seller_known:
        return "UNKNOWN_SELLER", "the seller is not a registered user"
    return None


def counted_by_risk_engine(reason_code: str, risk_decision: str | None) -> bool:
    """Whether a failing payment's amount may sit in the risk engine's daily window for its
    buyer (the engine counts approved and reviewed orders), so that it must be taken out again
    (docs/contract.md §5: a rejected order does not count, nor does one whose payment failed).
    Not when it never reached the engine (unknown users), nor when the engine itself rejected
    it (the decision being applied now: the payment has none yet)."""
    if reason_code in ("UNKNOWN_BUYER", "UNKNOWN_SELLER", "DUPLICATE_ORDER"):
        return False
    return not (reason_code == "RISK_REJECTED" and risk_decision is None)


def risk_fallback(amount: int, rules: Rules) -> RiskDecision:
    """When the risk engine is down or slow: approve small payments, reject the rest."""
    return RiskDecision.APPROVE if amount <= rules.risk_fallback_approve_max else RiskDecision.REJECT


def payment_status(*, amount: int, failed: bool, held: bool, released: bool, refunded: int) -> PaymentStatus:
    if failed:
        return PaymentStatus.FAILED
    if not held:
        return PaymentStatus.PENDING
    if refunded >= amount:
        return PaymentStatus.REFUNDED
    if refunded > 0:
        return PaymentStatus.PARTIALLY_REFUNDED
    return PaymentStatus.RELEASED if released else PaymentStatus.HELD


class Route(StrEnum):
    FORWARD = "forward"                  # to escrow now
    KEEP = "keep"                        # until the payment completes
    CANCEL_IN_FLIGHT = "cancel_in_flight"  # forward now and stop the saga where it can be stopped
    PARK = "park"                        # no such order yet: wait for its OrderPlaced (or expire)
    REJECT_UNKNOWN_ORDER = "reject_unknown_order"
    REJECT_NOT_PAID = "reject_not_paid"
    IGNORE = "ignore"


def route_order_event(event_type: str, saga: SagaState | None) -> Route:
    """Where an upstream event goes, given the saga of its order (None: no such order).

    Before its OrderPlaced, a shipment or confirmation waits for the order (another upstream
    system may publish them). A cancel or refund of an unknown order is answered at once with
    UNKNOWN_ORDER, its one documented outcome: the shop learns now, not days later, that the
    platform holds nothing for that order, and sends it again once the order is placed."""
    money_event = event_type in ("OrderCancelled", "RefundRequested")
    if saga is None:
        return Route.REJECT_UNKNOWN_ORDER if money_event else Route.PARK
    if saga is SagaState.FAILED:
        return Route.REJECT_NOT_PAID if money_event else Route.IGNORE
    if saga is SagaState.COMPLETED:
        return Route.FORWARD
    # In progress: a cancel must reach escrow before the hold can (escrow then refuses the
    # hold); everything else waits for the payment's outcome.
    return Route.CANCEL_IN_FLIGHT if event_type == "OrderCancelled" else Route.KEEP


def outcome_for_kept_event(event_type: str, payment_failed_reason: str | None) -> Route:
    """A kept event, once the payment has its outcome."""
    if payment_failed_reason is None:
        return Route.FORWARD
    if event_type == "RefundRequested":
        return Route.REJECT_NOT_PAID
    return Route.IGNORE
