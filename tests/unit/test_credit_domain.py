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


# ---------------------------------------------------------------- drawdowns: try / confirm / cancel
from datetime import datetime, timedelta, timezone  # noqa: E402

from services.credit.domain import (CREDIT_NOTHING, ReservationState as RS, new_reservation, on_cancel,  # noqa: E402
                                    on_commit, on_expire, on_reserve, on_restore)
from shared.events import (CreditRefused, DrawdownCommitted, DrawdownRefunded, ReserveCredit,  # noqa: E402
                           RestoreCredit)

NOW = datetime(2026, 11, 1, tzinfo=timezone.utc)
RESERVE = ReserveCredit(order_id="o-1", user_id="u", amount=600, installments=1)


def test_reserve_takes_credit_or_refuses_and_answers_a_repeat_the_same():
    d = on_reserve(None, Line(1000, 0, 0, False), RESERVE, NOW, 1800)
    assert d.reserved == 600 and d.reservation.state is RS.RESERVED and type(d.emit[0]).__name__ == "CreditReserved"
    assert d.reservation.expires_at == NOW + timedelta(seconds=1800)
    again = on_reserve(d.reservation, None, RESERVE, NOW, 1800)
    assert again.reserved == 0 and again.reservation is None and type(again.emit[0]).__name__ == "CreditReserved"
    refused = on_reserve(None, Line(1000, 500, 0, False), RESERVE, NOW, 1800)
    assert refused.reserved == 0 and refused.reservation.state is RS.REFUSED
    assert refused.emit[0].reason_code == "CREDIT_LIMIT_EXCEEDED"
    assert on_reserve(refused.reservation, None, RESERVE, NOW, 1800).emit[0].reason_code == "CREDIT_LIMIT_EXCEEDED"
    assert on_reserve(None, None, RESERVE, NOW, 1800).emit[0].reason_code == "HUABEI_NOT_ACTIVE"
    assert on_reserve(None, Line(1000, 0, 0, True), RESERVE, NOW, 1800).emit[0].reason_code == "HUABEI_FROZEN"


def test_commit_cancel_and_expiry_move_the_line_once():
    r = on_reserve(None, Line(1000, 0, 0, False), RESERVE, NOW, 1800).reservation
    commit = on_commit(r, None, NOW)
    assert (commit.reserved, commit.used, commit.reservation.state) == (-600, 600, RS.COMMITTED)
    assert commit.transfers[0].debit == "loan:u" and commit.transfers[0].credit == "gateway"
    assert commit.emit == (DrawdownCommitted(order_id="o-1", user_id="u", amount=600, installments=1,
                                             committed_at=NOW),)
    cancel = on_cancel(r, NOW)
    assert (cancel.reserved, cancel.used, cancel.reservation.state, cancel.emit) == (-600, 0, RS.CANCELLED, ())
    assert on_commit(cancel.reservation, None, NOW) is CREDIT_NOTHING
    assert on_cancel(cancel.reservation, NOW) is CREDIT_NOTHING
    assert on_expire(r, NOW + timedelta(seconds=1799)) is CREDIT_NOTHING
    expired = on_expire(r, NOW + timedelta(seconds=1800))
    assert (expired.reserved, expired.reservation.state) == (-600, RS.EXPIRED)
    assert on_cancel(expired.reservation, NOW) is CREDIT_NOTHING


def test_a_repeated_commit_is_answered_again_and_changes_nothing():
    r = on_reserve(None, Line(1000, 0, 0, False), RESERVE, NOW, 1800).reservation
    committed = on_commit(r, None, NOW).reservation
    again = on_commit(committed, Line(1000, 1000, 0, False), NOW + timedelta(hours=1))
    assert again.reservation is None and (again.reserved, again.used, again.transfers) == (0, 0, ())
    assert again.emit == on_commit(r, None, NOW).emit  # the same DrawdownCommitted, committed_at included


