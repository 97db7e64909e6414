"""Huabei billing end to end: statements on the 1st due on the 10th, installments at purchase and by
converting a statement, overdue penalties and freezing, refunds of billed purchases, repayments
through the gateway (on time, late, early, with an overpayment), a redelivered repayment, and the
timers under a restart and a second billing process -- with exact fen amounts throughout.

The test clock is shared by the whole session and only moves forward, so every scenario starts
by moving it to 12:00 on the 15th of the next month (business time, Asia/Shanghai) and computes
every target from there. Expected amounts are computed here independently of the billing code:
exact fractions, integer round-half-up, a fixed UTC+8 offset, months walked by hand.
"""
from __future__ import annotations

import asyncio
import signal
from datetime import date, datetime, timedelta, timezone
from fractions import Fraction

from tests.integration.conftest import ServiceProcess, envelope, eventually, new_id, user_token

CST = timezone(timedelta(hours=8))  # Asia/Shanghai has had no DST since 1991
FEE_RATE = {3: Fraction(23, 1000), 6: Fraction(45, 1000), 9: Fraction(65, 1000), 12: Fraction(88, 1000)}
PENALTY_RATE = Fraction(5, 10000)


# ---------------------------------------------------------------- independent reference arithmetic
def round_half_up(x: Fraction) -> int:
    assert x >= 0
    return (2 * x.numerator + x.denominator) // (2 * x.denominator)


def month(first: date, k: int) -> date:
    """The 1st of the month k months after `first`'s month."""
    index = first.year * 12 + first.month - 1 + k
    return date(index // 12, index % 12 + 1, 1)


def day(first: date, k: int, d: int) -> date:
    return month(first, k).replace(day=d)


def at(d: date, hour: int = 0, minute: int = 0, second: int = 1) -> datetime:
    return datetime(d.year, d.month, d.day, hour, minute, second, tzinfo=CST)


def plan(principal: int, periods: int) -> list[tuple[int, int]]:
    """[(principal, fee)] per period: one rounding of the total fee, even split, remainder on period 1."""
    fee = round_half_up(principal * FEE_RATE[periods])
    p, rp = divmod(principal, periods)
    f, rf = divmod(fee, periods)
    return [(p + rp, f + rf)] + [(p, f)] * (periods - 1)


def penalty(unpaid_principal: int, days: int) -> int:
    return days * round_half_up(unpaid_principal * PENALTY_RATE)


def ym(d: date) -> str:
    return f"{d.year:04d}-{d.month:02d}"


def statement(period: date, *, principal: int, fee: int = 0, penalty: int = 0, paid: int = 0, status: str) -> dict:
    """The expected statement of the cycle of `period` (statement_id is checked separately)."""
    return {"period": ym(period), "issued_on": month(period, 1).isoformat(),
            "due_on": day(period, 1, 10).isoformat(), "principal": principal, "fee": fee, "penalty": penalty,
            "paid": paid, "outstanding": principal + fee + penalty - paid, "status": status}


# ---------------------------------------------------------------- driving the platform
async def clock_now(shop) -> datetime:
    response = await shop.api("gateway").get("/admin/clock")
    assert response.status_code == 200, response.text
    return datetime.fromisoformat(response.json()["now"].replace("Z", "+00:00"))


async def set_clock(shop, moment: datetime) -> None:
    assert moment > await clock_now(shop), f"the test clock only moves forward; {moment} is in its past"
    response = await shop.api("gateway").post("/admin/clock", json={"set": moment.astimezone(timezone.utc).isoformat()})
    assert response.status_code == 200, response.text


async def new_month(shop) -> date:
    """Move the clock to 12:00 on the 15th of next month (business time); that month's 1st."""
    today = (await clock_now(shop)).astimezone(CST).date()
    first = month(today, 1)
    await set_clock(shop, at(first.replace(day=15), 12, 0, 0))
    return first


async def statements(shop, user: str) -> list[dict]:
    response = await shop.api("billing").get(f"/v1/huabei/{user}/statements")
    assert response.status_code == 200, response.text
    return response.json()


def without_ids(listing: list[dict]) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "statement_id"} for s in listing]


