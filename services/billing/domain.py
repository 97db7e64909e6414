"""Billing rules, pure: no I/O and no clock reads. Every function takes the dates and moments
it needs; moments are timezone-aware datetimes (any zone), business dates are `date`s in the
business time zone (docs/contract.md §5).

What lives here:
- cycles and statements: which cycle (period) a purchase belongs to, when a period's statement
  is issued and due, which statements have fallen due for issuing by a given moment;
- installments: the fee table, the even split with the remainder on period 1, the due dates;
- overdue: which overdue days have been charged by a given moment, the daily penalty;
- repayment allocation: oldest due first, penalty -> fee -> principal within an item;
- refunds of billed purchases: against a statement or the remaining installment principal;
- the statement status shown by `GET /v1/huabei/{user_id}/statements`, and whether a statement
  may be converted to installments.

Money is integer fen; rates are Decimal fractions (0.0005 = 0.05 %). Every percentage is applied
with shared.money.apply_rate (round_half_up to whole fen), once per computed item.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from enum import StrEnum
from types import MappingProxyType
from typing import Iterable, Mapping, Sequence
from zoneinfo import ZoneInfo

from shared.money import apply_rate, percent
from shared.settings import SettingsError, env_int, env_percent

# Installment plans the contract offers; the fee rates are settings, the choice of plans is not.
INSTALLMENT_PERIODS = (3, 6, 9, 12)

# Day settings stay within 1..28 so that "the same day next month" always exists.
_MAX_DAY = 28


# ---------------------------------------------------------------- kinds (CHECKed in migrations)
class ItemKind(StrEnum):
    """What an item (the unit everything is owed on) is."""
    STATEMENT = "statement"      # a cycle's own purchases: the statement's item
    INSTALLMENT = "installment"  # one period of an installment plan


class PlanSource(StrEnum):
    PURCHASE = "purchase"      # installments chosen at purchase (plan 'P-<order_id>')
    CONVERSION = "conversion"  # an issued statement converted (plan 'C-<statement_id>')


class LineKind(StrEnum):
    """What a repayment paid, per item (RepaymentAllocated lines)."""
    STATEMENT = "statement"      # an issued statement's purchases
    INSTALLMENT = "installment"  # an installment period
    OPEN_CYCLE = "open_cycle"    # paid ahead: purchases of the cycle not issued yet


def line_kind(kind: ItemKind, billed: bool) -> LineKind:
    if kind is ItemKind.INSTALLMENT:
        return LineKind.INSTALLMENT
    return LineKind.STATEMENT if billed else LineKind.OPEN_CYCLE


# ---------------------------------------------------------------- ledger accounts (billing's schema)
# Principal is the credit service's loan; billing books only fees and penalties.
GATEWAY = "gateway"                                  # fee and penalty money received through the gateway
REVENUE_INSTALLMENT_FEE = "revenue:installment_fee"  # accrued installment fees (credit-normal)
REVENUE_PENALTY = "revenue:penalty"                  # charged overdue penalties (credit-normal)
FEES_RECEIVABLE_PREFIX = "fees_receivable:"


def fees_receivable(user_id: str) -> str:
    """Fees and penalties the user owes (debit-normal)."""
    return f"{FEES_RECEIVABLE_PREFIX}{user_id}"


# ---------------------------------------------------------------- settings
@dataclass(frozen=True)
class BillingRules:
    """docs/contract.md §5 defaults; each is a setting (see from_env)."""
    business_tz: ZoneInfo = ZoneInfo("Asia/Shanghai")
    statement_day: int = 1   # a cycle's statement is issued at 00:00 of this day of the next month
    due_day: int = 10        # ... and due by the end (24:00) of this day of that same month
    penalty_daily_rate: Decimal = percent("0.05")
    installment_fee_rates: Mapping[int, Decimal] = field(default_factory=lambda: MappingProxyType({
        3: percent("2.3"), 6: percent("4.5"), 9: percent("6.5"), 12: percent("8.8")}))

    def __post_init__(self) -> None:
        # due_day >= statement_day keeps the due day in the month the statement is issued in, so
        # "issued on the 1st of M+1, due on the 10th of M+1" holds for any setting.
        if not 1 <= self.statement_day <= self.due_day <= _MAX_DAY:
            raise ValueError(f"need 1 <= statement day ({self.statement_day}) <= due day ({self.due_day}) <= {_MAX_DAY}")
        if set(self.installment_fee_rates) != set(INSTALLMENT_PERIODS):
            raise ValueError(f"installment fee rates must cover exactly {INSTALLMENT_PERIODS}")
        for rate in (self.penalty_daily_rate, *self.installment_fee_rates.values()):
            if not isinstance(rate, Decimal) or not rate.is_finite() or not 0 <= rate <= 1:
                raise ValueError(f"rates are Decimal fractions between 0 and 1, not {rate!r}")
        # Frozen and shared between tasks: keep the table read-only even if given a dict.
        object.__setattr__(self, "installment_fee_rates", MappingProxyType(dict(self.installment_fee_rates)))

    def installment_fee_rate(self, periods: int) -> Decimal:
        """The total fee rate of a plan; ValueError for a number of periods not offered."""
        if isinstance(periods, bool) or periods not in INSTALLMENT_PERIODS:
            raise ValueError(f"installments are {', '.join(map(str, INSTALLMENT_PERIODS))} periods, not {periods!r}")
        return self.installment_fee_rates[periods]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *,
                 business_tz: ZoneInfo = ZoneInfo("Asia/Shanghai")) -> "BillingRules":
        """Settings (unset or blank keeps the default): STATEMENT_DAY (1), DUE_DAY (10),
        OVERDUE_PENALTY_DAILY_PCT (0.05), INSTALLMENT_FEE_{3,6,9,12}_PCT (2.3, 4.5, 6.5, 8.8),
        percent strings ("0.05" = 0.05 %). The business time zone is the service's
        BUSINESS_TZ (shared.settings, read once there). A bad value raises SettingsError (a
        ValueError) naming the variable, so the service stops at start-up rather than at the
        first bill."""
        default = cls()
        days = {key: env_int(name, getattr(default, key), minimum=1, maximum=_MAX_DAY, environ=env)
                for name, key in (("STATEMENT_DAY", "statement_day"), ("DUE_DAY", "due_day"))}
        try:
            return cls(business_tz=business_tz, **days,
                       penalty_daily_rate=env_percent("OVERDUE_PENALTY_DAILY_PCT", default.penalty_daily_rate,
                                                      environ=env),
                       installment_fee_rates={p: env_percent(f"INSTALLMENT_FEE_{p}_PCT", rate, environ=env)
                                              for p, rate in default.installment_fee_rates.items()})
        except ValueError as exc:  # e.g. DUE_DAY before STATEMENT_DAY
            raise SettingsError(f"STATEMENT_DAY / DUE_DAY: {exc}") from exc


# ---------------------------------------------------------------- dates and cycles
@dataclass(frozen=True, order=True)
class Period:
    """A billing cycle: the month a purchase was committed in (with the default statement day 1).
    Its statement is issued on the statement day of the next month. `str()` is "YYYY-MM", the
    `period` field of the statements API."""
    year: int
    month: int

    def __post_init__(self) -> None:
        if not 1 <= self.month <= 12 or not 1 <= self.year <= 9998:
            raise ValueError(f"not a billing period: {self.year}-{self.month}")

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"

    @classmethod
    def parse(cls, text: str) -> "Period":
        """"2026-12" -> Period(2026, 12)."""
        year, sep, month = text.partition("-")
        if not sep or len(year) != 4 or len(month) != 2 or not (year + month).isdigit():
            raise ValueError(f"a period is YYYY-MM, not {text!r}")
        return cls(int(year), int(month))

    def shift(self, months: int) -> "Period":
        index = self.year * 12 + (self.month - 1) + months
        return Period(index // 12, index % 12 + 1)

    def next(self) -> "Period":
        return self.shift(1)

    def prev(self) -> "Period":
        return self.shift(-1)


def add_months(day: date, months: int) -> date:
    """The same day of the month `months` later (days are <= 28 here, so it always exists)."""
    if day.day > _MAX_DAY:
        raise ValueError(f"only days 1..{_MAX_DAY} repeat every month, not {day}")
    p = Period(day.year, day.month).shift(months)
    return date(p.year, p.month, day.day)


def _require_aware(moment: datetime) -> None:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"moments must be timezone-aware, not {moment!r}")


def business_date(moment: datetime, rules: BillingRules) -> date:
    """The calendar day `moment` falls on in the business time zone."""
    _require_aware(moment)
    return moment.astimezone(rules.business_tz).date()


def day_start(day: date, rules: BillingRules) -> datetime:
    """00:00 of a business day, as an aware datetime in the business time zone. (Where a zone
    skips midnight, zoneinfo maps the gap forward; Asia/Shanghai has no DST.)"""
    return datetime.combine(day, time(0), tzinfo=rules.business_tz)


def cycle_of(moment: datetime, rules: BillingRules) -> Period:
    """The cycle a purchase committed at `moment` posts to: cycle M runs from 00:00 of the
    statement day of M to just before 00:00 of the statement day of M+1 (business time), i.e. the
    calendar month with the default statement day 1."""
    day = business_date(moment, rules)
    period = Period(day.year, day.month)
    return period if day.day >= rules.statement_day else period.prev()


def statement_issue_date(period: Period, rules: BillingRules) -> date:
    """The statement of `period` is issued on the statement day of the next month (the 1st)."""
    p = period.next()
    return date(p.year, p.month, rules.statement_day)


def statement_issue_at(period: Period, rules: BillingRules) -> datetime:
    """The moment the statement of `period` is issued: 00:00 business time of its issue date,
    which is also the moment the next cycle opens. Use it for the issuing timer."""
    return day_start(statement_issue_date(period, rules), rules)


def statement_due_date(period: Period, rules: BillingRules) -> date:
    """The statement of `period` is due on the due day of the month it is issued in (the 10th);
    it may be repaid interest-free until that day ends (24:00 business time)."""
    p = period.next()
    return date(p.year, p.month, rules.due_day)


def first_due_for_purchase(committed_at: datetime, rules: BillingRules) -> date:
    """Installments chosen at purchase: period 1 is due with the first statement after the
    purchase, i.e. the statement of the purchase's own cycle."""
    return statement_due_date(cycle_of(committed_at, rules), rules)


