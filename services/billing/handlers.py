"""Billing effects: the consumed events and commands, statement conversion (called by the API),
and the billing timer. Everything runs inside the caller's transaction and writes its events
with the outbox.

Every write for a user locks the user's `accounts` row, brings the user up to date as of the
clock (`catch_up`: issue the statements due, charge the ended overdue days), applies its change,
then `settle`s (overdue / settled events, the next timer moment); the timer loop does the same
for users whose `next_check_at` has come. The rules are in domain.py; the semantics chosen where
the contract leaves room, and why this is exactly once, are in docs/design.md ("Billing").
"""
from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg
import structlog

from services.billing import domain, store
from services.billing.domain import (GATEWAY, REVENUE_INSTALLMENT_FEE, REVENUE_PENALTY, InstallmentPeriod, ItemKind,
                                     Owed, Period, PlanPeriod, PlanSource, fees_receivable)
from shared import events, ledger, outbox, timers, topics
from shared.consumer import transient
from shared.errors import ApiError
from shared.events import (AccountOverdue, AccountSettled, AllocationLine, ApplyRepayment, DrawdownCommitted,
                           DrawdownRefunded, Envelope, OverpaymentRefunded, RepaymentAllocated, RepaymentApplied,
                           Strict, UserRegistered)
from shared.runtime import Context

SOURCE = "billing"
TIMER_BATCH = 50

log = structlog.get_logger("billing")


def _rules(ctx: Context) -> domain.BillingRules:
    return ctx.deps.rules


async def _emit(ctx: Context, conn: asyncpg.Connection, data: Strict, user_id: str, cause: str | None) -> None:
    await outbox.add(conn, topics.BILLING_EVENTS, user_id, events.new_event(
        data, source=SOURCE, occurred_at=ctx.clock.now(), correlation_id=user_id, causation_id=cause or None))


# ---------------------------------------------------------------- bringing a user up to date
async def _accrue_fee(conn: asyncpg.Connection, item: dict, at: datetime) -> None:
    if item["kind"] != ItemKind.INSTALLMENT or item["fee_accrued"]:
        return
    if item["fee"] > 0:
        await ledger.transfer(conn, f"fee:{item['item_id']}", fees_receivable(item["user_id"]), REVENUE_INSTALLMENT_FEE,
                              item["fee"], code="installment_fee", now=at)
    await store.mark_fee_accrued(conn, item["item_id"])


async def _issue(ctx: Context, conn: asyncpg.Connection, user_id: str, period: Period, now: datetime) -> bool:
    """Bill the items of `period` and issue its statement if they bill anything (a cycle whose
    purchases were all refunded, or an emptied installment period, issues none). The caller moves
    the cursor."""
    rules = _rules(ctx)
    items = await store.period_items(conn, user_id, str(period))
    if not items:
        return False
    await store.mark_billed(conn, user_id, str(period))
    issue_at = domain.statement_issue_at(period, rules)
    for item in items:
        await _accrue_fee(conn, item, issue_at)
    if not domain.bills_anything(items):
        return False
    sid = domain.statement_id(user_id, period)
    issued = await store.insert_statement(conn, sid, user_id, str(period), domain.statement_issue_date(period, rules),
                                          domain.statement_due_date(period, rules), now)
    if issued:
        log.info("statement issued", user_id=user_id, statement_id=sid, period=str(period))
    return issued


async def _charge_penalties(ctx: Context, conn: asyncpg.Connection, user_id: str, now: datetime) -> None:
    """Charge every ended overdue day not charged yet. Principal only changes under the account
    lock after a catch-up, so the principal unpaid now is the principal unpaid at the end of each
    of these days."""
    rules = _rules(ctx)
    yesterday = domain.business_date(now, rules) - timedelta(days=1)
    for item in await store.items_to_charge(conn, user_id, yesterday):
        days = domain.charged_overdue_days(item["due_on"], now, rules, after=item["penalty_through"])
        if not days:
            continue
        unpaid = item["principal"] - item["principal_paid"]
        amount = domain.daily_penalty(unpaid, rules)
        charged = await store.insert_charges(conn, item["item_id"], [(d, unpaid, amount) for d in days], now)
        total = 0
        for day, day_amount in charged:
            if day_amount > 0:
                await ledger.transfer(conn, f"penalty:{item['item_id']}:{day.isoformat()}", fees_receivable(user_id),
                                      REVENUE_PENALTY, day_amount, code="penalty",
                                      now=domain.overdue_day_charged_at(day, rules))
            total += day_amount
        await store.add_penalty(conn, item["item_id"], total, days[-1])
        log.info("overdue days charged", user_id=user_id, item_id=item["item_id"], days=len(charged),
                 first=days[0].isoformat(), last=days[-1].isoformat(), penalty=total)