async def expect_statements(shop, user: str, expected: list[dict], timeout: float = 30) -> list[dict]:
    """Poll until the user's statements are exactly `expected` (ids aside); fail with the difference."""
    last: list[dict] = []

    async def matches():
        nonlocal last
        last = await statements(shop, user)
        return without_ids(last) == expected
    try:
        await eventually(matches, timeout=timeout)
    except AssertionError:
        assert without_ids(last) == expected
    return last


async def buyer_and_seller(shop, balance: int = 0) -> tuple[str, str]:
    buyer, seller = await shop.user("b", balance=balance), await shop.user("s")
    await shop.activate(buyer)
    return buyer, seller


async def huabei_purchase(shop, buyer: str, seller: str, amount: int, installments: int = 1) -> str:
    extra = {"installments": installments} if installments != 1 else {}
    order = await shop.place(buyer, seller, amount, method="huabei", **extra)
    (outcome,) = await shop.events(order, 1, settle=0)
    assert outcome["type"] == "PaymentSucceeded", outcome
    return order


async def repay(shop, user: str, amount: int, *, source: str = "balance", key: str | None = None, **extra) -> dict:
    response = await shop.api("gateway").post(f"/v1/huabei/{user}/repayments", json={
        "amount": amount, "source": source, "idempotency_key": key or new_id("k"), **extra})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "allocated", body
    return body


async def huabei_status(shop, user: str, status: str) -> bool:
    return (await shop.huabei(user))["status"] == status


async def used(shop, user: str, amount: int) -> bool:
    line = await shop.huabei(user)
    return line["used"] == amount and line["reserved"] == 0


async def credit_profile(shop, user: str) -> dict:
    response = await shop.api("credit").get(f"/v1/credit-profiles/{user}")
    assert response.status_code == 200, response.text
    return response.json()


# ---------------------------------------------------------------- (a) the statement cycle
async def test_purchase_is_billed_on_the_next_first_and_due_on_the_tenth(shop):
    m = await new_month(shop)
    buyer, seller = await buyer_and_seller(shop)
    assert await statements(shop, buyer) == []
    await huabei_purchase(shop, buyer, seller, 12_345)
    await huabei_purchase(shop, buyer, seller, 655)
    (open_cycle,) = await expect_statements(shop, buyer, [statement(m, principal=13_000, status="open")])

    await set_clock(shop, at(month(m, 1), 0, 0, 1))
    (issued,) = await expect_statements(shop, buyer, [statement(m, principal=13_000, status="issued")])
    assert issued["statement_id"] == open_cycle["statement_id"]  # the open cycle shows the id it will have

    # A purchase in the new cycle shows as that cycle's open statement; the issued one is unchanged.
    await huabei_purchase(shop, buyer, seller, 1_000)
    await expect_statements(shop, buyer, [statement(m, principal=13_000, status="issued"),
                                          statement(month(m, 1), principal=1_000, status="open")])
    # Someone else's statements are not for this user's token.
    other = await shop.api("billing").get(f"/v1/huabei/{buyer}/statements",
                                          headers={"Authorization": f"Bearer {user_token(seller)}"})
    assert other.status_code == 403 and other.json()["error"]["code"] == "FORBIDDEN"
    await shop.audit()


async def test_statements_of_an_unknown_user_are_404_and_of_a_fresh_user_empty(shop):
    # As at the gateway: a user billing does not know is 404 USER_NOT_FOUND, not an empty list.
    response = await shop.api("billing").get(f"/v1/huabei/{new_id('nobody')}/statements", timeout=30)
    assert response.status_code == 404 and response.json()["error"]["code"] == "USER_NOT_FOUND", response.text
    # A user registered a moment ago (no pause) is known, with no statements.
    assert await statements(shop, await shop.user("fresh")) == []


