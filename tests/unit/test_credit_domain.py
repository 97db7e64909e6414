"""Credit score, eligibility, limit and review rules (services/credit/domain.py)."""
from datetime import date

from hypothesis import given, strategies as st

from services.credit.domain import (LIMIT_MAX, LIMIT_MIN, SCORE_MAX, SCORE_MIN, Behaviour, Line, Profile,
                                    ReviewRules, age_on, credit_score, eligibility_failure, limit_for_score,
                                    reservation_refusal, reviewed_limit)

TODAY = date(2026, 11, 25)
GOOD = Profile(user_id="u", birth_date=date(1990, 5, 1), phone="13800000000", id_number="110101199005010011",
               real_name_verified=True, registered_on=date(2025, 11, 25))

profiles = st.builds(Profile, user_id=st.just("u"),
                     birth_date=st.one_of(st.none(), st.dates(date(1920, 1, 1), date(2020, 1, 1))),
                     phone=st.one_of(st.none(), st.just("13800000000")), id_number=st.just("X123456"),
                     real_name_verified=st.booleans(), registered_on=st.dates(date(2015, 1, 1), TODAY))
behaviours = st.builds(Behaviour, successful_payments=st.integers(0, 500), on_time_repayments=st.integers(0, 100),
                       late_repayments=st.integers(0, 50), days_overdue=st.integers(0, 400))


def test_score_of_a_documented_profile():
    # 550 + 50 verified + 20 phone + 50 (age 36) + 80 (a year of 730 days: 365*80//730 = 40) ...
    assert credit_score(GOOD, Behaviour(), TODAY) == 550 + 50 + 20 + 50 + 40
    assert credit_score(GOOD, Behaviour(successful_payments=10, on_time_repayments=3), TODAY) == 710 + 10 + 15
    assert credit_score(GOOD, Behaviour(late_repayments=2, days_overdue=17), TODAY) == 710 - 50 - 34


@given(profiles, behaviours, st.integers(1, 50))
def test_more_on_time_repayment_never_lowers_the_score(profile, behaviour, more):
    better = Behaviour(behaviour.successful_payments, behaviour.on_time_repayments + more,
                       behaviour.late_repayments, behaviour.days_overdue)
    assert credit_score(profile, better, TODAY) >= credit_score(profile, behaviour, TODAY)


@given(profiles, behaviours, st.integers(1, 100), st.integers(0, 5))
def test_overdue_never_raises_the_score(profile, behaviour, days, lates):
    worse = Behaviour(behaviour.successful_payments, behaviour.on_time_repayments,
                      behaviour.late_repayments + lates, behaviour.days_overdue + days)
    assert credit_score(profile, worse, TODAY) <= credit_score(profile, behaviour, TODAY)


@given(profiles, behaviours)
def test_score_stays_in_range(profile, behaviour):
    assert SCORE_MIN <= credit_score(profile, behaviour, TODAY) <= SCORE_MAX


@given(st.integers(0, 1200), st.integers(0, 1200))
def test_limit_is_monotonic_and_bounded(a, b):
    low, high = sorted((a, b))
    assert LIMIT_MIN <= limit_for_score(low) <= limit_for_score(high) <= LIMIT_MAX


def test_limit_ends():
    assert limit_for_score(350) == 50_000
    assert limit_for_score(950) == 5_000_000
    assert limit_for_score(650) == 50_000 + 300 * 8_250


def test_age_counts_birthdays():
    assert age_on(date(2008, 11, 25), TODAY) == 18
    assert age_on(date(2008, 11, 26), TODAY) == 17


def test_eligibility_names_the_failed_rule():
    def fail(**over):
        fields = {**GOOD.__dict__, **{k: v for k, v in over.items() if k in GOOD.__dict__}}
        return eligibility_failure(Profile(**fields), TODAY, id_number_taken=over.get("id_taken", False),
                                   phone_taken=over.get("phone_taken", False))
    assert fail() is None
    assert fail(birth_date=date(2008, 11, 26)).startswith("age")
    assert fail(birth_date=date(2008, 11, 25)) is None  # 18 on the activation date
    assert fail(birth_date=None).startswith("age")
    assert fail(real_name_verified=False).startswith("real_name_verified")
    assert fail(phone=None).startswith("phone")
    assert fail(id_taken=True).startswith("id_number")
    assert fail(phone_taken=True).startswith("phone")


def test_reservation_refusals():
    line = Line(credit_limit=100_000, used=60_000, reserved=30_000, frozen=False)
    assert line.available == 10_000
    assert reservation_refusal(None, 1)[0] == "HUABEI_NOT_ACTIVE"
    assert reservation_refusal(Line(100_000, 0, 0, frozen=True), 1)[0] == "HUABEI_FROZEN"
    assert reservation_refusal(line, 10_001)[0] == "CREDIT_LIMIT_EXCEEDED"
    assert reservation_refusal(line, 10_000) is None


def test_limit_review():
    rules = ReviewRules()
    assert reviewed_limit(100_000, 352, on_time_since=1, late_since=0, frozen=False, rules=rules) == 110_000
    assert reviewed_limit(100_000, 900, on_time_since=1, late_since=0, frozen=False, rules=rules) == limit_for_score(900)
    assert reviewed_limit(100_000, 900, on_time_since=0, late_since=0, frozen=False, rules=rules) == 100_000
    assert reviewed_limit(100_000, 900, on_time_since=3, late_since=1, frozen=False, rules=rules) == 100_000
    assert reviewed_limit(100_000, 900, on_time_since=3, late_since=0, frozen=True, rules=rules) == 100_000
    assert reviewed_limit(4_900_000, 950, on_time_since=3, late_since=0, frozen=False, rules=rules) == LIMIT_MAX
    assert reviewed_limit(300_000, 350, on_time_since=3, late_since=0, frozen=False, rules=rules) == 330_000
