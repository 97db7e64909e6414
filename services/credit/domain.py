"""Credit rules, pure: no I/O. The credit score, Huabei eligibility, the limit, the periodic
limit review, and the try/confirm/cancel of drawdowns (the reservation's state machine).

The credit score (350 … 950) is a sum of documented points over the profile and behaviour
the credit service has seen in events, clamped to the range:

    base                                   550
    real-name verified                     +50
    phone number on file                   +20
    age on the scoring date                18–22: 0, 23–30: +30, 31–50: +50, 51–65: +30, other: 0
    account age                            +80 × min(days registered, 730) / 730  (rounded down)
    successful payments                    +1 each, at most +100
    on-time repayments                     +5 each, at most +120
    late repayments                        −25 each
    days overdue (longest stretch seen)    −2 per day, at most −360

Each behaviour term only moves one way, so more on-time repayment never lowers the score and
an overdue day or a late repayment never raises it (the clamp keeps that true).

The limit grows linearly with the score from 50 000 fen at 350 to 5 000 000 fen at 950
(8 250 fen per point): a higher score never gives a lower limit.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Mapping

from shared.events import (CreditRefused, CreditReserved, DrawdownCommitted, DrawdownRefunded, ReserveCredit,
                           RestoreCredit)
from shared.money import apply_rate, percent
from shared.settings import env_int, env_non_negative_int, env_percent

SCORE_MIN, SCORE_MAX = 350, 950
LIMIT_MIN, LIMIT_MAX = 50_000, 5_000_000


@dataclass(frozen=True)
class Behaviour:
    successful_payments: int = 0
    on_time_repayments: int = 0
    late_repayments: int = 0
    days_overdue: int = 0


@dataclass(frozen=True)
class Profile:
    user_id: str
    birth_date: date | None
    phone: str | None
    id_number: str | None
    real_name_verified: bool
    registered_on: date


def age_on(birth_date: date, day: date) -> int:
    return day.year - birth_date.year - ((day.month, day.day) < (birth_date.month, birth_date.day))


def _age_points(age: int | None) -> int:
    if age is None:
        return 0
    for low, high, points in ((18, 22, 0), (23, 30, 30), (31, 50, 50), (51, 65, 30)):
        if low <= age <= high:
            return points
    return 0


def credit_score(profile: Profile, behaviour: Behaviour, today: date) -> int:
    points = 550
    points += 50 if profile.real_name_verified else 0
    points += 20 if profile.phone else 0
    points += _age_points(age_on(profile.birth_date, today) if profile.birth_date else None)
    points += 80 * min(max((today - profile.registered_on).days, 0), 730) // 730
    points += min(behaviour.successful_payments, 100)
    points += min(5 * behaviour.on_time_repayments, 120)
    points -= 25 * behaviour.late_repayments
    points -= min(2 * behaviour.days_overdue, 360)
    return max(SCORE_MIN, min(SCORE_MAX, points))


def limit_for_score(score: int) -> int:
    score = max(SCORE_MIN, min(SCORE_MAX, score))
    return LIMIT_MIN + (score - SCORE_MIN) * (LIMIT_MAX - LIMIT_MIN) // (SCORE_MAX - SCORE_MIN)


# ---------------------------------------------------------------- eligibility
def eligibility_failure(profile: Profile, today: date, *, id_number_taken: bool, phone_taken: bool) -> str | None:
    """The first eligibility rule (docs/contract.md §5) the user fails, as a message naming it, or None."""
    if profile.birth_date is None or age_on(profile.birth_date, today) < 18:
        return "age: must be at least 18 on the activation date"
    if not profile.real_name_verified:
        return "real_name_verified: the user's real name is not verified"
    if not profile.phone:
        return "phone: a phone number is required"
    if not profile.id_number:
        return "id_number: an id number is required (one Huabei account per id number)"
    if id_number_taken:
        return "id_number: another Huabei account already uses this id number"
    if phone_taken:
        return "phone: another Huabei account already uses this phone number"
    return None


# ---------------------------------------------------------------- the credit line
class AccountStatus(StrEnum):
    """A Huabei account's status (huabei_accounts.status, CHECKed)."""
    ACTIVE = "active"  # may draw down
    FROZEN = "frozen"  # overdue at billing (AccountOverdue): no drawdown until AccountSettled