# ---------------------------------------------------------------- (b) installments at purchase
async def test_installments_at_purchase_are_billed_one_period_per_statement(shop):
    m = await new_month(shop)
    buyer, seller = await buyer_and_seller(shop)
    amount = 100_001
    periods = plan(amount, 6)
    assert periods[0] == (16_671, 750) and periods[1] == (16_666, 750)  # 4.5 % = 4 500.045 -> 4 500 fen
    await huabei_purchase(shop, buyer, seller, amount, installments=6)
    # The open cycle already shows period 1 (due with the first statement after the purchase).
    await expect_statements(shop, buyer, [statement(m, principal=periods[0][0], fee=periods[0][1], status="open")])

    # Month by month, each statement bills the next period. Nobody repays: earlier periods are overdue,
    # charged 0.05 % a day of their unpaid principal for each day after their due day.
    expected: list[dict] = []
    for k in range(1, 7):
        now = at(month(m, k), 0, 0, 1)
        await set_clock(shop, now)
        today = now.date()
        for j, e in enumerate(expected, start=1):
            due = day(m, j, 10)
            e.update(penalty=penalty(periods[j - 1][0], (today - due).days - 1), status="overdue")
            e["outstanding"] = e["principal"] + e["fee"] + e["penalty"]
        expected.append(statement(month(m, k - 1), principal=periods[k - 1][0], fee=periods[k - 1][1],
                                  status="issued"))
        # The new open cycle carries the next period.
        upcoming = [statement(month(m, k), principal=periods[k][0], fee=periods[k][1], status="open")] if k < 6 else []
        await expect_statements(shop, buyer, expected + upcoming)
    assert sum(s["principal"] for s in expected) == amount
    assert sum(s["fee"] for s in expected) == 4_500
    assert [s["due_on"] for s in expected] == [day(m, k, 10).isoformat() for k in range(1, 7)]
    assert (await shop.huabei(buyer))["status"] == "frozen"
    await shop.audit()


# ---------------------------------------------------------------- (c) overdue
async def test_overdue_statement_is_charged_17_days_at_the_28th_and_frozen_until_repaid(shop):
    m = await new_month(shop)
    buyer, seller = await buyer_and_seller(shop)
    amount = 54_321
    await huabei_purchase(shop, buyer, seller, amount)
    await expect_statements(shop, buyer, [statement(m, principal=amount, status="open")])

    # 23:59:59 on the due day: still interest-free, not overdue.
    await set_clock(shop, at(day(m, 1, 10), 23, 59, 0))
    await expect_statements(shop, buyer, [statement(m, principal=amount, status="issued")])
    assert (await shop.huabei(buyer))["status"] == "active"

    # 00:00:01 on the 28th: the 11th ... 27th have been charged, one rounding per day.
    await set_clock(shop, at(day(m, 1, 28)))
    daily = round_half_up(amount * PENALTY_RATE)  # 27.1605 -> 27 fen
    assert daily == 27
    (late,) = await expect_statements(shop, buyer, [statement(m, principal=amount, penalty=17 * daily,
                                                              status="overdue")])
    assert late["penalty"] == 459 and late["outstanding"] == 54_780
    detail = (await shop.api("billing").get(f"/v1/huabei/{buyer}/statements/{late['statement_id']}")).json()
    assert [i["overdue_days_charged"] for i in detail["items"]] == [17]
    await eventually(lambda: huabei_status(shop, buyer, "frozen"))
    order = await shop.place(buyer, seller, 100, method="huabei")
    assert (await shop.events(order, 1, settle=0))[0]["data"]["reason_code"] == "HUABEI_FROZEN"
    # days_overdue counts the day running: the 28th is the 18th day after the due day.
    assert (await credit_profile(shop, buyer))["days_overdue"] == 18

    # Repaying everything (penalty first) unfreezes the account and restores the line.
    await shop.top_up(buyer, 60_000)
    paid = await repay(shop, buyer, 54_780)
    assert (paid["principal"], paid["fee"], paid["penalty"], paid["overpayment"]) == (54_321, 0, 459, 0)
    assert [(line["kind"], line["due_on"], line["penalty"], line["fee"], line["principal"]) for line in paid["lines"]] \
        == [("statement", day(m, 1, 10).isoformat(), 459, 0, 54_321)]
    await expect_statements(shop, buyer, [statement(m, principal=amount, penalty=459, paid=54_780, status="paid")])
    await eventually(lambda: huabei_status(shop, buyer, "active"))
    await eventually(lambda: used(shop, buyer, 0))
    assert await shop.wallet(buyer) == 60_000 - 54_780
    assert (await credit_profile(shop, buyer))["late_repayments"] == 1

    # Paid off: later days charge nothing more.
    await set_clock(shop, at(day(m, 1, 28) + timedelta(days=3)))
    await expect_statements(shop, buyer, [statement(m, principal=amount, penalty=459, paid=54_780, status="paid")])
    await shop.audit()