def bills_anything(items: Iterable[Mapping[str, int]]) -> bool:
    """Whether a cycle's items (or their totals) bill anything: principal, fee or penalty. A cycle
    that bills nothing issues no statement and is not listed."""
    return any(i["principal"] + i["fee"] + i["penalty"] > 0 for i in items)


def periods_to_issue(after: Period, now: datetime, rules: BillingRules) -> list[Period]:
    """The periods after `after` whose statements have fallen due for issuing by `now`, oldest
    first. A statement is issued when its successor cycle opens, so these are the periods from
    `after.next()` up to, not including, the cycle `now` is in. `after` is the last period issued;
    for an account with no statement yet pass the period before its first cycle (e.g.
    `cycle_of(activated_at, rules).prev()`). Whether an empty statement is kept is the caller's
    choice."""
    current = cycle_of(now, rules)
    periods = []
    period = after.next()
    while period < current:
        periods.append(period)
        period = period.next()
    return periods


# ---------------------------------------------------------------- installments
@dataclass(frozen=True)
class InstallmentPeriod:
    period_no: int   # 1-based
    due_on: date
    principal: int
    fee: int


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` in `parts` equal whole-fen shares, the remainder fen all on the first share."""
    if total < 0 or parts < 1:
        raise ValueError("split a non-negative amount into at least one part")
    share, remainder = divmod(total, parts)
    return [share + remainder] + [share] * (parts - 1)


def installment_fee(principal: int, periods: int, rules: BillingRules) -> int:
    """The plan's total fee: one round_half_up of principal * rate(periods)."""
    return apply_rate(principal, rules.installment_fee_rate(periods))


def installment_plan(principal: int, periods: int, first_due: date, rules: BillingRules) -> list[InstallmentPeriod]:
    """Split `principal` over `periods` (3/6/9/12, else ValueError). The total fee is rounded
    once; principal and fee are each split evenly with the remainder fen on period 1. Period k is
    due on the same day of the month as period 1 (the due day), k-1 months after `first_due`.
    `first_due`: a converted statement's own due date, or first_due_for_purchase(...)."""
    if not isinstance(principal, int) or isinstance(principal, bool) or principal <= 0:
        raise ValueError(f"installment principal must be a positive number of fen, not {principal!r}")
    fee = installment_fee(principal, periods, rules)  # also rejects a bad `periods`
    return [InstallmentPeriod(period_no=k, due_on=add_months(first_due, k - 1), principal=p, fee=f)
            for k, (p, f) in enumerate(zip(split_evenly(principal, periods), split_evenly(fee, periods)), start=1)]


# ---------------------------------------------------------------- overdue
def overdue_day_charged_at(day: date, rules: BillingRules) -> datetime:
    """An overdue day is charged when it ends: 24:00 business time, i.e. 00:00 of the next day."""
    return day_start(day + timedelta(days=1), rules)


def charged_overdue_days(due_on: date, now: datetime, rules: BillingRules, *, after: date | None = None) -> list[date]:
    """The overdue days whose penalty has been charged by `now`, oldest first. The first overdue
    day is the day after the due day, and a day is charged once it has ended, so these are
    due_on+1 ... business_date(now)-1. Example: due on the 10th, now 00:00:01 on the 28th ->
    the 11th ... 27th (17 days); at 23:59:59 on the 27th -> 11th ... 26th (16 days).
    `after`: leave out days up to and including this one (those already charged)."""
    first = due_on + timedelta(days=1)
    if after is not None and after >= first:
        first = after + timedelta(days=1)
    today = business_date(now, rules)
    return [first + timedelta(days=i) for i in range(max(0, (today - first).days))]


def late_penalty_through(due_on: date, now: datetime, rules: BillingRules) -> date | None:
    """For principal posted after its due day: the overdue days already over are not charged
    (the `after` of `charged_overdue_days`); None when none is over yet."""
    yesterday = business_date(now, rules) - timedelta(days=1)
    return yesterday if yesterday > due_on else None


def daily_penalty(overdue_principal: int, rules: BillingRules) -> int:
    """One overdue day's penalty: round_half_up(unpaid principal * 0.05 %)."""
    if overdue_principal < 0:
        raise ValueError("principal cannot be negative")
    return apply_rate(overdue_principal, rules.penalty_daily_rate)


def is_overdue(due_on: date, outstanding: int, now: datetime, rules: BillingRules) -> bool:
    """Interest-free rule: an item repaid in full by the end of its due day (24:00 business time)
    is never overdue and costs nothing extra. Overdue = something still owed after that.
    `outstanding` is everything still owed on the item (principal, fee and penalty): the account
    stays frozen until every overdue amount, penalties included, is repaid; penalties themselves
    only accrue on the principal."""
    return outstanding > 0 and business_date(now, rules) > due_on


# ---------------------------------------------------------------- repayment allocation
@dataclass(frozen=True)
class Owed:
    """What is still outstanding on one billed item (a statement or an installment period)."""
    item_id: str
    due_on: date
    penalty: int = 0
    fee: int = 0
    principal: int = 0

    @property
    def total(self) -> int:
        return self.penalty + self.fee + self.principal


@dataclass(frozen=True)
class Paid:
    """What one repayment paid on one item."""
    item_id: str
    due_on: date
    penalty: int
    fee: int
    principal: int

    @property
    def total(self) -> int:
        return self.penalty + self.fee + self.principal


@dataclass(frozen=True)
class Allocation:
    lines: tuple[Paid, ...]  # items that received something, in allocation order
    remainder: int           # not owed anywhere: an overpayment, back to the wallet

    @property
    def allocated(self) -> int:
        return sum(line.total for line in self.lines)

    @property
    def principal(self) -> int:
        """Principal repaid: this much credit line becomes available again."""
        return sum(line.principal for line in self.lines)


def allocate(amount: int, items: Sequence[Owed]) -> Allocation:
    """Allocate a repayment: oldest due first (items due on the same day keep the caller's order,
    so pass them in a stable order); within an item penalty, then fee, then principal. Each item is
    settled completely before the next one gets anything. Nothing is ever paid beyond what is
    owed; what is left over is the remainder."""
    if amount < 0:
        raise ValueError("a repayment cannot be negative")
    if len({item.item_id for item in items}) != len(items):
        raise ValueError("each owed item appears once")
    if any(min(item.penalty, item.fee, item.principal) < 0 for item in items):
        raise ValueError("owed amounts cannot be negative")
    left = amount
    lines = []
    for item in sorted(items, key=lambda item: item.due_on):  # sorted() is stable
        parts = []
        for owed in (item.penalty, item.fee, item.principal):
            part = min(left, owed)
            parts.append(part)
            left -= part
        if any(parts):
            lines.append(Paid(item.item_id, item.due_on, *parts))
        if left == 0:
            break
    return Allocation(lines=tuple(lines), remainder=left)


# ---------------------------------------------------------------- refunds of billed purchases
@dataclass(frozen=True)
class StatementRefund:
    principal_reduced: int  # taken off the statement's outstanding principal
    overpayment: int        # the rest: back to the user's wallet


def apply_refund_to_statement(outstanding_principal: int, refund: int) -> StatementRefund:
    """A refund of a purchase billed on a statement (or still in the open cycle) reduces that
    statement's outstanding principal, never below zero; what exceeds it (the purchase had already
    been repaid) is an overpayment returned to the wallet. Penalties already charged stay owed."""
    if refund < 0 or outstanding_principal < 0:
        raise ValueError("amounts cannot be negative")
    reduced = min(refund, outstanding_principal)
    return StatementRefund(principal_reduced=reduced, overpayment=refund - reduced)


@dataclass(frozen=True)
class PlanPeriod:
    """One period of an installment plan as it stands (amounts after earlier refunds)."""
    period_no: int
    due_on: date
    principal: int
    fee: int
    principal_paid: int = 0
    fee_paid: int = 0


@dataclass(frozen=True)
class PlanRefund:
    periods: tuple[PlanPeriod, ...]  # the plan afterwards, by period_no
    principal_reduced: int
    fee_waived: int
    overpayment: int                 # back to the wallet: refund not absorbed + fee paid ahead and waived


def fee_accrued(due_on: date, now: datetime, rules: BillingRules) -> bool:
    """An installment period's fee accrues when the period is billed: on the statement day of the
    month it is due in (for a converted statement's period 1, the statement's own issue date).
    Until then a refund can still waive it."""
    return business_date(now, rules) >= due_on.replace(day=rules.statement_day)


def apply_refund_to_installments(periods: Sequence[PlanPeriod], refund: int, now: datetime,
                                 rules: BillingRules) -> PlanRefund:
    """A refund of a purchase paid in installments (or of one inside a converted statement).

    - Principal: the refund reduces the plan's unpaid principal, latest period first (the plan
      gets shorter; earlier periods keep their amounts and due dates), down to what is already
      paid and never below zero. What the unpaid principal cannot absorb is an overpayment.
    - Fee: a period whose principal is reduced and whose fee has not accrued yet (fee_accrued)
      gets its fee recomputed on its new principal, round_half_up(new principal * plan rate) --
      a period's fee is its principal times the plan's rate, up to the split's rounding -- and
      never more than it was; an emptied period's fee is 0. Accrued fees stay owed. A fee paid
      ahead beyond the new fee is returned with the overpayment.

    `periods` is the whole plan (periods 1..n, n in 3/6/9/12 giving the rate)."""
    if refund < 0:
        raise ValueError("a refund cannot be negative")
    ordered = sorted(periods, key=lambda p: p.period_no)
    if [p.period_no for p in ordered] != list(range(1, len(ordered) + 1)):
        raise ValueError("pass the whole plan: periods 1..n")
    rate = rules.installment_fee_rate(len(ordered))
    for p in ordered:
        if min(p.principal, p.fee, p.principal_paid, p.fee_paid) < 0 or p.principal_paid > p.principal \
                or p.fee_paid > p.fee:
            raise ValueError(f"inconsistent plan period {p}")

    left = refund
    fee_waived = fee_returned = 0
    result = {p.period_no: p for p in ordered}
    for p in reversed(ordered):  # latest period first
        if left == 0:
            break
        cut = min(left, p.principal - p.principal_paid)
        if cut == 0:
            continue
        left -= cut
        new_principal = p.principal - cut
        new_fee = p.fee
        if not fee_accrued(p.due_on, now, rules):
            new_fee = min(p.fee, apply_rate(new_principal, rate))
        new_fee_paid = min(p.fee_paid, new_fee)
        fee_waived += p.fee - new_fee
        fee_returned += p.fee_paid - new_fee_paid
        result[p.period_no] = replace(p, principal=new_principal, fee=new_fee, fee_paid=new_fee_paid)
    return PlanRefund(periods=tuple(result[p.period_no] for p in ordered), principal_reduced=refund - left,
                      fee_waived=fee_waived, overpayment=left + fee_returned)


# ---------------------------------------------------------------- statements
class StatementStatus(StrEnum):
    OPEN = "open"                # the cycle is still running: not issued yet
    ISSUED = "issued"            # issued, something owed, not past the due day
    PAID = "paid"                # nothing outstanding
    OVERDUE = "overdue"          # something still owed after the due day ended
    INSTALLMENT = "installment"  # converted: what is owed now lives in the installment plan


def statement_status(issued: bool, due_on: date, now: datetime, outstanding: int, converted: bool,
                     rules: BillingRules) -> StatementStatus:
    """The `status` of a statement (docs/contract.md §6). `outstanding`: everything still owed on the
    statement itself (principal, fee, penalty). A converted statement stays "installment" -- its
    periods carry their own due dates and overdue state."""
    if not issued:
        return StatementStatus.OPEN
    if converted:
        return StatementStatus.INSTALLMENT
    if outstanding <= 0:
        return StatementStatus.PAID
    return StatementStatus.OVERDUE if is_overdue(due_on, outstanding, now, rules) else StatementStatus.ISSUED


def conversion_refusal(*, issued: bool, converted: bool, due_on: date, outstanding_principal: int, now: datetime,
                       rules: BillingRules) -> tuple[str, str] | None:
    """Why a statement cannot be converted to installments now, as (code, message) for a 409, or
    None. Only an issued, not yet due, not yet converted statement with principal still owed can
    be; "not yet due" means its due day has not ended (it could still be repaid interest-free).
    The plan's principal is the statement's outstanding principal. (The number of periods is
    checked separately: BillingRules.installment_fee_rate raises ValueError.)"""
    if not issued:
        return "STATEMENT_NOT_ISSUED", "the statement has not been issued yet"
    if converted:
        return "STATEMENT_ALREADY_CONVERTED", "the statement has already been converted to installments"
    if business_date(now, rules) > due_on:
        return "STATEMENT_PAST_DUE", "the statement is past its due day"
    if outstanding_principal <= 0:
        return "STATEMENT_NOTHING_OWED", "nothing is owed on the statement"
    return None


# ---------------------------------------------------------------- helpers of the billing service
def statement_id(user_id: str, period: Period) -> str:
    """The statement of `user_id`'s cycle `period`: deterministic, so the open cycle shows the id
    its statement will have, e.g. "S202612-u-1"."""
    return f"S{period.year:04d}{period.month:02d}-{user_id}"


def parse_statement_id(text: str) -> tuple[Period, str] | None:
    """statement_id -> (period, user_id), or None when `text` is not a statement id."""
    if len(text) < 9 or text[0] != "S" or text[7] != "-" or not text[1:7].isdigit():
        return None
    try:
        period = Period(int(text[1:5]), int(text[5:7]))
    except ValueError:
        return None
    return period, text[8:]


def statement_period_for_due(due_on: date, rules: BillingRules) -> Period:
    """The cycle whose statement is due on `due_on` (an installment period due that day is billed
    on that statement). ValueError when no statement is due that day."""
    period = Period(due_on.year, due_on.month).prev()
    if statement_due_date(period, rules) != due_on:
        raise ValueError(f"no statement is due on {due_on}")
    return period


def days_overdue(oldest_due: date, now: datetime, rules: BillingRules) -> int:
    """How many days late the oldest unpaid item is, counting the day running: 1 on the first
    overdue day (the day after the due day), 18 at 00:00:01 on the 28th for an item due on the 10th
    (whose 11th ... 27th have been charged). 0 when it is not overdue."""
    return max(0, (business_date(now, rules) - oldest_due).days)


def repaid_on_time(due_dates: Iterable[date], now: datetime, rules: BillingRules) -> bool:
    """RepaymentApplied.on_time: nothing the repayment paid was past its due day at `now` (it paid
    no overdue item and hence no penalty). Paying ahead (the open cycle, later installments) is on time."""
    today = business_date(now, rules)
    return all(today <= due for due in due_dates)


def next_check_at(next_issue: Period, oldest_unpaid_due: date | None, now: datetime, rules: BillingRules) -> datetime:
    """When the billing timer next has something to do for a user: issue the statement of
    `next_issue`, or, for the oldest billed item still owed, make it overdue (00:00 after its due
    day) or, once it is overdue, charge the day that is running (00:00 tomorrow)."""
    moment = statement_issue_at(next_issue, rules)
    if oldest_unpaid_due is not None:
        today = business_date(now, rules)
        moment = min(moment, day_start(max(oldest_unpaid_due, today) + timedelta(days=1), rules))
    return moment