@dataclass(frozen=True)
class Line:
    credit_limit: int
    used: int      # committed principal not yet repaid or refunded
    reserved: int  # tried, not yet confirmed or cancelled
    frozen: bool

    @property
    def available(self) -> int:
        return max(0, self.credit_limit - self.used - self.reserved)


def reservation_refusal(line: Line | None, amount: int) -> tuple[str, str] | None:
    """Why a drawdown of `amount` cannot be reserved, as (reason_code, message), or None."""
    if line is None:
        return "HUABEI_NOT_ACTIVE", "the buyer has no active Huabei account"
    if line.frozen:
        return "HUABEI_FROZEN", "the buyer's Huabei account is frozen until overdue amounts are repaid"
    if amount > line.available:
        return "CREDIT_LIMIT_EXCEEDED", f"{amount} fen exceeds the available credit of {line.available} fen"
    return None


# ---------------------------------------------------------------- limit review
@dataclass(frozen=True)
class ReviewRules:
    """The periodic limit review: every `interval_days`, a user with at least `min_on_time`
    on-time repayments since the last review, no late repayment since then and not frozen gets
    max(limit from the current score, limit + `raise_pct` %), never above the maximum."""
    interval_days: int = 30
    min_on_time: int = 1
    raise_pct: Decimal = percent("10")
    reservation_ttl_seconds: int = 1800

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ReviewRules":
        """HUABEI_REVIEW_INTERVAL_DAYS, HUABEI_REVIEW_MIN_ON_TIME, HUABEI_REVIEW_RAISE_PCT (percent),
        HUABEI_RESERVATION_TTL_SECONDS; unset or blank keeps the default, a bad value is a
        SettingsError naming the variable."""
        d = cls()
        return cls(interval_days=env_int("HUABEI_REVIEW_INTERVAL_DAYS", d.interval_days, minimum=1, environ=env),
                   min_on_time=env_non_negative_int("HUABEI_REVIEW_MIN_ON_TIME", d.min_on_time, environ=env),
                   raise_pct=env_percent("HUABEI_REVIEW_RAISE_PCT", d.raise_pct, environ=env),
                   reservation_ttl_seconds=env_int("HUABEI_RESERVATION_TTL_SECONDS", d.reservation_ttl_seconds,
                                                   minimum=1, environ=env))


def reviewed_limit(current_limit: int, score: int, *, on_time_since: int, late_since: int, frozen: bool,
                   rules: ReviewRules) -> int:
    """The limit after a review: never lower than before, never above the maximum."""
    if frozen or late_since > 0 or on_time_since < rules.min_on_time:
        return current_limit
    raised = current_limit + apply_rate(current_limit, rules.raise_pct)
    return min(LIMIT_MAX, max(current_limit, limit_for_score(score), raised))


# ---------------------------------------------------------------- drawdowns: try / confirm / cancel
# One order's reservation as a state machine. Each `on_*` takes the reservation as it stands
# (None: none yet) and returns a `CreditDecision`: the reservation to save, how the line's
# `reserved` and `used` move, the loan transfers and the credit.events to emit. handlers.py
# applies it; tests/unit/test_saga_simulation.py drives the same functions.
class ReservationState(StrEnum):
    RESERVED = "reserved"    # tried: counted in the line's `reserved`
    COMMITTED = "committed"  # confirmed: a drawdown, counted in `used`
    CANCELLED = "cancelled"  # the saga compensated (a committed drawdown is reversed)
    EXPIRED = "expired"      # not confirmed within the TTL: the credit is free again (a commit re-checks the line)
    REFUSED = "refused"      # at the try, or at the commit of an expired one (kept: the same answer again)