async def test_partial_repayment_lowers_the_next_days_penalty(shop):
    m = await new_month(shop)
    buyer, seller = await buyer_and_seller(shop, balance=100_000)
    await huabei_purchase(shop, buyer, seller, 80_000)
    await expect_statements(shop, buyer, [statement(m, principal=80_000, status="open")])
    # 00:00:01 on the 13th: the 11th and 12th charged on 80 000 (40 fen a day).
    await set_clock(shop, at(day(m, 1, 13)))
    await expect_statements(shop, buyer, [statement(m, principal=80_000, penalty=80, status="overdue")])
    # Repay 30 080 during the 13th: the penalty (80), then 30 000 of principal.
    paid = await repay(shop, buyer, 30_080)
    assert (paid["principal"], paid["fee"], paid["penalty"], paid["overpayment"]) == (30_000, 0, 80, 0)
    # The 13th is charged on what is unpaid at its end: 50 000 -> 25 fen.
    await set_clock(shop, at(day(m, 1, 14)))
    await expect_statements(shop, buyer, [statement(m, principal=80_000, penalty=105, paid=30_080,
                                                    status="overdue")])
    assert (await shop.huabei(buyer))["status"] == "frozen"
    # The rest, penalty included: settled.
    paid = await repay(shop, buyer, 50_025)
    assert (paid["principal"], paid["penalty"], paid["overpayment"]) == (50_000, 25, 0)
    await expect_statements(shop, buyer, [statement(m, principal=80_000, penalty=105, paid=80_105, status="paid")])
    await eventually(lambda: huabei_status(shop, buyer, "active"))
    await shop.audit()


# ---------------------------------------------------------------- on time
async def test_statement_repaid_by_its_due_day_costs_nothing_extra(shop):
    m = await new_month(shop)
    buyer, seller = await buyer_and_seller(shop, balance=30_000)
    await huabei_purchase(shop, buyer, seller, 29_999)
    await expect_statements(shop, buyer, [statement(m, principal=29_999, status="open")])
    await set_clock(shop, at(day(m, 1, 10), 23, 0, 0))
    (issued,) = await expect_statements(shop, buyer, [statement(m, principal=29_999, status="issued")])
    paid = await repay(shop, buyer, 29_999)
    assert (paid["principal"], paid["fee"], paid["penalty"], paid["overpayment"]) == (29_999, 0, 0, 0)
    assert paid["lines"] == [{"item_id": issued["statement_id"], "kind": "statement",
                              "statement_id": issued["statement_id"], "due_on": day(m, 1, 10).isoformat(),
                              "penalty": 0, "fee": 0, "principal": 29_999}]
    await set_clock(shop, at(day(m, 1, 28)))
    await expect_statements(shop, buyer, [statement(m, principal=29_999, paid=29_999, status="paid")])
    await eventually(lambda: used(shop, buyer, 0))
    line = await shop.huabei(buyer)
    assert line["status"] == "active" and line["available"] == line["credit_limit"]
    assert await shop.wallet(buyer) == 1
    profile = await credit_profile(shop, buyer)
    assert (profile["on_time_repayments"], profile["late_repayments"], profile["days_overdue"]) == (1, 0, 0)
    await shop.audit()


