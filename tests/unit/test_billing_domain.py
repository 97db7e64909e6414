"""Billing rules against independent, straightforward reference calculations (hypothesis), plus
worked examples from docs/contract.md §5.

The references deliberately avoid the code under test: money rounding uses exact fractions and
integer arithmetic instead of Decimal.quantize, Asia/Shanghai is a fixed UTC+8 offset (it has had
no DST since 1991) instead of zoneinfo, and dates are walked one day / one month at a time.
"""
from __future__ import annotations

from dataclasses import replace
from datetime import date, datetime, timedelta, timezone
from fractions import Fraction
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings, strategies as st

from services.billing.domain import (INSTALLMENT_PERIODS, BillingRules, InstallmentPeriod, Owed, Period,
                                     PlanPeriod, StatementStatus, allocate, apply_refund_to_installments,
                                     apply_refund_to_statement, business_date, charged_overdue_days,
                                     conversion_refusal, cycle_of, daily_penalty, fee_accrued,
                                     first_due_for_purchase, installment_fee, installment_plan, is_overdue,
                                     late_penalty_through,
                                     next_check_at, overdue_day_charged_at, periods_to_issue, bills_anything,
                                     statement_due_date, statement_issue_at, statement_issue_date, statement_status)

RULES = BillingRules()
UTC = timezone.utc
CST = timezone(timedelta(hours=8))  # Asia/Shanghai, fixed offset

# The contract's numbers as exact fractions.
REF_FEE_RATES = {3: Fraction(23, 1000), 6: Fraction(45, 1000), 9: Fraction(65, 1000), 12: Fraction(88, 1000)}
REF_PENALTY_RATE = Fraction(5, 10000)


# ---------------------------------------------------------------- reference implementations
def ref_round_half_up(x: Fraction) -> int:
    """Half up to a whole number, for x >= 0: floor(x + 1/2) in integers."""
    assert x >= 0
    return (2 * x.numerator + x.denominator) // (2 * x.denominator)


def ref_business_date(moment: datetime) -> date:
    return (moment.astimezone(UTC) + timedelta(hours=8)).date()


def ref_next_month(year: int, month: int) -> tuple[int, int]:
    return (year + 1, 1) if month == 12 else (year, month + 1)


def ref_cycle(moment: datetime) -> tuple[int, int]:
    d = ref_business_date(moment)
    return d.year, d.month


def ref_issue_moment(year: int, month: int) -> datetime:
    y, m = ref_next_month(year, month)
    return datetime(y, m, 1, tzinfo=CST)