@dataclass(frozen=True)
class Reservation:
    order_id: str
    user_id: str
    amount: int
    installments: int
    state: ReservationState
    expires_at: datetime
    reason_code: str | None = None
    message: str | None = None
    committed_at: datetime | None = None  # DrawdownCommitted's, answered again to a re-sent commit

    @classmethod
    def from_row(cls, row) -> "Reservation":
        return cls(order_id=row["order_id"], user_id=row["user_id"], amount=row["amount"],
                   installments=row["installments"], state=ReservationState(row["state"]),
                   expires_at=row["expires_at"], reason_code=row["reason_code"], message=row["message"],
                   committed_at=row["committed_at"])


@dataclass(frozen=True)
class LoanTransfer:
    id: str
    debit: str
    credit: str
    amount: int
    code: str


@dataclass(frozen=True)
class CreditDecision:
    reservation: Reservation | None = None  # to save (new, or its state changed); None: unchanged
    reserved: int = 0                       # change of the line's `reserved`
    used: int = 0                           # change of the line's `used`
    transfers: tuple[LoanTransfer, ...] = ()
    emit: tuple = ()                        # credit.events, keyed by the order

    @property
    def changes_nothing(self) -> bool:
        return self.reservation is None and not self.reserved and not self.used and not self.transfers \
            and not self.emit


CREDIT_NOTHING = CreditDecision()

# Ledger accounts of credit (shared/ledger.py).
LENT = "gateway"      # money lent out through the gateway (credit-normal: `loan:<user>` owes it)
LOAN_PREFIX = "loan:"  # one per buyer: what the buyer owes the lender (debit-normal)


# DrawdownRefunded.refund_key of a drawdown reversed because escrow refused the hold (refunds are
# "r:<refund_id>" or "cancel": no clash).
HOLD_REFUSED = "hold_refused"


def loan_account(user_id: str) -> str:
    return f"{LOAN_PREFIX}{user_id}"


def new_reservation(cmd: ReserveCredit, now: datetime, ttl_seconds: int,
                    refusal: tuple[str, str] | None) -> CreditDecision:
    r = Reservation(order_id=cmd.order_id, user_id=cmd.user_id, amount=cmd.amount, installments=cmd.installments,
                    state=ReservationState.REFUSED if refusal else ReservationState.RESERVED,
                    expires_at=now + timedelta(seconds=ttl_seconds), reason_code=refusal[0] if refusal else None,
                    message=refusal[1] if refusal else None)
    if refusal:
        return CreditDecision(reservation=r, emit=(CreditRefused(order_id=cmd.order_id, user_id=cmd.user_id,
                                                                 reason_code=refusal[0], message=refusal[1]),))
    return CreditDecision(reservation=r, reserved=cmd.amount,
                          emit=(CreditReserved(order_id=cmd.order_id, user_id=cmd.user_id, amount=cmd.amount),))


def on_reserve(existing: Reservation | None, line: Line | None, cmd: ReserveCredit, now: datetime,
               ttl_seconds: int) -> CreditDecision:
    """Try: reserve the amount on the line, or refuse. A re-sent command gets the same answer."""
    if existing is not None:
        if existing.state is ReservationState.REFUSED:
            return CreditDecision(emit=(CreditRefused(order_id=cmd.order_id, user_id=cmd.user_id,
                                                      reason_code=existing.reason_code, message=existing.message),))
        if existing.state in (ReservationState.RESERVED, ReservationState.COMMITTED):
            return CreditDecision(emit=(CreditReserved(order_id=cmd.order_id, user_id=cmd.user_id,
                                                       amount=existing.amount),))
        return CREDIT_NOTHING
    return new_reservation(cmd, now, ttl_seconds, reservation_refusal(line, cmd.amount))


def _drawdown(r: Reservation) -> DrawdownCommitted:
    return DrawdownCommitted(order_id=r.order_id, user_id=r.user_id, amount=r.amount, installments=r.installments,
                             committed_at=r.committed_at)