# ---------------------------------------------------------------- early repayment and overpayment
async def test_repayment_pays_oldest_due_first_then_ahead_and_returns_the_rest(shop):
    m = await new_month(shop)
    buyer, seller = await buyer_and_seller(shop, balance=50_000)
    await huabei_purchase(shop, buyer, seller, 9_000)
    await huabei_purchase(shop, buyer, seller, 30_000, installments=3)
    (p1, f1), (p2, f2), (p3, f3) = plan(30_000, 3)
    assert (p1, f1, p2, f2) == (10_000, 230, 10_000, 230)  # 2.3 % of 30 000 = 690
    await expect_statements(shop, buyer, [statement(m, principal=9_000 + p1, fee=f1, status="open")])
    await set_clock(shop, at(day(m, 1, 2), 12, 0, 0))
    await expect_statements(shop, buyer, [statement(m, principal=19_000, fee=230, status="issued"),
                                          statement(month(m, 1), principal=p2, fee=f2, status="open")])
    await huabei_purchase(shop, buyer, seller, 5_000)  # in the new, open cycle (which carries period 2)
    await expect_statements(shop, buyer, [statement(m, principal=19_000, fee=230, status="issued"),
                                          statement(month(m, 1), principal=5_000 + p2, fee=f2, status="open")])

    paid = await repay(shop, buyer, 45_000)
    # Due first: the statement (its purchase, then period 1: fee, principal); then ahead, by due date:
    # the open cycle's purchase, period 2's principal and period 3's principal (fees not billed yet
    # are not payable); the rest is returned.
    assert [(l["kind"], l["due_on"], l["penalty"], l["fee"], l["principal"]) for l in paid["lines"]] == [
        ("statement", day(m, 1, 10).isoformat(), 0, 0, 9_000),
        ("installment", day(m, 1, 10).isoformat(), 0, 230, 10_000),
        ("open_cycle", day(m, 2, 10).isoformat(), 0, 0, 5_000),
        ("installment", day(m, 2, 10).isoformat(), 0, 0, 10_000),
        ("installment", day(m, 3, 10).isoformat(), 0, 0, 10_000)]
    assert (paid["principal"], paid["fee"], paid["penalty"], paid["overpayment"]) == (44_000, 230, 0, 770)
    assert await shop.wallet(buyer) == 50_000 - 45_000 + 770
    await expect_statements(shop, buyer, [statement(m, principal=19_000, fee=230, paid=19_230, status="paid"),
                                          statement(month(m, 1), principal=15_000, fee=230, paid=15_000,
                                                    status="open")])
    await eventually(lambda: used(shop, buyer, 0))

    # Period 2's fee becomes owed with its statement; period 3's with the one after.
    await set_clock(shop, at(day(m, 2, 1), 12, 0, 0))
    await expect_statements(shop, buyer, [statement(m, principal=19_000, fee=230, paid=19_230, status="paid"),
                                          statement(month(m, 1), principal=15_000, fee=230, paid=15_000,
                                                    status="issued"),
                                          statement(month(m, 2), principal=p3, fee=f3, paid=p3, status="open")])
    paid = await repay(shop, buyer, 230)
    assert (paid["principal"], paid["fee"], paid["overpayment"]) == (0, 230, 0)
    await set_clock(shop, at(day(m, 3, 1), 12, 0, 0))
    await expect_statements(shop, buyer, [statement(m, principal=19_000, fee=230, paid=19_230, status="paid"),
                                          statement(month(m, 1), principal=15_000, fee=230, paid=15_230,
                                                    status="paid"),
                                          statement(month(m, 2), principal=10_000, fee=230, paid=10_000,
                                                    status="issued")])
    await shop.audit()