async def catch_up(ctx: Context, conn: asyncpg.Connection, account: dict, now: datetime) -> dict:
    """Issue the statements whose moment has come and charge the ended overdue days. The caller
    holds the account lock and calls `settle` afterwards (which saves the account)."""
    due = domain.periods_to_issue(Period.parse(account["next_period"]).prev(), now, _rules(ctx))
    for period in due:
        await _issue(ctx, conn, account["user_id"], period, now)
    if due:
        account = {**account, "next_period": str(due[-1].next())}
    await _charge_penalties(ctx, conn, account["user_id"], now)
    return account


async def settle(ctx: Context, conn: asyncpg.Connection, account: dict, now: datetime, cause: str | None) -> dict:
    """Overdue / settled events, the next timer moment; saves the account."""
    rules = _rules(ctx)
    user_id = account["user_id"]
    oldest = await store.oldest_unpaid_billed_due(conn, user_id)
    account = dict(account)
    days = domain.days_overdue(oldest, now, rules) if oldest is not None else 0  # 0: not overdue
    if days:
        if not account["overdue"] or days > account["days_overdue"]:
            await _emit(ctx, conn, AccountOverdue(user_id=user_id, days_overdue=days, as_of=now), user_id, cause)
            if not account["overdue"]:
                log.info("account overdue", user_id=user_id, days_overdue=days)
            account.update(overdue=True, days_overdue=days)
    elif account["overdue"]:
        await _emit(ctx, conn, AccountSettled(user_id=user_id, as_of=now), user_id, cause)
        log.info("account settled", user_id=user_id)
        account.update(overdue=False, days_overdue=0)
    account["next_check_at"] = domain.next_check_at(Period.parse(account["next_period"]), oldest, now, rules)
    await store.save_account(conn, account, now)
    return account


async def up_to_date(ctx: Context, conn: asyncpg.Connection, user_id: str, now: datetime) -> dict | None:
    """Lock the user's account and bring it up to date; None when the user has none."""
    account = await store.lock_account(conn, user_id)
    return await catch_up(ctx, conn, account, now) if account else None


# ---------------------------------------------------------------- posting purchases and plans
async def _ensure_issued(ctx: Context, conn: asyncpg.Connection, user_id: str, period: Period, now: datetime) -> None:
    """A cycle already past issuing that had no statement (it was empty): issue it now."""
    rules = _rules(ctx)
    await store.insert_statement(conn, domain.statement_id(user_id, period), user_id, str(period),
                                 domain.statement_issue_date(period, rules), domain.statement_due_date(period, rules),
                                 now)


async def _post_to_cycle(ctx: Context, conn: asyncpg.Connection, account: dict, period: Period, amount: int,
                         now: datetime) -> None:
    rules = _rules(ctx)
    user_id = account["user_id"]
    billed = period < Period.parse(account["next_period"])
    due = domain.statement_due_date(period, rules)
    if billed:
        await _ensure_issued(ctx, conn, user_id, period, now)
        log.warning("purchase posted to an issued statement", user_id=user_id, period=str(period))
    await store.add_statement_item(conn, domain.statement_id(user_id, period), user_id, str(period), due, amount,
                                   billed, domain.late_penalty_through(due, now, rules))


async def _create_plan(ctx: Context, conn: asyncpg.Connection, account: dict, plan_id: str, source: PlanSource,
                       plan: list[InstallmentPeriod], now: datetime, *, order_id: str | None = None,
                       statement_id: str | None = None) -> None:
    rules = _rules(ctx)
    user_id = account["user_id"]
    next_period = Period.parse(account["next_period"])
    await store.insert_plan(conn, plan_id, user_id, source.value, order_id, statement_id, len(plan),
                            sum(p.principal for p in plan), sum(p.fee for p in plan), now)
    for p in plan:
        period = domain.statement_period_for_due(p.due_on, rules)
        billed = period < next_period
        if billed:
            await _ensure_issued(ctx, conn, user_id, period, now)
        item_id = f"{plan_id}-{p.period_no}"
        await store.insert_installment_item(conn, item_id, user_id, str(period), p.due_on, plan_id, p.period_no,
                                            p.principal, p.fee, billed,
                                            domain.late_penalty_through(p.due_on, now, rules))
        if billed:
            await _accrue_fee(conn, await store.get_item(conn, item_id), now)