def on_commit(r: Reservation | None, line: Line | None, now: datetime) -> CreditDecision:
    """Confirm: the reservation becomes a drawdown (a loan) for billing. The saga commits before
    escrow holds any money, so a commit may be refused: one whose reservation expired first gave
    its credit back, which other orders may have taken since, so it is checked against `line`
    (the account as it stands, locked by the caller) like a new reservation and refused if it no
    longer fits. That keeps every line within its limit. A re-sent command gets the same answer."""
    if r is None or r.state is ReservationState.CANCELLED:
        return CREDIT_NOTHING
    if r.state is ReservationState.COMMITTED:  # (committed_at unknown: committed before it was kept)
        return CreditDecision(emit=(_drawdown(r if r.committed_at else replace(r, committed_at=now)),))
    if r.state is ReservationState.REFUSED:
        return CreditDecision(emit=(CreditRefused(order_id=r.order_id, user_id=r.user_id, reason_code=r.reason_code,
                                                  message=r.message),))
    if r.state is ReservationState.EXPIRED:
        refusal = reservation_refusal(line, r.amount)
        if refusal:
            code, message = refusal[0], f"the reservation expired before the payment was confirmed; {refusal[1]}"
            return CreditDecision(
                reservation=replace(r, state=ReservationState.REFUSED, reason_code=code, message=message),
                emit=(CreditRefused(order_id=r.order_id, user_id=r.user_id, reason_code=code, message=message),))
    committed = replace(r, state=ReservationState.COMMITTED, committed_at=now)
    return CreditDecision(
        reservation=committed, reserved=-r.amount if r.state is ReservationState.RESERVED else 0, used=r.amount,
        transfers=(LoanTransfer(f"drawdown:{r.order_id}", loan_account(r.user_id), LENT, r.amount, "drawdown"),),
        emit=(_drawdown(committed),))


def on_cancel(r: Reservation | None, now: datetime) -> CreditDecision:
    """Cancel: the saga compensates. A reservation gives its credit back; a committed drawdown
    (escrow refused the hold that came after it) is reversed: the loan is cleared and billing
    hears of it as a refund of the whole purchase (refund_key `hold_refused`)."""
    if r is None:
        return CREDIT_NOTHING
    if r.state is ReservationState.RESERVED:
        return CreditDecision(reservation=replace(r, state=ReservationState.CANCELLED), reserved=-r.amount)
    if r.state is ReservationState.COMMITTED:
        return CreditDecision(
            reservation=replace(r, state=ReservationState.CANCELLED), used=-r.amount,
            transfers=(LoanTransfer(f"drawdown-void:{r.order_id}", LENT, loan_account(r.user_id), r.amount,
                                    "drawdown_void"),),
            emit=(DrawdownRefunded(order_id=r.order_id, user_id=r.user_id, amount=r.amount,
                                   refund_key=HOLD_REFUSED, refunded_at=now),))
    return CREDIT_NOTHING


def on_expire(r: Reservation, now: datetime) -> CreditDecision:
    if r.state is not ReservationState.RESERVED or r.expires_at > now:
        return CREDIT_NOTHING
    return CreditDecision(reservation=replace(r, state=ReservationState.EXPIRED), reserved=-r.amount)


def on_restore(first: bool, cmd: RestoreCredit, now: datetime) -> CreditDecision:
    """A refund of a Huabei-funded order: the principal goes back to the lender and the line,
    once per refund (`first`: this refund_key was not restored before)."""
    if not first:
        return CREDIT_NOTHING
    return CreditDecision(
        used=-cmd.amount,
        transfers=(LoanTransfer(f"restore:{cmd.order_id}:{cmd.refund_key}", LENT, loan_account(cmd.user_id),
                                cmd.amount, "refund"),),
        emit=(DrawdownRefunded(order_id=cmd.order_id, user_id=cmd.user_id, amount=cmd.amount,
                               refund_key=cmd.refund_key, refunded_at=now),))