# ---------------------------------------------------------------- (d) converting a statement
async def test_converting_an_issued_statement_to_six_installments(shop):
    m = await new_month(shop)
    buyer, seller = await buyer_and_seller(shop)
    late, _ = await buyer_and_seller(shop)
    await huabei_purchase(shop, buyer, seller, 10_001)
    await huabei_purchase(shop, late, seller, 20_000)
    (open_cycle,) = await expect_statements(shop, buyer, [statement(m, principal=10_001, status="open")])
    await expect_statements(shop, late, [statement(m, principal=20_000, status="open")])
    billing = shop.api("billing")
    sid = open_cycle["statement_id"]
    url = f"/v1/huabei/{buyer}/statements/{sid}/installments"
    refused_key = new_id("k")
    refused = await billing.post(url, json={"periods": 6, "idempotency_key": refused_key})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "STATEMENT_NOT_ISSUED"

    await set_clock(shop, at(day(m, 1, 5), 12, 0, 0))
    await expect_statements(shop, buyer, [statement(m, principal=10_001, status="issued")])
    # The first answer for a key, a refusal included, is the answer to every repeat (as Stripe):
    # the statement could be converted now, but not under the key that was refused.
    again = await billing.post(url, json={"periods": 6, "idempotency_key": refused_key})
    assert (again.status_code, again.json()) == (409, refused.json())
    both = await billing.post(url, json={"periods": 6, "idempotency_key": "k-body"}, headers={"Idempotency-Key": "k-h"})
    assert both.status_code == 400 and both.json()["error"]["code"] == "INVALID_REQUEST", both.text
    missing = await billing.post(url, json={"periods": 6})
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "INVALID_REQUEST", missing.text
    bad = await billing.post(url, json={"periods": 5, "idempotency_key": new_id("k")})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "INVALID_REQUEST"
    unknown = await billing.post(f"/v1/huabei/{buyer}/statements/S190001-{buyer}/installments",
                                 json={"periods": 6, "idempotency_key": new_id("k")})
    assert unknown.status_code == 404

    key = new_id("k")
    converted = await billing.post(url, json={"periods": 6}, headers={"Idempotency-Key": key})  # the header form
    assert converted.status_code == 201, converted.text
    expected_periods = [{"period": k, "due_on": day(m, k, 10).isoformat(), "principal": p, "fee": f}
                        for k, (p, f) in enumerate(plan(10_001, 6), start=1)]
    assert expected_periods[0] == {"period": 1, "due_on": day(m, 1, 10).isoformat(), "principal": 1_671, "fee": 75}
    assert converted.json() == {"statement_id": sid, "periods": expected_periods}
    again = await billing.post(url, json={"periods": 6, "idempotency_key": key})  # the same key in the body
    assert (again.status_code, again.json()) == (201, converted.json())
    again = await billing.post(url, json={"periods": 6, "idempotency_key": key}, headers={"Idempotency-Key": key})
    assert (again.status_code, again.json()) == (201, converted.json())
    conflict = await billing.post(url, json={"periods": 3, "idempotency_key": key})
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "IDEMPOTENCY_CONFLICT"
    twice = await billing.post(url, json={"periods": 3, "idempotency_key": new_id("k")})
    assert twice.status_code == 409 and twice.json()["error"]["code"] == "STATEMENT_ALREADY_CONVERTED"
    # The statement now carries period 1 (due on its own due day); the rest come with later statements,
    # period 2 with the open cycle's.
    await expect_statements(shop, buyer, [statement(m, principal=1_671, fee=75, status="installment"),
                                          statement(month(m, 1), principal=1_666, fee=75, status="open")])

    # Past the due day another statement can no longer be converted.
    await set_clock(shop, at(day(m, 1, 11)))
    (late_statement,) = await expect_statements(shop, late, [statement(m, principal=20_000, status="overdue")])
    past = await billing.post(f"/v1/huabei/{late}/statements/{late_statement['statement_id']}/installments",
                              json={"periods": 6, "idempotency_key": new_id("k")})
    assert past.status_code == 409 and past.json()["error"]["code"] == "STATEMENT_PAST_DUE"
    await shop.audit()


async def test_converted_statement_paid_by_period_with_a_refund_midway(shop):
    m = await new_month(shop)
    buyer, seller = await buyer_and_seller(shop, balance=20_000)
    first = await huabei_purchase(shop, buyer, seller, 6_000)
    await huabei_purchase(shop, buyer, seller, 6_000)
    await expect_statements(shop, buyer, [statement(m, principal=12_000, status="open")])
    await set_clock(shop, at(day(m, 1, 3), 12, 0, 0))
    (issued,) = await expect_statements(shop, buyer, [statement(m, principal=12_000, status="issued")])
    response = await shop.api("billing").post(f"/v1/huabei/{buyer}/statements/{issued['statement_id']}/installments",
                                              json={"periods": 6, "idempotency_key": new_id("k")})
    assert response.status_code == 201
    periods = plan(12_000, 6)
    assert periods == [(2_000, 90)] * 6  # 4.5 % of 12 000 = 540
    paid = await repay(shop, buyer, 2_090)
    assert (paid["principal"], paid["fee"], paid["overpayment"]) == (2_000, 90, 0)
    assert [line["kind"] for line in paid["lines"]] == ["installment"]

    # Next month: period 2 on its statement. Then a refund of one 6 000 purchase: the plan's unpaid
    # principal shrinks from the last period back -- periods 6, 5 and 4 (2 000 each) are emptied and
    # their fees, not billed yet, waived.
    await set_clock(shop, at(day(m, 2, 2), 12, 0, 0))
    await expect_statements(shop, buyer, [
        statement(m, principal=2_000, fee=90, paid=2_090, status="installment"),
        statement(month(m, 1), principal=2_000, fee=90, status="issued"),
        statement(month(m, 2), principal=2_000, fee=90, status="open")])
    await shop.send("RefundRequested", {"order_id": first, "refund_id": "r-1", "amount": 6_000, "reason": "return"})
    assert (await shop.events(first, 2, settle=0))[1]["type"] == "RefundCompleted"
    await eventually(lambda: used(shop, buyer, 12_000 - 2_000 - 6_000))
    assert (await repay(shop, buyer, 2_090))["overpayment"] == 0
    await set_clock(shop, at(day(m, 3, 2), 12, 0, 0))
    await expect_statements(shop, buyer, [
        statement(m, principal=2_000, fee=90, paid=2_090, status="installment"),
        statement(month(m, 1), principal=2_000, fee=90, paid=2_090, status="paid"),
        statement(month(m, 2), principal=2_000, fee=90, status="issued")])
    paid = await repay(shop, buyer, 2_500)  # 410 more than is owed: nothing later is left to pay
    assert (paid["principal"], paid["fee"], paid["overpayment"]) == (2_000, 90, 410)
    # The emptied periods bill nothing: no more statements. 6 000 repaid + 6 000 refunded = 12 000;
    # fees 3 x 90 paid, 3 x 90 waived.
    await set_clock(shop, at(day(m, 7, 2), 12, 0, 0))
    await expect_statements(shop, buyer, [
        statement(m, principal=2_000, fee=90, paid=2_090, status="installment"),
        statement(month(m, 1), principal=2_000, fee=90, paid=2_090, status="paid"),
        statement(month(m, 2), principal=2_000, fee=90, paid=2_090, status="paid")])
    await eventually(lambda: used(shop, buyer, 0))
    assert await shop.wallet(buyer) == 20_000 - 3 * 2_090
    await shop.audit()


