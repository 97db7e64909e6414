"""Credit rules, pure: no I/O. The credit score, Huabei eligibility, the limit, the periodic
limit review, and the try/confirm/cancel arithmetic of a credit line.

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

import os
from dataclasses import dataclass
from datetime import date
from decimal import Decimal

from shared.money import apply_rate, percent

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
    def from_env(cls) -> "ReviewRules":
        env = os.environ.get
        return cls(interval_days=int(env("HUABEI_REVIEW_INTERVAL_DAYS", "30")),
                   min_on_time=int(env("HUABEI_REVIEW_MIN_ON_TIME", "1")),
                   raise_pct=percent(env("HUABEI_REVIEW_RAISE_PCT", "10")),
                   reservation_ttl_seconds=int(env("HUABEI_RESERVATION_TTL_SECONDS", "1800")))


def reviewed_limit(current_limit: int, score: int, *, on_time_since: int, late_since: int, frozen: bool,
                   rules: ReviewRules) -> int:
    """The limit after a review: never lower than before, never above the maximum."""
    if frozen or late_since > 0 or on_time_since < rules.min_on_time:
        return current_limit
    raised = current_limit + apply_rate(current_limit, rules.raise_pct)
    return min(LIMIT_MAX, max(current_limit, limit_for_score(score), raised))