# ---------------------------------------------------------------- users.events
async def user_registered(ctx: Context, conn: asyncpg.Connection, env: Envelope, e: UserRegistered) -> None:
    """Billing keeps only the id: statements of a user it does not know are 404 USER_NOT_FOUND."""
    await store.insert_user(conn, e.user_id, e.registered_at)


# ---------------------------------------------------------------- credit.events
async def drawdown_committed(ctx: Context, conn: asyncpg.Connection, env: Envelope, e: DrawdownCommitted) -> None:
    """A Huabei purchase: post it to its cycle, or create its installment plan."""
    rules = _rules(ctx)
    now = ctx.clock.now()
    period = domain.cycle_of(e.committed_at, rules)
    await store.ensure_account(conn, e.user_id, str(period), domain.statement_issue_at(period, rules), now)
    account = await up_to_date(ctx, conn, e.user_id, now)
    plan_id = f"P-{e.order_id}" if e.installments > 1 else None
    if not await store.insert_purchase(conn, e.order_id, e.user_id, e.amount, e.installments, e.committed_at,
                                       str(period), plan_id):
        log.warning("drawdown already posted", order_id=e.order_id)
        await settle(ctx, conn, account, now, env.event_id)
        return
    if plan_id is None:
        await _post_to_cycle(ctx, conn, account, period, e.amount, now)
    else:
        plan = domain.installment_plan(e.amount, e.installments, domain.first_due_for_purchase(e.committed_at, rules),
                                       rules)
        await _create_plan(ctx, conn, account, plan_id, PlanSource.PURCHASE, plan, now, order_id=e.order_id)
    purchase = await store.get_purchase(conn, e.order_id)
    for refund in await store.waiting_refunds(conn, e.order_id):  # refunds that arrived first
        await _apply_refund(ctx, conn, purchase, refund, now, env.event_id)
    await settle(ctx, conn, account, now, env.event_id)


async def drawdown_refunded(ctx: Context, conn: asyncpg.Connection, env: Envelope, e: DrawdownRefunded) -> None:
    """A refund of a Huabei purchase reduces what is owed for it; the excess is an overpayment."""
    if not await store.insert_refund(conn, e.order_id, e.refund_key, e.user_id, e.amount, e.refunded_at):
        return  # this refund was seen already
    purchase = await store.get_purchase(conn, e.order_id)
    if purchase is None:
        log.warning("refund before its purchase: kept until the purchase arrives", order_id=e.order_id)
        return
    now = ctx.clock.now()
    account = await up_to_date(ctx, conn, purchase["user_id"], now)
    refund = {"order_id": e.order_id, "refund_key": e.refund_key, "amount": e.amount}
    await _apply_refund(ctx, conn, purchase, refund, now, env.event_id)
    await settle(ctx, conn, account, now, env.event_id)


async def _apply_refund(ctx: Context, conn: asyncpg.Connection, purchase: dict, refund: dict, now: datetime,
                        cause: str | None) -> None:
    """Against the purchase's cycle item (still open or billed), then -- if that statement was
    converted, or the purchase was in installments -- the plan's remaining principal and unaccrued
    fee (domain.apply_refund_to_installments); never below zero."""
    rules = _rules(ctx)
    user_id = purchase["user_id"]
    left = refund["amount"]
    reduced = waived = 0
    plan_id = purchase["plan_id"]
    if plan_id is None:
        period = Period.parse(purchase["period"])
        item = await store.get_item(conn, domain.statement_id(user_id, period))
        if item is not None:
            cut = domain.apply_refund_to_statement(item["principal"] - item["principal_paid"], left)
            if cut.principal_reduced:
                await store.set_item_amounts(conn, item["item_id"], principal=item["principal"] - cut.principal_reduced,
                                             fee=item["fee"], fee_paid=item["fee_paid"])
            reduced, left = cut.principal_reduced, cut.overpayment
        statement = await store.statement_of_period(conn, user_id, str(period))
        plan_id = statement["plan_id"] if statement else None
    if left and plan_id is not None:
        items = await store.plan_items(conn, plan_id)
        before = [PlanPeriod(period_no=i["period_no"], due_on=i["due_on"], principal=i["principal"], fee=i["fee"],
                             principal_paid=i["principal_paid"], fee_paid=i["fee_paid"]) for i in items]
        result = domain.apply_refund_to_installments(before, left, now, rules)
        fee_returned = 0
        for item, old, new in zip(items, before, result.periods):
            if new != old:
                await store.set_item_amounts(conn, item["item_id"], principal=new.principal, fee=new.fee,
                                             fee_paid=new.fee_paid)
                fee_returned += old.fee_paid - new.fee_paid
        if fee_returned:  # cannot happen: only accrued fees are payable, and those are never waived
            log.error("a refund returned paid installment fee", order_id=purchase["order_id"], amount=fee_returned)
        reduced += result.principal_reduced
        waived += result.fee_waived
        left = result.overpayment
    await store.add_refunded(conn, purchase["order_id"], refund["amount"])
    await store.mark_refund_applied(conn, purchase["order_id"], refund["refund_key"], reduced, waived, left, now)
    log.info("refund applied", order_id=purchase["order_id"], refund_key=refund["refund_key"],
             principal_reduced=reduced, fee_waived=waived, overpayment=left)
    if left:
        await _emit(ctx, conn, OverpaymentRefunded(user_id=user_id, order_id=purchase["order_id"],
                                                   refund_key=refund["refund_key"], amount=left), user_id, cause)