# ---------------------------------------------------------------- (e) refunds of billed purchases
async def test_refund_of_a_billed_purchase_reduces_the_statement_and_returns_any_overpayment(shop):
    m = await new_month(shop)
    buyer, seller = await buyer_and_seller(shop, balance=10_000)
    big = await huabei_purchase(shop, buyer, seller, 20_000)
    small = await huabei_purchase(shop, buyer, seller, 5_000)
    await expect_statements(shop, buyer, [statement(m, principal=25_000, status="open")])
    await set_clock(shop, at(day(m, 1, 4), 12, 0, 0))
    await expect_statements(shop, buyer, [statement(m, principal=25_000, status="issued")])

    await shop.send("RefundRequested", {"order_id": big, "refund_id": "r-1", "amount": 8_000, "reason": "part"})
    assert (await shop.events(big, 2, settle=0))[1]["type"] == "RefundCompleted"
    await expect_statements(shop, buyer, [statement(m, principal=17_000, status="issued")])
    await eventually(lambda: used(shop, buyer, 17_000))

    # Repay 10 000, then refund the whole small purchase: 5 000 less owed, nothing returned.
    await repay(shop, buyer, 10_000)
    await shop.send("RefundRequested", {"order_id": small, "refund_id": "r-2", "amount": 5_000, "reason": "all"})
    assert (await shop.events(small, 2, settle=0))[1]["type"] == "RefundCompleted"
    await expect_statements(shop, buyer, [statement(m, principal=12_000, paid=10_000, status="issued")])
    # Refund the rest of the big one (12 000) when only 2 000 is still owed: 10 000 is an
    # overpayment and goes back to the wallet.
    before = await shop.wallet(buyer)
    await shop.send("RefundRequested", {"order_id": big, "refund_id": "r-3", "amount": 12_000, "reason": "rest"})
    assert (await shop.events(big, 3, settle=0))[2]["type"] == "RefundCompleted"
    await expect_statements(shop, buyer, [statement(m, principal=10_000, paid=10_000, status="paid")])

    async def overpayment_back():
        return await shop.wallet(buyer) == before + 10_000
    await eventually(overpayment_back)
    await eventually(lambda: used(shop, buyer, 0))
    await set_clock(shop, at(day(m, 1, 20)))
    await expect_statements(shop, buyer, [statement(m, principal=10_000, paid=10_000, status="paid")])
    await shop.audit()


