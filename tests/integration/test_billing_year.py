"""A year of Huabei billing end to end (issue 5): three users walked through twelve billing cycles
with the test clock, every statement of every user checked to the fen at every step against a
reference computed here, and the audit passing on the way and at the end.

- A is always on time: one or two Huabei purchases in most months (none in two of them, which
  then issue no statement), each statement repaid in full from the wallet late on its due day.
  A never pays a fee or a penalty; the wallet goes down by exactly the purchases.
- B is late once, by 17 days: the statement of cycle LATE_CYCLE is left unpaid past its due day.
  At 00:00:01 on the 11th it is overdue with no penalty yet and the account is frozen; on the
  15th a new Huabei order fails HUABEI_FROZEN; at 00:00:01 on the 28th the 11th ... 27th have
  been charged (17 x round_half_up(41 000 x 0.05 %) = 17 x 21, an exact half rounded up). B
  repays everything owed (penalty first), the account is unfrozen, and later statements are normal.
- C converts the statement of cycle CONVERT_CYCLE (three purchases, 41 111 fen) to 6 installments
  right after it is issued, pays every period on time together with its ordinary purchases, and
  on the 15th of REFUND_MONTH (periods 1-3 paid, 4-6 not billed yet) has one 20 000 fen purchase,
  still held in escrow, refunded in full: the plan's remaining principal shrinks from the last
  period back (6 and 5 emptied, 4 down to 553) and the unaccrued fees are recomputed on what is
  left (4: 25 fen) or waived; the emptied periods bill nothing (a cycle with nothing else issues
  no statement).

Per month: the 15th 12:00 (purchases), the 1st 00:00:01 (statements issued), the 10th 23:50
(still interest-free: repayments), the 11th 00:00:01 (nothing overdue but B's late statement).
The test clock is shared by the session and only moves forward: the year starts at the 15th of
the month after the clock's current one (test_billing.new_month). The expected amounts come from
test_billing's independent reference arithmetic (exact fractions, round half up) and a small
per-cycle book kept here.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import date

from tests.integration.conftest import eventually, new_id
from tests.integration.test_billing import (FEE_RATE, PENALTY_RATE, at, credit_profile, day, expect_statements,
                                            huabei_purchase, huabei_status, month, new_month, penalty, plan, repay,
                                            round_half_up, set_clock, statement, used, without_ids, ym)

YEAR = 12            # cycles 0 ... 11; the last statement is due on the 10th of month 12
LATE_CYCLE = 3       # B leaves this cycle's statement (due on the 10th of month 4) unpaid until the 28th
CONVERT_CYCLE = 1    # C converts this cycle's statement to 6 installments on the day it is issued
REFUND_MONTH = 4     # C's 20 000 purchase of CONVERT_CYCLE is refunded on the 15th of this month

A_SKIPS = {3, 8}     # months without purchases for A: no statement for those cycles


def a_purchases(k: int) -> list[int]:
    if k in A_SKIPS:
        return []
    return [10_007 + 1_234 * k] + ([3_456 + 11 * k] if k % 2 == 0 else [])


def b_purchases(k: int) -> list[int]:
    """On the 15th. B's late statement has two purchases adding up to 41 000 fen (a daily penalty of
    exactly 20.5 fen); in the month B is frozen the purchase waits until after the 28th."""
    if k == LATE_CYCLE:
        return [30_500, 10_500]
    if k == LATE_CYCLE + 1:
        return []
    return [8_000 + 321 * k]


B_AFTER_UNFREEZE = 6_789
C_PURCHASES = {0: [9_876], 1: [12_345, 20_000, 8_766], 2: [5_000], 3: [3_333], 4: [4_444], 6: [2_222],
               8: [7_777], 9: [3_000], 11: [4_321]}
C_REFUNDED = 20_000  # the second purchase of CONVERT_CYCLE
CONVERTED = sum(C_PURCHASES[CONVERT_CYCLE])


# ---------------------------------------------------------------- the reference book of one user
@dataclass
class Cycle:
    principal: int = 0
    fee: int = 0
    penalty: int = 0
    paid: int = 0
    converted: bool = False

    @property
    def outstanding(self) -> int:
        return self.principal + self.fee + self.penalty - self.paid


class Book:
    """What one user's statements must show, cycle by cycle (keyed by the cycle's 1st), with the
    credit line used and the wallet."""

    def __init__(self, name: str, user: str, wallet: int):
        self.name, self.user, self.wallet = name, user, wallet
        self.cycles: dict[date, Cycle] = {}
        self.used = 0
        self.purchased = 0
        self.on_time = self.late = 0

    def cycle(self, first: date) -> Cycle:
        return self.cycles.setdefault(first, Cycle())

    def purchase(self, today: date, amount: int) -> None:
        self.cycle(today.replace(day=1)).principal += amount
        self.used += amount
        self.purchased += amount

    def charge(self, today: date) -> None:
        """Penalties as of 00:00-something on `today`: each overdue day that has ended (the 11th ...
        yesterday) costs round_half_up(0.05 % of the unpaid principal). Only B is ever late, and pays
        nothing while late, so the unpaid principal is the whole principal every day."""
        for first, c in self.cycles.items():
            due = day(first, 1, 10)
            if today > due and c.outstanding > 0:
                assert not c.converted and c.paid == 0, f"the reference does not model this: {self.name} {first} {c}"
                c.penalty = penalty(c.principal, (today - due).days - 1)

    def overdue(self, today: date) -> bool:
        return any(today > day(first, 1, 10) and c.outstanding > 0 for first, c in self.cycles.items())

    def listing(self, today: date) -> list[dict]:
        """GET /statements as it must be: issued cycles and the open one, while they bill anything."""
        self.charge(today)
        current = today.replace(day=1)
        out = []
        for first in sorted(self.cycles):
            c = self.cycles[first]
            if first > current or c.principal + c.fee + c.penalty == 0:
                continue
            if first == current:
                status = "open"
            elif c.converted:
                status = "installment"
            elif c.outstanding == 0:
                status = "paid"
            elif today > day(first, 1, 10):
                status = "overdue"
            else:
                status = "issued"
            out.append(statement(first, principal=c.principal, fee=c.fee, penalty=c.penalty, paid=c.paid,
                                 status=status))
        return out

    def repay_everything(self, today: date) -> tuple[int, int, int, list[tuple]]:
        """Pay every issued statement in full: (principal, fee, penalty, [(due_on, penalty, fee, principal)])."""
        self.charge(today)
        lines = []
        for first in sorted(self.cycles):
            c = self.cycles[first]
            if first < today.replace(day=1) and c.outstanding > 0:
                assert c.paid == 0
                lines.append((day(first, 1, 10).isoformat(), c.penalty, c.fee, c.principal))
                c.paid = c.principal + c.fee + c.penalty
        principal, fee, pen = (sum(line[i] for line in lines) for i in (3, 2, 1))
        self.used -= principal
        self.wallet -= principal + fee + pen
        if lines:
            if all(today <= date.fromisoformat(line[0]) for line in lines):
                self.on_time += 1
            else:
                self.late += 1
        return principal, fee, pen, lines


def refund_unbilled_periods(periods: list[tuple[int, int]], refund: int, n: int) -> tuple[list[tuple[int, int]], int]:
    """Reference for a refund against installment periods that are neither billed nor paid:
    latest period first, each period's fee recomputed on its new principal (never above what it
    was). Returns the periods afterwards and what the periods could not absorb."""
    out, left = list(periods), refund
    for i in reversed(range(len(out))):
        p, f = out[i]
        cut = min(left, p)
        if cut:
            left -= cut
            out[i] = (p - cut, min(f, round_half_up((p - cut) * FEE_RATE[n])))
    return out, left


# ---------------------------------------------------------------- driving
async def check(shop, books: list[Book], today: date) -> dict[str, list[dict]]:
    """Every statement of every user, to the fen (polling until it matches or failing with the diff)."""
    listings = await asyncio.gather(*(expect_statements(shop, b.user, b.listing(today)) for b in books))
    return {b.name: listing for b, listing in zip(books, listings)}


async def check_lines(shop, books: list[Book], today: date) -> None:
    """The credit line (used, frozen or not) and the wallet of every user."""
    for b in books:
        await eventually(lambda: used(shop, b.user, b.used))
        await eventually(lambda: huabei_status(shop, b.user, "frozen" if b.overdue(today) else "active"))
        assert await shop.wallet(b.user) == b.wallet, b.name


async def buy(shop, book: Book, seller: str, today: date, amounts: list[int]) -> list[str]:
    orders = list(await asyncio.gather(*(huabei_purchase(shop, book.user, seller, amount) for amount in amounts)))
    for amount in amounts:
        book.purchase(today, amount)
    return orders


async def repay_all(shop, book: Book, today: date) -> dict | None:
    principal, fee, pen, lines = book.repay_everything(today)
    if not lines:
        return None
    paid = await repay(shop, book.user, principal + fee + pen)
    assert (paid["principal"], paid["fee"], paid["penalty"], paid["overpayment"]) == (principal, fee, pen, 0), \
        (book.name, paid)
    # By due date; on one due date the statement's own purchases first, then the installment period.
    got: dict[str, list[int]] = {}
    for line in paid["lines"]:
        got.setdefault(line["due_on"], [0, 0, 0])
        for i, part in enumerate(("penalty", "fee", "principal")):
            got[line["due_on"]][i] += line[part]
    assert got == {due: [p, f, pr] for due, p, f, pr in lines}, (book.name, paid["lines"])
    return paid


async def test_a_year_of_huabei_on_time_late_and_in_installments(shop):
    m = await new_month(shop)  # 12:00 on the 15th of month 0
    today = day(m, 0, 15)
    seller = await shop.user("s")
    initial = {"A": 400_000, "B": 300_000, "C": 200_000}
    books = []
    for name, balance in initial.items():
        user = await shop.user(name.lower(), balance=balance)
        await shop.activate(user)
        books.append(Book(name, user, balance))
    a, b, c = books
    c_plan = plan(CONVERTED, 6)
    # 4.5 % of 41 111 = 1 849.995 -> 1 850 fen; 41 111 = 6 x 6 851 + 5, 1 850 = 6 x 308 + 2.
    assert CONVERTED == 41_111 and c_plan == [(6_856, 310)] + [(6_851, 308)] * 5
    c_orders: dict[int, list[str]] = {}
    late_statement_due = day(m, LATE_CYCLE + 1, 10)
    daily = round_half_up(41_000 * PENALTY_RATE)
    assert daily == 21  # 20.5 fen: the half rounds up

    for k in range(YEAR):
        # ---- the 15th: purchases of cycle k
        if k:
            today = day(m, k, 15)
            await set_clock(shop, at(today, 12, 0, 0))
        if k == LATE_CYCLE + 1:
            # B: overdue since the 11th, the 11th ... 14th charged; frozen for new purchases.
            listing = (await check(shop, books, today))["B"]
            assert listing[-1]["penalty"] == 4 * daily and listing[-1]["status"] == "overdue"
            await eventually(lambda: huabei_status(shop, b.user, "frozen"))
            order = await shop.place(b.user, seller, 5_000, method="huabei")
            (failed,) = await shop.events(order, 1, settle=0)
            assert (failed["type"], failed["data"]["reason_code"]) == ("PaymentFailed", "HUABEI_FROZEN"), failed
        orders = await asyncio.gather(buy(shop, a, seller, today, a_purchases(k)),
                                      buy(shop, b, seller, today, b_purchases(k)),
                                      buy(shop, c, seller, today, C_PURCHASES.get(k, [])))
        c_orders[k] = orders[2]
        if orders[0]:  # A confirms receipt of the first one: the seller is paid (less the 0.8 % fee)
            await shop.send("OrderConfirmed", {"order_id": orders[0][0]})
            assert [e["type"] for e in await shop.events(orders[0][0], 2, settle=0)] == \
                ["PaymentSucceeded", "FundsReleased"]
        await check(shop, books, today)

        if k == REFUND_MONTH:
            # ---- C: a purchase inside the converted statement, still held in escrow, refunded in full.
            refunded = c_orders[CONVERT_CYCLE][1]
            unbilled = c_plan[REFUND_MONTH - CONVERT_CYCLE:]  # periods 4, 5, 6: due later, fees not accrued
            after, left = refund_unbilled_periods(unbilled, C_REFUNDED, 6)
            # 20 000 = 6 851 (period 6) + 6 851 (period 5) + 6 298 of period 4, whose fee becomes
            # round_half_up(553 x 4.5 %) = round_half_up(24.885) = 25.
            assert (after, left) == ([(553, 25), (0, 0), (0, 0)], 0)
            for j, (before_pf, after_pf) in enumerate(zip(unbilled, after), start=REFUND_MONTH - CONVERT_CYCLE + 1):
                cyc = c.cycle(month(m, CONVERT_CYCLE + j - 1))  # period j is billed with this cycle
                cyc.principal -= before_pf[0] - after_pf[0]
                cyc.fee -= before_pf[1] - after_pf[1]
            c.used -= C_REFUNDED
            await shop.send("RefundRequested", {"order_id": refunded, "refund_id": new_id("r"),
                                                "amount": C_REFUNDED, "reason": "returned"})
            assert [e["type"] for e in await shop.events(refunded, 2, settle=0)] == \
                ["PaymentSucceeded", "RefundCompleted"]
            listing = (await check(shop, books, today))["C"]
            # The open cycle: this month's purchase and period 4, both shrunk.
            assert without_ids(listing)[-1] == statement(month(m, k), principal=4_444 + 553, fee=25, status="open")
            await check_lines(shop, books, today)  # nothing came back to the wallet: all absorbed
            await shop.audit()

        if k == LATE_CYCLE + 1:
            # ---- B at 00:00:01 on the 28th: the 11th ... 27th charged, 17 days.
            today = day(m, k, 28)
            await set_clock(shop, at(today))
            listing = (await check(shop, books, today))["B"]
            assert penalty(41_000, 17) == 17 * daily == 357
            assert without_ids(listing)[-1] == statement(month(m, LATE_CYCLE), principal=41_000, penalty=357,
                                                         status="overdue")
            await eventually(lambda: huabei_status(shop, b.user, "frozen"))

            async def eighteen_days_late():  # counting the day running
                return (await credit_profile(shop, b.user))["days_overdue"] == 18
            await eventually(eighteen_days_late)
            paid = await repay_all(shop, b, today)  # penalty first, then the principal
            assert [(line["kind"], line["due_on"], line["penalty"], line["fee"], line["principal"])
                    for line in paid["lines"]] == [("statement", late_statement_due.isoformat(), 357, 0, 41_000)]
            await check(shop, books, today)
            await check_lines(shop, books, today)  # B active again, its line restored
            await buy(shop, b, seller, today, [B_AFTER_UNFREEZE])
            await check(shop, books, today)
            await shop.audit()

        # ---- the 1st, 00:00:01: cycle k's statements are issued
        today = month(m, k + 1)
        await set_clock(shop, at(today))
        listings = await check(shop, books, today)
        if k == CONVERT_CYCLE:
            # ---- C converts the statement just issued into 6 installments.
            (issued,) = [s for s in listings["C"] if s["period"] == ym(month(m, k))]
            assert issued == {**statement(month(m, k), principal=CONVERTED, status="issued"),
                              "statement_id": issued["statement_id"]}
            response = await shop.api("billing").post(
                f"/v1/huabei/{c.user}/statements/{issued['statement_id']}/installments",
                json={"periods": 6, "idempotency_key": new_id("k")})
            assert response.status_code == 201, response.text
            assert response.json() == {"statement_id": issued["statement_id"], "periods": [
                {"period": j, "due_on": day(m, k + j, 10).isoformat(), "principal": p, "fee": f}
                for j, (p, f) in enumerate(c_plan, start=1)]}
            converted = c.cycle(month(m, k))
            converted.principal, converted.fee, converted.converted = c_plan[0][0], c_plan[0][1], True
            for j, (p, f) in enumerate(c_plan[1:], start=2):
                later = c.cycle(month(m, k + j - 1))
                later.principal += p
                later.fee += f
            listing = (await check(shop, books, today))["C"]
            # Period 1 stays on the converted statement; period 2 already shows on the open cycle.
            assert without_ids(listing[-2:]) == [statement(month(m, k), principal=6_856, fee=310, status="installment"),
                                    statement(month(m, k + 1), principal=6_851, fee=308, status="open")]

        # ---- the 10th, 23:50: still interest-free; repay (B not the late statement)
        today = day(m, k + 1, 10)
        await set_clock(shop, at(today, 23, 50, 0))
        await check(shop, books, today)
        payers = [a, c] if k == LATE_CYCLE else [a, b, c]
        await asyncio.gather(*(repay_all(shop, book, today) for book in payers))
        await check(shop, books, today)

        # ---- the 11th, 00:00:01: nothing overdue but B's late statement (not charged yet: no day has ended)
        today = day(m, k + 1, 11)
        await set_clock(shop, at(today))
        listings = await check(shop, books, today)
        if k == LATE_CYCLE:
            assert without_ids(listings["B"])[-1] == statement(month(m, k), principal=41_000, status="overdue")
        await check_lines(shop, books, today)
        if k in (CONVERT_CYCLE, 7):
            await shop.audit()

    # ---- a year later: everything repaid, every statement paid, the line whole again
    listings = await check(shop, books, today)
    for book in books:
        assert all(s["status"] in ("paid", "installment") and s["outstanding"] == 0 for s in listings[book.name]), \
            listings[book.name]
        assert book.used == 0
    # A: ten statements (two months without purchases issued none), not a fen extra.
    assert len(listings["A"]) == YEAR - len(A_SKIPS)
    assert all(s["fee"] == 0 and s["penalty"] == 0 and s["paid"] == s["principal"] for s in listings["A"])
    assert a.purchased == sum(sum(a_purchases(k)) for k in range(YEAR))
    assert await shop.wallet(a.user) == initial["A"] - a.purchased
    # B: 357 fen of penalty once, nothing else extra.
    assert sum(s["penalty"] for s in listings["B"]) == 357 and sum(s["fee"] for s in listings["B"]) == 0
    assert await shop.wallet(b.user) == initial["B"] - b.purchased - 357
    # C: fees 310 + 308 + 308 + 25 = 951 paid; 1 850 - 951 = 899 waived by the refund. Cycles 5 and 7
    # (period 5 emptied, no purchases) and 10 issued nothing.
    assert sum(s["fee"] for s in listings["C"]) == 951
    assert [s["period"] for s in listings["C"]] == [ym(month(m, k)) for k in (0, 1, 2, 3, 4, 6, 8, 9, 11)]
    assert await shop.wallet(c.user) == initial["C"] - (c.purchased - C_REFUNDED) - 951
    for book in books:
        profile = await credit_profile(shop, book.user)
        assert (profile["on_time_repayments"], profile["late_repayments"]) == (book.on_time, book.late), \
            (book.name, profile)
    assert (a.late, b.late, c.late) == (0, 1, 0)
    await check_lines(shop, books, today)
    await shop.audit()