# ---------------------------------------------------------------- billing.commands
async def apply_repayment(ctx: Context, conn: asyncpg.Connection, env: Envelope, c: ApplyRepayment) -> None:
    """Allocate a repayment the gateway has taken; once per repayment_id (a repeat gets the same answer)."""
    rules = _rules(ctx)
    now = ctx.clock.now()
    account = await store.lock_account(conn, c.user_id)
    existing = await store.get_repayment(conn, c.repayment_id)
    if existing is not None:
        await _emit(ctx, conn, RepaymentAllocated.model_validate(existing["allocated"]), existing["user_id"],
                    env.event_id)
        return
    if account is not None:
        account = await catch_up(ctx, conn, account, now)
    rows = await store.owed_items(conn, c.user_id) if account is not None else []
    owed = [Owed(item_id=r["item_id"], due_on=r["due_on"], penalty=r["penalty"] - r["penalty_paid"],
                 fee=(r["fee"] - r["fee_paid"]) if r["fee_accrued"] else 0,
                 principal=r["principal"] - r["principal_paid"]) for r in rows]
    allocation = domain.allocate(c.amount, owed)
    by_id = {r["item_id"]: r for r in rows}
    lines = []
    for paid in allocation.lines:
        item = by_id[paid.item_id]
        await store.pay_item(conn, paid.item_id, paid.penalty, paid.fee, paid.principal)
        kind = domain.line_kind(ItemKind(item["kind"]), item["billed"])
        lines.append(AllocationLine(item_id=paid.item_id, kind=kind.value,
                                    statement_id=domain.statement_id(c.user_id, Period.parse(item["period"])),
                                    due_on=item["due_on"], penalty=paid.penalty, fee=paid.fee,
                                    principal=paid.principal))
    fee = sum(line.fee for line in lines)
    penalty = sum(line.penalty for line in lines)
    if fee + penalty:
        await ledger.transfer(conn, f"repay:{c.repayment_id}:fees", GATEWAY, fees_receivable(c.user_id), fee + penalty,
                              code="repayment", now=now)
    allocated = RepaymentAllocated(repayment_id=c.repayment_id, user_id=c.user_id, amount=c.amount,
                                   principal=allocation.principal, fee=fee, penalty=penalty,
                                   overpayment=allocation.remainder, lines=lines)
    on_time = domain.repaid_on_time((line.due_on for line in allocation.lines), now, rules)
    await store.insert_repayment(conn, {
        "repayment_id": c.repayment_id, "user_id": c.user_id, "amount": c.amount, "requested_at": c.requested_at,
        "applied_at": now, "principal": allocation.principal, "fee": fee, "penalty": penalty,
        "overpayment": allocation.remainder, "on_time": on_time, "allocated": allocated.model_dump(mode="json")})
    await _emit(ctx, conn, allocated, c.user_id, env.event_id)
    if lines:
        await _emit(ctx, conn, RepaymentApplied(user_id=c.user_id, repayment_id=c.repayment_id,
                                                principal=allocation.principal, on_time=on_time, applied_at=now),
                    c.user_id, env.event_id)
    log.info("repayment allocated", user_id=c.user_id, repayment_id=c.repayment_id, amount=c.amount,
             principal=allocation.principal, fee=fee, penalty=penalty, overpayment=allocation.remainder,
             on_time=on_time)
    if account is not None:
        await settle(ctx, conn, account, now, env.event_id)