# ---------------------------------------------------------------- exactly once
async def test_a_redelivered_repayment_is_allocated_once_and_answered_again(shop):
    m = await new_month(shop)
    buyer, seller = await buyer_and_seller(shop, balance=10_000)
    await huabei_purchase(shop, buyer, seller, 7_000)
    await expect_statements(shop, buyer, [statement(m, principal=7_000, status="open")])
    await set_clock(shop, at(day(m, 1, 2), 12, 0, 0))
    await expect_statements(shop, buyer, [statement(m, principal=7_000, status="issued")])
    paid = await repay(shop, buyer, 3_000)

    since = await shop.kafka.end_offsets("billing.events")
    await shop.kafka.send("billing.commands", envelope("ApplyRepayment", {
        "repayment_id": paid["repayment_id"], "user_id": buyer, "amount": 3_000,
        "requested_at": (await clock_now(shop)).isoformat()}, correlation_id=buyer), key=buyer)

    def answered(records):
        return any(_is_allocation(r, paid["repayment_id"]) for r in records)
    records = await shop.kafka.read("billing.events", since, answered)
    (again,) = [r for r in records if _is_allocation(r, paid["repayment_id"])]
    data = _json(again)["data"]
    assert {k: data[k] for k in ("principal", "fee", "penalty", "overpayment", "lines")} == \
        {k: paid[k] for k in ("principal", "fee", "penalty", "overpayment", "lines")}
    await asyncio.sleep(1)
    await expect_statements(shop, buyer, [statement(m, principal=7_000, paid=3_000, status="issued")])
    assert await shop.wallet(buyer) == 7_000
    await eventually(lambda: used(shop, buyer, 4_000))
    await shop.audit()


def _json(record) -> dict:
    import json
    return json.loads(record.value)


def _is_allocation(record, repayment_id: str) -> bool:
    value = _json(record)
    return value["type"] == "RepaymentAllocated" and value["data"]["repayment_id"] == repayment_id


async def test_timers_fire_once_with_two_billing_processes_and_a_restart(shop, services, service_env, db):
    m = await new_month(shop)
    seller = await shop.user("s")
    buyers, amounts = [], [10_000, 33_333, 77_777]
    for amount in amounts:
        buyer = await shop.user("b")
        await shop.activate(buyer)
        await huabei_purchase(shop, buyer, seller, amount)
        buyers.append(buyer)
    for buyer, amount in zip(buyers, amounts):
        await expect_statements(shop, buyer, [statement(m, principal=amount, status="open")])

    second = ServiceProcess("billing", {**service_env, "BILLING_URL": "http://127.0.0.1:8014"})
    second.url = "http://127.0.0.1:8014"
    second.start()
    try:
        await second.wait_healthy(90)
        await set_clock(shop, at(day(m, 1, 28)))
        await asyncio.sleep(0.5)
        services["billing"].kill(signal.SIGKILL)  # whatever it was doing, it did in one transaction or not at all
        await services["billing"].restart()

        # The timers alone (no statements request yet, which would bring the user up to date itself):
        # issued once, 17 days charged once each, the account frozen.
        async def timers_done():
            rows = await db.fetch(
                """SELECT a.user_id, count(DISTINCT s.statement_id) AS issued, count(c.day) AS days,
                          count(DISTINCT c.day) AS distinct_days, min(c.day) AS first, max(c.day) AS last
                   FROM billing.accounts a LEFT JOIN billing.statements s USING (user_id)
                   LEFT JOIN billing.items i USING (user_id) LEFT JOIN billing.penalty_charges c USING (item_id)
                   WHERE a.user_id = ANY($1::text[]) GROUP BY a.user_id""", buyers)
            return len(rows) == 3 and all(
                (r["issued"], r["days"], r["distinct_days"], r["first"], r["last"])
                == (1, 17, 17, day(m, 1, 11), day(m, 1, 27)) for r in rows)
        await eventually(timers_done, timeout=60)
        for buyer in buyers:
            await eventually(lambda: huabei_status(shop, buyer, "frozen"), timeout=60)
        for buyer, amount in zip(buyers, amounts):
            await expect_statements(shop, buyer, [statement(m, principal=amount, penalty=penalty(amount, 17),
                                                            status="overdue")])
    finally:
        second.kill(signal.SIGTERM)
    await shop.audit()
    # The next test starts on a settled billing: the group has rebalanced after the two stops
    # (a member stopped in the middle of a rebalance can hold partitions until its session ends)
    # and the projection learns new users again.
    probe = await shop.user("p")

    async def billing_knows_the_probe() -> bool:
        return (await shop.api("billing").get(f"/v1/huabei/{probe}/statements")).status_code == 200
    await eventually(billing_knows_the_probe, timeout=120)