def test_the_commit_of_an_expired_reservation_stands_only_while_the_line_has_room():
    r = on_reserve(None, Line(1000, 0, 0, False), RESERVE, NOW, 1800).reservation
    expired = on_expire(r, NOW + timedelta(seconds=1800)).reservation
    later = NOW + timedelta(hours=1)
    room = on_commit(expired, Line(1000, 0, 400, False), later)  # 600 still fits next to another 400
    assert (room.reserved, room.used, room.reservation.state) == (0, 600, RS.COMMITTED)
    assert room.emit[0].committed_at == later
    # The credit it gave back went to another order meanwhile: committing would overdraw the line.
    taken = on_commit(expired, Line(1000, 0, 600, False), later)
    assert (taken.reserved, taken.used, taken.transfers) == (0, 0, ())
    assert (taken.reservation.state, taken.reservation.reason_code) == (RS.REFUSED, "CREDIT_LIMIT_EXCEEDED")
    assert taken.emit == (CreditRefused(order_id="o-1", user_id="u", reason_code="CREDIT_LIMIT_EXCEEDED",
                                        message=taken.reservation.message),)
    assert taken.reservation.message.startswith("the reservation expired before the payment was confirmed")
    assert on_commit(taken.reservation, Line(1000, 0, 0, False), later).emit == taken.emit  # asked again
    assert on_commit(expired, Line(1000, 0, 0, True), later).emit[0].reason_code == "HUABEI_FROZEN"
    assert on_commit(expired, None, later).emit[0].reason_code == "HUABEI_NOT_ACTIVE"


@given(st.integers(1, 5000), st.integers(-2000, 5000), st.integers(0, 5000), st.integers(1, 5000), st.booleans())
def test_a_commit_never_takes_a_line_over_its_limit(limit, used, reserved, amount, expired):
    """Whatever the line holds when the commit comes, it stays within its limit (if it was)."""
    line = Line(limit, used, reserved + (0 if expired else amount), False)
    if line.used + line.reserved > limit:
        return
    cmd = RESERVE.model_copy(update={"amount": amount})
    r = new_reservation(cmd, NOW, 1800, None).reservation
    if expired:
        r = on_expire(r, NOW + timedelta(seconds=1800)).reservation
    d = on_commit(r, line, NOW + timedelta(hours=1))
    assert line.used + d.used + line.reserved + d.reserved <= limit
    assert d.reservation.state in (RS.COMMITTED, RS.REFUSED) and (d.used > 0) == (d.reservation.state is RS.COMMITTED)


def test_cancelling_a_committed_drawdown_reverses_it_for_billing():
    """Escrow refused the hold that came after the commit: the loan and the line go back."""
    r = on_reserve(None, Line(1000, 0, 0, False), RESERVE, NOW, 1800).reservation
    committed = on_commit(r, None, NOW).reservation
    later = NOW + timedelta(minutes=1)
    d = on_cancel(committed, later)
    assert (d.reserved, d.used, d.reservation.state) == (0, -600, RS.CANCELLED)
    (t,) = d.transfers
    assert (t.id, t.debit, t.credit, t.amount) == ("drawdown-void:o-1", "gateway", "loan:u", 600)
    assert d.emit == (DrawdownRefunded(order_id="o-1", user_id="u", amount=600, refund_key="hold_refused",
                                       refunded_at=later),)
    assert on_cancel(d.reservation, later) is CREDIT_NOTHING  # once
    assert on_commit(d.reservation, None, later) is CREDIT_NOTHING  # a late re-sent commit changes nothing


def test_restore_gives_the_principal_back_once():
    cmd = RestoreCredit(order_id="o-1", user_id="u", amount=200, refund_key="r:1")
    d = on_restore(True, cmd, NOW)
    assert d.used == -200 and d.transfers[0].id == "restore:o-1:r:1"
    assert on_restore(False, cmd, NOW) is CREDIT_NOTHING


def test_review_rules_from_the_environment():
    from decimal import Decimal

    import pytest

    from services.credit.domain import ReviewRules
    from shared.settings import SettingsError
    assert ReviewRules.from_env({}) == ReviewRules()
    assert ReviewRules.from_env({"HUABEI_REVIEW_INTERVAL_DAYS": " ", "HUABEI_RESERVATION_TTL_SECONDS": ""}) == ReviewRules()
    rules = ReviewRules.from_env({"HUABEI_REVIEW_INTERVAL_DAYS": "7", "HUABEI_REVIEW_RAISE_PCT": "12.5"})
    assert (rules.interval_days, rules.raise_pct) == (7, Decimal("0.125"))
    for name, bad in (("HUABEI_REVIEW_INTERVAL_DAYS", "0"), ("HUABEI_REVIEW_MIN_ON_TIME", "-1"),
                      ("HUABEI_REVIEW_RAISE_PCT", "ten"), ("HUABEI_RESERVATION_TTL_SECONDS", "1.5")):
        with pytest.raises(SettingsError, match=name):
            ReviewRules.from_env({name: bad})