# ---------------------------------------------------------------- converting a statement (API)
async def convert_statement(ctx: Context, conn: asyncpg.Connection, user_id: str, statement_id: str,
                            periods: int) -> tuple[int, dict]:
    """Convert an issued, not yet due, not yet converted statement's outstanding principal into an
    installment plan whose period 1 is due on the statement's own due day (201), or ApiError."""
    rules = _rules(ctx)
    now = ctx.clock.now()
    parsed = domain.parse_statement_id(statement_id)
    if parsed is None or parsed[1] != user_id:
        raise ApiError(404, "STATEMENT_NOT_FOUND", f"{user_id} has no statement {statement_id}")
    period = parsed[0]
    account = await up_to_date(ctx, conn, user_id, now)
    if account is None:
        raise ApiError(404, "STATEMENT_NOT_FOUND", f"{user_id} has no statement {statement_id}")
    statement = await store.get_statement(conn, statement_id)
    if statement is None:
        if period >= Period.parse(account["next_period"]) and await store.period_items(conn, user_id, str(period)):
            # the open cycle
            raise ApiError(409, *domain.conversion_refusal(
                issued=False, converted=False, due_on=domain.statement_due_date(period, rules), outstanding_principal=0,
                now=now, rules=rules))
        raise ApiError(404, "STATEMENT_NOT_FOUND", f"{user_id} has no statement {statement_id}")
    item = await store.get_item(conn, statement_id)
    outstanding = (item["principal"] - item["principal_paid"]) if item else 0
    refusal = domain.conversion_refusal(issued=True, converted=statement["converted_at"] is not None,
                                        due_on=statement["due_on"], outstanding_principal=outstanding, now=now,
                                        rules=rules)
    if refusal:
        raise ApiError(409, *refusal)
    plan = domain.installment_plan(outstanding, periods, statement["due_on"], rules)
    plan_id = f"C-{statement_id}"
    await store.set_item_amounts(conn, statement_id, principal=item["principal"] - outstanding, fee=0, fee_paid=0)
    await _create_plan(ctx, conn, account, plan_id, PlanSource.CONVERSION, plan, now, statement_id=statement_id)
    await store.set_converted(conn, statement_id, plan_id, now)
    await settle(ctx, conn, account, now, None)
    log.info("statement converted", user_id=user_id, statement_id=statement_id, periods=periods, principal=outstanding)
    return 201, {"statement_id": statement_id,
                 "periods": [{"period": p.period_no, "due_on": p.due_on.isoformat(), "principal": p.principal,
                              "fee": p.fee} for p in plan]}


# ---------------------------------------------------------------- the timer
async def run_due(ctx: Context, limit: int = TIMER_BATCH) -> tuple[int, int]:
    """Bring up to date the users whose timer has come, up to `limit`, one transaction each (so the
    shared ledger rows -- revenue:penalty, revenue:installment_fee -- are held briefly and one
    failing user does not hold back the others). Returns (selected, done)."""
    selected = done = 0
    failed: list[str] = []
    while selected < limit:
        user_id = None
        try:
            async with ctx.pool.acquire() as conn, conn.transaction():
                now = ctx.clock.now()
                due = await store.lock_due_accounts(conn, now, 1, exclude=failed)
                if not due:
                    break
                account = due[0]
                user_id = account["user_id"]
                selected += 1
                account = await catch_up(ctx, conn, account, now)
                await settle(ctx, conn, account, now, None)
            done += 1
        except Exception as exc:
            if transient(exc) or user_id is None:
                raise
            failed.append(user_id)
            log.exception("billing timer failed for a user; retried next tick", user_id=user_id)
    return selected, done


async def timer_loop(ctx: Context) -> None:
    """Statement issuing, overdue penalties and freezing: every second, and at once when the test
    clock moves here. The due moments are columns (accounts.next_check_at and the cursors), so a
    restart loses nothing and nothing fires twice."""
    async def scan() -> bool:
        if ctx.clock.controllable:
            await ctx.clock.refresh()
        selected, done = await run_due(ctx)
        return selected == done == TIMER_BATCH  # more may be due right now
    await timers.run(ctx, scan, name="billing")