def ref_plan(principal: int, periods: int, first_due: date) -> list[tuple[int, date, int, int]]:
    fee = ref_round_half_up(principal * REF_FEE_RATES[periods])
    principals = [principal // periods] * periods
    while sum(principals) < principal:
        principals[0] += 1
    fees = [fee // periods] * periods
    while sum(fees) < fee:
        fees[0] += 1
    dues = []
    y, m = first_due.year, first_due.month
    for _ in range(periods):
        dues.append(date(y, m, first_due.day))
        y, m = ref_next_month(y, m)
    return [(k + 1, dues[k], principals[k], fees[k]) for k in range(periods)]


def ref_charged_days(due_on: date, now: datetime) -> list[date]:
    """Walk the days from the first overdue day; each is charged once 24:00 (CST) of it has passed."""
    days = []
    day = due_on + timedelta(days=1)
    while datetime(day.year, day.month, day.day, tzinfo=CST) + timedelta(days=1) <= now:
        days.append(day)
        day += timedelta(days=1)
    return days


def ref_allocate(amount: int, items: list[Owed]) -> tuple[dict, int]:
    """Fen by fen: each fen goes to the first thing still owed in (due date, input order, part) order."""
    owed = []
    for index, item in enumerate(items):
        for part_no, (part, value) in enumerate((("penalty", item.penalty), ("fee", item.fee),
                                                 ("principal", item.principal))):
            owed.append([(item.due_on, index, part_no), item.item_id, part, value])
    owed.sort(key=lambda row: row[0])
    paid = {item.item_id: {"penalty": 0, "fee": 0, "principal": 0} for item in items}
    left = amount
    for row in owed:
        take = min(left, row[3])
        paid[row[1]][row[2]] += take
        left -= take
    return paid, left


# ---------------------------------------------------------------- strategies
OFFSETS = st.sampled_from([UTC, CST, timezone(timedelta(hours=-5)), timezone(timedelta(hours=5, minutes=30)),
                           timezone(timedelta(hours=-12)), timezone(timedelta(hours=14))])
moments = st.builds(lambda naive, tz: naive.replace(tzinfo=UTC).astimezone(tz),
                    st.datetimes(min_value=datetime(2001, 1, 1), max_value=datetime(2099, 1, 1)), OFFSETS)
dates = st.dates(min_value=date(2001, 1, 1), max_value=date(2098, 12, 31))
due_days = st.builds(lambda y, m, d: date(y, m, d), st.integers(2001, 2098), st.integers(1, 12), st.integers(1, 28))
periods_st = st.builds(Period, st.integers(2001, 2098), st.integers(1, 12))
fen = st.integers(min_value=0, max_value=10**11)


# ---------------------------------------------------------------- settings
def test_default_rules_are_the_contract():
    assert RULES.business_tz == ZoneInfo("Asia/Shanghai")
    assert (RULES.statement_day, RULES.due_day) == (1, 10)
    assert RULES.penalty_daily_rate == Fraction(5, 10000)
    assert {k: Fraction(v) for k, v in RULES.installment_fee_rates.items()} == REF_FEE_RATES
    assert BillingRules.from_env({}) == RULES
    assert BillingRules.from_env({"STATEMENT_DAY": " ", "DUE_DAY": ""}) == RULES


def test_rules_from_env():
    rules = BillingRules.from_env({"STATEMENT_DAY": "2", "DUE_DAY": "15", "OVERDUE_PENALTY_DAILY_PCT": "0.1",
                                   "INSTALLMENT_FEE_6_PCT": "5"}, business_tz=ZoneInfo("Europe/Berlin"))
    assert rules.business_tz == ZoneInfo("Europe/Berlin")
    assert (rules.statement_day, rules.due_day) == (2, 15)
    assert rules.penalty_daily_rate == Fraction(1, 1000)
    assert rules.installment_fee_rate(6) == Fraction(5, 100)
    assert rules.installment_fee_rate(3) == RULES.installment_fee_rate(3)


@pytest.mark.parametrize("env, name", [
    ({"DUE_DAY": "ten"}, "DUE_DAY"),
    ({"DUE_DAY": "31"}, "DUE_DAY"),
    ({"STATEMENT_DAY": "0"}, "STATEMENT_DAY"),
    ({"STATEMENT_DAY": "12"}, "DUE_DAY"),  # due day before the statement day
    ({"OVERDUE_PENALTY_DAILY_PCT": "abc"}, "OVERDUE_PENALTY_DAILY_PCT"),
    ({"INSTALLMENT_FEE_12_PCT": "-1"}, "INSTALLMENT_FEE_12_PCT"),
    ({"INSTALLMENT_FEE_3_PCT": "NaN"}, "INSTALLMENT_FEE_3_PCT"),
])
def test_bad_settings_name_the_variable(env, name):
    with pytest.raises(ValueError, match=name):
        BillingRules.from_env(env)


def test_rules_are_read_only():
    with pytest.raises(TypeError):
        RULES.installment_fee_rates[3] = RULES.installment_fee_rates[12]  # type: ignore[index]


# ---------------------------------------------------------------- cycles
def test_time_zone_edge_of_a_cycle():
    # 2026-11-30T16:30:00Z is 2026-12-01 00:30 in Asia/Shanghai: the December cycle.
    moment = datetime(2026, 11, 30, 16, 30, tzinfo=UTC)
    assert business_date(moment, RULES) == date(2026, 12, 1)
    assert cycle_of(moment, RULES) == Period(2026, 12)
    assert str(cycle_of(moment, RULES)) == "2026-12"
    assert cycle_of(datetime(2026, 11, 30, 15, 59, 59, tzinfo=UTC), RULES) == Period(2026, 11)
    assert first_due_for_purchase(moment, RULES) == date(2027, 1, 10)
    # The same instant in UTC business time is still November.
    assert cycle_of(moment, replace(RULES, business_tz=ZoneInfo("UTC"))) == Period(2026, 11)


def test_naive_moments_are_refused():
    with pytest.raises(ValueError):
        business_date(datetime(2026, 12, 1), RULES)


def test_statement_dates_of_a_period():
    assert statement_issue_date(Period(2026, 11), RULES) == date(2026, 12, 1)
    assert statement_due_date(Period(2026, 11), RULES) == date(2026, 12, 10)
    assert statement_issue_date(Period(2026, 12), RULES) == date(2027, 1, 1)
    assert statement_due_date(Period(2026, 12), RULES) == date(2027, 1, 10)
    assert statement_issue_at(Period(2026, 11), RULES) == datetime(2026, 11, 30, 16, 0, tzinfo=UTC)


def test_period_text():
    assert Period.parse("2026-01") == Period(2026, 1)
    assert str(Period(2026, 1)) == "2026-01"
    for bad in ("2026-13", "2026-1", "26-01", "2026/01", "2026-00"):
        with pytest.raises(ValueError):
            Period.parse(bad)


@given(moments)
def test_business_date_and_cycle_match_reference(moment):
    assert business_date(moment, RULES) == ref_business_date(moment)
    period = cycle_of(moment, RULES)
    assert (period.year, period.month) == ref_cycle(moment)
    assert statement_due_date(period, RULES) == date(*ref_next_month(period.year, period.month), 10)
    assert first_due_for_purchase(moment, RULES) == date(*ref_next_month(*ref_cycle(moment)), 10)
    # The statement of a purchase's cycle is issued after the purchase and within a month of it.
    issued_at = statement_issue_at(period, RULES)
    assert moment < issued_at <= moment + timedelta(days=31)
    assert issued_at == ref_issue_moment(period.year, period.month)


@given(periods_st, st.integers(-400, 400))
def test_period_shift(period, months):
    y, m = period.year, period.month
    for _ in range(abs(months)):
        if months > 0:
            y, m = ref_next_month(y, m)
        else:
            y, m = (y - 1, 12) if m == 1 else (y, m - 1)
    assert period.shift(months) == Period(y, m)
    assert Period.parse(str(period)) == period


@given(periods_st, moments)
def test_periods_to_issue_match_reference(after, now):
    expected = []
    y, m = ref_next_month(after.year, after.month)
    while ref_issue_moment(y, m) <= now:
        expected.append(Period(y, m))
        y, m = ref_next_month(y, m)
    assert periods_to_issue(after, now, RULES) == expected


def test_periods_to_issue_on_the_first():
    nov = Period(2026, 11)
    just_before = datetime(2026, 11, 30, 15, 59, 59, tzinfo=UTC)  # 23:59:59 on the 30th in Shanghai
    assert periods_to_issue(Period(2026, 10), just_before, RULES) == []
    assert periods_to_issue(Period(2026, 10), just_before + timedelta(seconds=1), RULES) == [nov]
    # A clock jump over several months issues every statement, in order, exactly once.
    assert periods_to_issue(Period(2026, 10), datetime(2027, 3, 5, tzinfo=UTC), RULES) == [
        nov, Period(2026, 12), Period(2027, 1), Period(2027, 2)]
    assert periods_to_issue(Period(2027, 2), datetime(2027, 3, 5, tzinfo=UTC), RULES) == []


# ---------------------------------------------------------------- installments
def test_installment_plan_worked_example():
    # 100 000 fen over 6 periods: fee 4.5 % = 4 500; 16 667 + 5 x 16 666 principal, 750 fee each.
    plan = installment_plan(100_000, 6, date(2026, 12, 10), RULES)
    assert plan[0] == InstallmentPeriod(1, date(2026, 12, 10), 16_670, 750)
    assert [p.principal for p in plan] == [16_670] + [16_666] * 5
    assert [p.fee for p in plan] == [750] * 6
    assert [p.due_on for p in plan] == [date(2026, 12, 10), date(2027, 1, 10), date(2027, 2, 10),
                                       date(2027, 3, 10), date(2027, 4, 10), date(2027, 5, 10)]
    # 10 001 over 3: fee 230.023 -> 230 = 78 + 76 + 76; principal 3 335 + 3 333 + 3 333.
    plan = installment_plan(10_001, 3, date(2027, 1, 10), RULES)
    assert [(p.principal, p.fee) for p in plan] == [(3_335, 78), (3_333, 76), (3_333, 76)]
    # Half up on the total fee: 50 fen x 8.8 % = 4.4 -> 4; 25 x 2.3 % = 0.575 -> 1.
    assert installment_fee(50, 12, RULES) == 4
    assert installment_fee(25, 3, RULES) == 1
    assert installment_fee(6_250, 12, RULES) == 550  # 550.0 exactly


@pytest.mark.parametrize("periods", [0, 1, 2, 4, 24, -3, True])
def test_installment_periods_not_offered(periods):
    with pytest.raises(ValueError):
        installment_plan(10_000, periods, date(2026, 12, 10), RULES)


@pytest.mark.parametrize("principal", [0, -1])
def test_installment_principal_must_be_positive(principal):
    with pytest.raises(ValueError):
        installment_plan(principal, 3, date(2026, 12, 10), RULES)


@given(st.integers(1, 10**11), st.sampled_from(INSTALLMENT_PERIODS), due_days)
def test_installment_plan_matches_reference(principal, periods, first_due):
    plan = installment_plan(principal, periods, first_due, RULES)
    assert [(p.period_no, p.due_on, p.principal, p.fee) for p in plan] == ref_plan(principal, periods, first_due)
    # The properties the contract states, checked directly as well.
    fee = ref_round_half_up(principal * REF_FEE_RATES[periods])
    assert sum(p.principal for p in plan) == principal
    assert sum(p.fee for p in plan) == fee
    assert plan[0].principal == principal // periods + principal % periods
    assert plan[0].fee == fee // periods + fee % periods
    assert len({p.principal for p in plan[1:]}) == 1 and len({p.fee for p in plan[1:]}) == 1
    assert all(p.due_on.day == first_due.day for p in plan)
    for earlier, later in zip(plan, plan[1:]):
        assert (later.due_on.year * 12 + later.due_on.month) - (earlier.due_on.year * 12 + earlier.due_on.month) == 1


def test_installment_due_dates_roll_over_the_year():
    plan = installment_plan(12_000, 12, date(2026, 11, 10), RULES)
    assert [p.due_on for p in plan][1:3] == [date(2026, 12, 10), date(2027, 1, 10)]
    assert plan[-1].due_on == date(2027, 10, 10)


# ---------------------------------------------------------------- overdue
def test_contract_example_seventeen_days():
    due = date(2026, 12, 10)
    now = datetime(2026, 12, 28, 0, 0, 1, tzinfo=CST)
    days = charged_overdue_days(due, now, RULES)
    assert days[0] == date(2026, 12, 11) and days[-1] == date(2026, 12, 27) and len(days) == 17
    assert len(charged_overdue_days(due, datetime(2026, 12, 27, 23, 59, 59, tzinfo=CST), RULES)) == 16
    # The same instants given in UTC.
    assert len(charged_overdue_days(due, datetime(2026, 12, 27, 16, 0, 1, tzinfo=UTC), RULES)) == 17
    assert len(charged_overdue_days(due, datetime(2026, 12, 27, 15, 59, 59, tzinfo=UTC), RULES)) == 16
    # 100 000 fen unpaid for those 17 days: 50 fen a day.
    assert sum(daily_penalty(100_000, RULES) for _ in days) == 17 * 50
    # Already charged through the 20th: only the 21st ... 27th are new.
    assert charged_overdue_days(due, now, RULES, after=date(2026, 12, 20)) == [
        date(2026, 12, 21) + timedelta(days=i) for i in range(7)]


def test_overdue_boundaries_and_timers():
    due = date(2026, 12, 10)
    end_of_due_day = datetime(2026, 12, 11, tzinfo=CST)
    # Interest-free through 24:00 of the due day; overdue from 00:00 of the 11th.
    assert not is_overdue(due, 100, end_of_due_day - timedelta(seconds=1), RULES)
    assert is_overdue(due, 100, end_of_due_day, RULES)
    assert not is_overdue(due, 0, end_of_due_day + timedelta(days=30), RULES)
    # The 11th is charged at 24:00 of the 11th.
    assert charged_overdue_days(due, datetime(2026, 12, 12, tzinfo=CST) - timedelta(microseconds=1), RULES) == []
    assert charged_overdue_days(due, datetime(2026, 12, 12, tzinfo=CST), RULES) == [date(2026, 12, 11)]
    assert overdue_day_charged_at(date(2026, 12, 11), RULES) == datetime(2026, 12, 12, tzinfo=CST)
    # Principal posted late (on the 13th): the 11th and 12th are over and not charged for it.
    assert late_penalty_through(due, datetime(2026, 12, 11, 12, tzinfo=CST), RULES) is None
    assert late_penalty_through(due, datetime(2026, 12, 13, 12, tzinfo=CST), RULES) == date(2026, 12, 12)
    # The billing timer wakes when the item becomes overdue, then as each overdue day ends.
    later = Period(2027, 6)  # no statement to issue before then
    assert next_check_at(later, due, datetime(2026, 12, 1, tzinfo=CST), RULES) == datetime(2026, 12, 11, tzinfo=CST)
    assert next_check_at(later, due, datetime(2026, 12, 27, 9, tzinfo=CST), RULES) == datetime(2026, 12, 28, tzinfo=CST)
    assert next_check_at(Period(2026, 12), due, datetime(2026, 12, 27, 9, tzinfo=CST), RULES) == datetime(
        2026, 12, 28, tzinfo=CST)
    assert next_check_at(Period(2026, 11), None, datetime(2026, 11, 20, tzinfo=CST), RULES) == datetime(
        2026, 12, 1, tzinfo=CST)


@pytest.mark.parametrize("principal, penalty", [
    (1_000, 1),        # 0.5 -> 1 (half up)
    (999, 0),          # 0.4995 -> 0
    (3_000, 2),        # 1.5 -> 2
    (2_999, 1),        # 1.4995 -> 1
    (100_000, 50),
    (0, 0),
])
def test_daily_penalty_rounds_half_up(principal, penalty):
    assert daily_penalty(principal, RULES) == penalty


@given(fen)
def test_daily_penalty_matches_reference(principal):
    assert daily_penalty(principal, RULES) == ref_round_half_up(principal * REF_PENALTY_RATE)


@given(due_days, moments)
def test_charged_days_match_a_day_by_day_walk(due_on, now):
    days = charged_overdue_days(due_on, now, RULES)
    assert days == ref_charged_days(due_on, now)
    assert len(days) == max(0, (ref_business_date(now) - due_on).days - 1)
    # The timer's next moment for an overdue item charges exactly one more day.
    wake = next_check_at(Period(2999, 1), due_on, now, RULES)  # no statement to issue
    assert wake > now
    if ref_business_date(now) > due_on:
        assert len(charged_overdue_days(due_on, wake, RULES)) == len(days) + 1


@given(due_days, moments)
def test_charging_in_steps_charges_each_day_once(due_on, now):
    already = charged_overdue_days(due_on, now - timedelta(days=3), RULES)
    new = charged_overdue_days(due_on, now, RULES, after=already[-1] if already else None)
    assert already + new == charged_overdue_days(due_on, now, RULES)


@given(due_days, st.integers(1, 10**9), moments)
def test_interest_free_when_paid_by_the_due_day(due_on, principal, now):
    # Paid in full by 24:00 of the due day: no day is ever charged with principal on it, and the
    # item is never overdue afterwards.
    paid_at = datetime(due_on.year, due_on.month, due_on.day, tzinfo=CST) + timedelta(days=1) - timedelta(seconds=1)
    assert charged_overdue_days(due_on, paid_at, RULES) == []
    unpaid = lambda day: principal if datetime(day.year, day.month, day.day, tzinfo=CST) <= paid_at else 0  # noqa: E731
    assert sum(daily_penalty(unpaid(day), RULES) for day in charged_overdue_days(due_on, now, RULES)) == 0
    assert not is_overdue(due_on, 0, now, RULES)
    assert is_overdue(due_on, principal, now, RULES) == (ref_business_date(now) > due_on)


# ---------------------------------------------------------------- repayment allocation
def test_allocation_worked_example():
    items = [Owed("s-2027-01", date(2027, 1, 10), penalty=0, fee=0, principal=5_000),
             Owed("s-2026-12", date(2026, 12, 10), penalty=850, fee=0, principal=100_000),
             Owed("i-1", date(2026, 12, 10), penalty=0, fee=750, principal=16_670)]
    result = allocate(101_000, items)
    assert [(l.item_id, l.penalty, l.fee, l.principal) for l in result.lines] == [
        ("s-2026-12", 850, 0, 100_000), ("i-1", 0, 150, 0)]
    assert result.remainder == 0 and result.principal == 100_000
    result = allocate(200_000, items)
    assert result.allocated == 850 + 100_000 + 750 + 16_670 + 5_000
    assert result.remainder == 200_000 - result.allocated
    assert allocate(0, items).lines == ()


def test_allocation_refuses_bad_input():
    with pytest.raises(ValueError):
        allocate(-1, [])
    with pytest.raises(ValueError):
        allocate(10, [Owed("a", date(2026, 12, 10), principal=1), Owed("a", date(2027, 1, 10), principal=1)])
    with pytest.raises(ValueError):
        allocate(10, [Owed("a", date(2026, 12, 10), fee=-1)])


owed_items = st.lists(st.tuples(due_days, st.integers(0, 5_000), st.integers(0, 5_000), st.integers(0, 50_000)),
                      max_size=8).map(lambda rows: [Owed(f"item-{i}", *row) for i, row in enumerate(rows)])


@given(st.integers(0, 300_000), owed_items)
def test_allocation_matches_reference(amount, items):
    result = allocate(amount, items)
    expected, remainder = ref_allocate(amount, items)
    got = {line.item_id: {"penalty": line.penalty, "fee": line.fee, "principal": line.principal}
           for line in result.lines}
    assert got == {k: v for k, v in expected.items() if any(v.values())}
    assert result.remainder == remainder
    # Conservation, never negative, never beyond what is owed.
    assert result.allocated + result.remainder == amount
    owed = {item.item_id: item for item in items}
    for line in result.lines:
        item = owed[line.item_id]
        assert 0 <= line.penalty <= item.penalty and 0 <= line.fee <= item.fee
        assert 0 <= line.principal <= item.principal and line.total > 0
        # Within an item: nothing to the fee while penalty is owed, nothing to principal while fee is.
        assert line.fee == 0 or line.penalty == item.penalty
        assert line.principal == 0 or line.fee == item.fee
    # Oldest first: an item gets something only once every earlier-due item is settled.
    for line in result.lines:
        for item in items:
            if item.due_on < line.due_on:
                assert expected[item.item_id] == {"penalty": item.penalty, "fee": item.fee,
                                                  "principal": item.principal}
    assert [l.due_on for l in result.lines] == sorted(l.due_on for l in result.lines)
    assert result.remainder == max(0, amount - sum(item.total for item in items))


# ---------------------------------------------------------------- refunds
@given(fen, fen)
def test_statement_refund(outstanding, refund):
    result = apply_refund_to_statement(outstanding, refund)
    assert result.principal_reduced == min(outstanding, refund)
    assert result.principal_reduced + result.overpayment == refund
    assert outstanding - result.principal_reduced >= 0 and result.overpayment >= 0


def test_statement_refund_example():
    assert apply_refund_to_statement(500, 1_000).overpayment == 500
    assert apply_refund_to_statement(5_000, 1_000).principal_reduced == 1_000


def plan_periods(principal, periods, first_due):
    return [PlanPeriod(p.period_no, p.due_on, p.principal, p.fee) for p in installment_plan(principal, periods,
                                                                                             first_due, RULES)]


def test_installment_refund_worked_example():
    # 60 000 over 6 (fee 2 700 = 450 a period), due Dec 2026 ... May 2027; refund 15 000 in Feb 2027
    # after periods 1-3 were billed (and periods 1-2 paid).
    plan = plan_periods(60_000, 6, date(2026, 12, 10))
    plan[0] = replace(plan[0], principal_paid=10_000, fee_paid=450)
    plan[1] = replace(plan[1], principal_paid=10_000, fee_paid=450)
    now = datetime(2027, 2, 15, 12, tzinfo=CST)
    result = apply_refund_to_installments(plan, 15_000, now, RULES)
    # Latest first: period 6 emptied (fee 0), period 5 halved (fee 225 = 5 000 x 4.5 %).
    assert [(p.principal, p.fee) for p in result.periods] == [
        (10_000, 450), (10_000, 450), (10_000, 450), (10_000, 450), (5_000, 225), (0, 0)]
    assert (result.principal_reduced, result.fee_waived, result.overpayment) == (15_000, 675, 0)
    # A refund larger than all unpaid principal: periods 3-6 emptied, the fee of billed period 3 stays.
    result = apply_refund_to_installments(plan, 50_000, now, RULES)
    assert [(p.principal, p.fee) for p in result.periods] == [
        (10_000, 450), (10_000, 450), (0, 450), (0, 0), (0, 0), (0, 0)]
    assert (result.principal_reduced, result.fee_waived, result.overpayment) == (40_000, 1_350, 10_000)


def test_installment_refund_returns_a_fee_paid_ahead():
    plan = plan_periods(60_000, 6, date(2026, 12, 10))
    plan[5] = replace(plan[5], fee_paid=450, principal_paid=4_000)  # early repayment of period 6
    result = apply_refund_to_installments(plan, 6_000, datetime(2026, 12, 20, tzinfo=CST), RULES)
    assert result.periods[5] == replace(plan[5], principal=4_000, fee=180, fee_paid=180)
    assert (result.principal_reduced, result.fee_waived, result.overpayment) == (6_000, 270, 270)


def test_installment_refund_needs_the_whole_plan():
    plan = plan_periods(60_000, 6, date(2026, 12, 10))
    with pytest.raises(ValueError):
        apply_refund_to_installments(plan[1:], 100, datetime(2026, 12, 20, tzinfo=CST), RULES)


def ref_refund_plan(plan: list[PlanPeriod], refund: int, today: date, periods: int):
    """Walk the periods from the last one; a period's fee is waivable while today is before the
    1st of its due month."""
    rate = REF_FEE_RATES[periods]
    left = refund
    out = []
    waived = returned = 0
    for p in sorted(plan, key=lambda p: -p.period_no):
        unpaid = p.principal - p.principal_paid
        cut = unpaid if left >= unpaid else left
        left -= cut
        principal, fee, fee_paid = p.principal - cut, p.fee, p.fee_paid
        if cut > 0 and today < date(p.due_on.year, p.due_on.month, 1):
            fee = min(p.fee, ref_round_half_up(principal * rate))
            fee_paid = min(p.fee_paid, fee)
        waived += p.fee - fee
        returned += p.fee_paid - fee_paid
        out.append(replace(p, principal=principal, fee=fee, fee_paid=fee_paid))
    return out[::-1], refund - left, waived, left + returned


@settings(max_examples=300)
@given(st.integers(1, 10**9), st.sampled_from(INSTALLMENT_PERIODS), due_days, st.integers(0, 2 * 10**9),
       st.integers(-40, 400), st.data())
def test_installment_refund_matches_reference(principal, periods, first_due, refund, days_in, data):
    plan = plan_periods(principal, periods, first_due)
    # Some periods partly or fully repaid (fee before principal, as allocation does).
    for i, p in enumerate(plan):
        paid = data.draw(st.integers(0, p.fee + p.principal), label=f"paid {i + 1}")
        plan[i] = replace(p, fee_paid=min(paid, p.fee), principal_paid=max(0, paid - p.fee))
    today = first_due + timedelta(days=days_in)
    now = datetime(today.year, today.month, today.day, 12, tzinfo=CST)
    result = apply_refund_to_installments(plan, refund, now, RULES)
    expected = ref_refund_plan(plan, refund, today, periods)
    assert (list(result.periods), result.principal_reduced, result.fee_waived, result.overpayment) == expected
    # Never below zero or below what is paid; fees never grow; money is conserved.
    for before, after in zip(plan, result.periods):
        assert after.principal_paid <= after.principal <= before.principal
        assert 0 <= after.fee_paid <= after.fee <= before.fee
        if after.principal == 0 and not fee_accrued(after.due_on, now, RULES):
            assert after.fee == 0
    assert result.principal_reduced == sum(b.principal - a.principal for b, a in zip(plan, result.periods))
    assert result.principal_reduced + result.overpayment == refund + sum(
        b.fee_paid - a.fee_paid for b, a in zip(plan, result.periods))
    assert result.principal_reduced == min(refund, sum(p.principal - p.principal_paid for p in plan))


# ---------------------------------------------------------------- statement status and conversion
DUE = date(2026, 12, 10)
BEFORE_DUE_END = datetime(2026, 12, 10, 23, 59, 59, tzinfo=CST)
AFTER_DUE_END = datetime(2026, 12, 11, 0, 0, 0, tzinfo=CST)


@pytest.mark.parametrize("issued, now, outstanding, converted, status", [
    (False, BEFORE_DUE_END, 5_000, False, StatementStatus.OPEN),
    (True, BEFORE_DUE_END, 5_000, False, StatementStatus.ISSUED),
    (True, BEFORE_DUE_END, 0, False, StatementStatus.PAID),
    (True, AFTER_DUE_END, 0, False, StatementStatus.PAID),
    (True, AFTER_DUE_END, 5_000, False, StatementStatus.OVERDUE),
    (True, AFTER_DUE_END, 50, False, StatementStatus.OVERDUE),      # only a penalty left: still overdue
    (True, BEFORE_DUE_END, 5_000, True, StatementStatus.INSTALLMENT),
    (True, AFTER_DUE_END, 0, True, StatementStatus.INSTALLMENT),
])
def test_statement_status(issued, now, outstanding, converted, status):
    assert statement_status(issued, DUE, now, outstanding, converted, RULES) is status
    assert status.value in ("open", "issued", "paid", "overdue", "installment")


@pytest.mark.parametrize("kwargs, code", [
    (dict(issued=False, converted=False, now=BEFORE_DUE_END, outstanding_principal=5_000), "STATEMENT_NOT_ISSUED"),
    (dict(issued=True, converted=True, now=BEFORE_DUE_END, outstanding_principal=5_000),
     "STATEMENT_ALREADY_CONVERTED"),
    (dict(issued=True, converted=False, now=AFTER_DUE_END, outstanding_principal=5_000), "STATEMENT_PAST_DUE"),
    (dict(issued=True, converted=False, now=BEFORE_DUE_END, outstanding_principal=0), "STATEMENT_NOTHING_OWED"),
    (dict(issued=True, converted=False, now=BEFORE_DUE_END, outstanding_principal=5_000), None),
])
def test_conversion_refusal(kwargs, code):
    refusal = conversion_refusal(due_on=DUE, rules=RULES, **kwargs)
    assert (refusal[0] if refusal else None) == code


def test_converted_statement_plan_starts_on_its_own_due_day():
    plan = installment_plan(100_000, 6, statement_due_date(Period(2026, 11), RULES), RULES)
    assert plan[0].due_on == date(2026, 12, 10)
    assert fee_accrued(plan[0].due_on, datetime(2026, 12, 1, tzinfo=CST), RULES)      # issued: billed
    assert not fee_accrued(plan[1].due_on, datetime(2026, 12, 31, 23, tzinfo=CST), RULES)
    assert fee_accrued(plan[1].due_on, datetime(2027, 1, 1, tzinfo=CST), RULES)


def test_a_cycle_bills_anything_when_it_carries_principal_fee_or_penalty():
    zero = {"principal": 0, "fee": 0, "penalty": 0}
    assert not bills_anything([])
    assert not bills_anything([zero, zero])
    for key in zero:
        assert bills_anything([zero, {**zero, key: 1}])


def test_what_a_repayment_line_paid():
    from services.billing.domain import ItemKind, LineKind, line_kind
    assert line_kind(ItemKind.INSTALLMENT, billed=False) is LineKind.INSTALLMENT
    assert line_kind(ItemKind.INSTALLMENT, billed=True) is LineKind.INSTALLMENT
    assert line_kind(ItemKind.STATEMENT, billed=True) is LineKind.STATEMENT
    assert line_kind(ItemKind.STATEMENT, billed=False) is LineKind.OPEN_CYCLE
    from typing import get_args
    from shared.events import AllocationLine
    assert {k.value for k in LineKind} == set(get_args(AllocationLine.model_fields["kind"].annotation))
