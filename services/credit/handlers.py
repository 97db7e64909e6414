"""Credit effects: one function per consumed command or event, inside the consumer's transaction,
plus the reservation-expiry and limit-review loops.

Ledger accounts (shared/ledger.py): `loan:<user>` (what the buyer owes the lender: debit-normal)
and `gateway` (money lent out through the gateway for orders, less what came back).
"""
from __future__ import annotations

from datetime import timedelta
from zoneinfo import ZoneInfo

import asyncpg
import structlog

from services.credit import domain, store
from shared import events, ledger, outbox, timers, topics
from shared.events import (AccountOverdue, AccountSettled, CancelCredit, CommitCredit, CreditRefused, CreditReserved,
                           DrawdownCommitted, DrawdownRefunded, Envelope, OverpaymentRefunded, PaymentSucceeded,
                           RepaymentApplied,
                           ReserveCredit, RestoreCredit, UserRegistered)
from shared.runtime import Context

SOURCE = "credit"
log = structlog.get_logger("credit")


def _tz(ctx: Context) -> ZoneInfo:
    return ZoneInfo(ctx.settings.business_tz)


async def _emit(ctx: Context, conn: asyncpg.Connection, data, *, key: str, cause: str | None) -> None:
    await outbox.add(conn, topics.CREDIT_EVENTS, key, events.new_event(
        data, source=SOURCE, occurred_at=ctx.clock.now(), correlation_id=getattr(data, "order_id", key),
        causation_id=cause))


async def refresh_score(ctx: Context, conn: asyncpg.Connection, user_id: str) -> int | None:
    """Recompute a Huabei user's score after new behaviour (the limit moves only at reviews)."""
    row = await store.get_profile(conn, user_id)
    if row is None or await store.get_account(conn, user_id) is None:
        return None
    profile, behaviour = store.profile_and_behaviour(row, _tz(ctx))
    score = domain.credit_score(profile, behaviour, ctx.clock.now().astimezone(_tz(ctx)).date())
    await store.set_score(conn, user_id, score)
    return score


# ---------------------------------------------------------------- profile projection
async def user_registered(ctx: Context, conn: asyncpg.Connection, env: Envelope, e: UserRegistered) -> None:
    await store.upsert_profile(conn, e.model_dump(), ctx.clock.now())


async def payment_succeeded(ctx: Context, conn: asyncpg.Connection, env: Envelope, e: PaymentSucceeded) -> None:
    await store.count_behaviour(conn, e.buyer_id, "successful_payments")
    await refresh_score(ctx, conn, e.buyer_id)


async def payments_succeeded(ctx: Context, conn: asyncpg.Connection, items: list) -> list:
    """`payment_succeeded` for a run of them: one counting statement; scores of Huabei users."""
    counts: dict[str, int] = {}
    for _, e in items:
        counts[e.buyer_id] = counts.get(e.buyer_id, 0) + 1
    await store.count_behaviour_many(conn, counts, "successful_payments")
    for user_id in await store.with_account(conn, list(counts)):
        await refresh_score(ctx, conn, user_id)
    return []


# ---------------------------------------------------------------- drawdowns: try / confirm / cancel
async def reserve_credit(ctx: Context, conn: asyncpg.Connection, env: Envelope, c: ReserveCredit) -> None:
    existing = await store.get_reservation(conn, c.order_id)
    if existing is not None:  # a re-sent command: the same answer again
        if existing["state"] == "refused":
            await _emit(ctx, conn, CreditRefused(order_id=c.order_id, user_id=c.user_id,
                                                 reason_code=existing["reason_code"], message=existing["message"]),
                        key=c.order_id, cause=env.event_id)
        elif existing["state"] in ("reserved", "committed"):
            await _emit(ctx, conn, CreditReserved(order_id=c.order_id, user_id=c.user_id, amount=existing["amount"]),
                        key=c.order_id, cause=env.event_id)
        return
    now = ctx.clock.now()
    account = await store.get_account(conn, c.user_id, lock=True)
    refusal = domain.reservation_refusal(store.line_of(account), c.amount)
    if refusal is None and not await store.try_reserve(conn, c.user_id, c.amount):
        refusal = domain.reservation_refusal(store.line_of(await store.get_account(conn, c.user_id)), c.amount) or (
            "CREDIT_LIMIT_EXCEEDED", "the available credit is too small")
    expires = now + timedelta(seconds=ctx.deps.review.reservation_ttl_seconds)
    await store.insert_reservation(conn, c.order_id, c.user_id, c.amount, c.installments, expires, now, refusal=refusal)
    if refusal:
        await _emit(ctx, conn, CreditRefused(order_id=c.order_id, user_id=c.user_id, reason_code=refusal[0],
                                             message=refusal[1]), key=c.order_id, cause=env.event_id)
    else:
        await _emit(ctx, conn, CreditReserved(order_id=c.order_id, user_id=c.user_id, amount=c.amount),
                    key=c.order_id, cause=env.event_id)


async def commit_credit(ctx: Context, conn: asyncpg.Connection, env: Envelope, c: CommitCredit) -> None:
    r = await store.get_reservation(conn, c.order_id)
    if r is None or r["state"] not in ("reserved", "expired"):
        return  # unknown, or already committed or cancelled
    now = ctx.clock.now()
    if r["state"] == "expired":
        # The hold outran the reservation; the money is in escrow already, so the drawdown stands.
        log.warning("committing an expired reservation", order_id=c.order_id)
        await store.move(conn, r["user_id"], used=r["amount"])
    else:
        await store.move(conn, r["user_id"], reserved=-r["amount"], used=r["amount"])
    await store.set_reservation_state(conn, c.order_id, "committed", now)
    await ledger.transfer(conn, f"drawdown:{c.order_id}", f"loan:{r['user_id']}", "gateway", r["amount"],
                          code="drawdown", order_id=c.order_id, now=now)
    await _emit(ctx, conn, DrawdownCommitted(order_id=c.order_id, user_id=r["user_id"], amount=r["amount"],
                                             installments=r["installments"], committed_at=now),
                key=c.order_id, cause=env.event_id)


async def cancel_credit(ctx: Context, conn: asyncpg.Connection, env: Envelope, c: CancelCredit) -> None:
    r = await store.get_reservation(conn, c.order_id)
    if r is None or r["state"] != "reserved":
        return
    await store.move(conn, r["user_id"], reserved=-r["amount"])
    await store.set_reservation_state(conn, c.order_id, "cancelled", ctx.clock.now())


async def restore_credit(ctx: Context, conn: asyncpg.Connection, env: Envelope, c: RestoreCredit) -> None:
    """A refund of a Huabei-funded order: the principal goes back to the lender and the line."""
    if not await store.first_restoration(conn, c.order_id, c.refund_key, c.amount):
        return
    now = ctx.clock.now()
    await store.move(conn, c.user_id, used=-c.amount)
    await ledger.transfer(conn, f"restore:{c.order_id}:{c.refund_key}", "gateway", f"loan:{c.user_id}", c.amount,
                          code="refund", order_id=c.order_id, now=now)
    await _emit(ctx, conn, DrawdownRefunded(order_id=c.order_id, user_id=c.user_id, amount=c.amount,
                                            refund_key=c.refund_key, refunded_at=now), key=c.order_id, cause=env.event_id)


async def expire_reservations(ctx: Context, batch: int = 100) -> int:
    async with ctx.pool.acquire() as conn, conn.transaction():
        expired = await store.expired_reservations(conn, ctx.clock.now(), batch)
        for r in expired:
            await store.move(conn, r["user_id"], reserved=-r["amount"])
            await store.set_reservation_state(conn, r["order_id"], "expired", ctx.clock.now())
            log.info("reservation expired; credit freed", order_id=r["order_id"], amount=r["amount"])
    return len(expired)


# ---------------------------------------------------------------- billing's news
async def repayment_applied(ctx: Context, conn: asyncpg.Connection, env: Envelope, e: RepaymentApplied) -> None:
    """Repaid principal comes back to the lender (through the gateway) and to the line."""
    if e.principal:
        await store.move(conn, e.user_id, used=-e.principal)
        await ledger.transfer(conn, f"repayment:{e.repayment_id}", "gateway", f"loan:{e.user_id}", e.principal,
                              code="repayment", now=ctx.clock.now())
    await store.count_behaviour(conn, e.user_id, "on_time_repayments" if e.on_time else "late_repayments")
    await store.count_review_behaviour(conn, e.user_id, e.on_time)
    await refresh_score(ctx, conn, e.user_id)


async def overpayment_refunded(ctx: Context, conn: asyncpg.Connection, env: Envelope,
                               e: OverpaymentRefunded) -> None:
    """A refund of a purchase the buyer had already repaid: the lender pays the excess out (the
    gateway puts it in the wallet), which settles what the restore over-credited on the loan and
    on the line (the repayment had already given that principal back)."""
    await store.move(conn, e.user_id, used=e.amount)
    await ledger.transfer(conn, f"overpayment:{e.order_id}:{e.refund_key}", f"loan:{e.user_id}", "gateway", e.amount,
                          code="huabei_overpayment", order_id=e.order_id, now=ctx.clock.now())


async def account_overdue(ctx: Context, conn: asyncpg.Connection, env: Envelope, e: AccountOverdue) -> None:
    await store.set_status(conn, e.user_id, "frozen")
    await store.set_days_overdue(conn, e.user_id, e.days_overdue)
    await refresh_score(ctx, conn, e.user_id)


async def account_settled(ctx: Context, conn: asyncpg.Connection, env: Envelope, e: AccountSettled) -> None:
    await store.set_status(conn, e.user_id, "active")


# ---------------------------------------------------------------- limit review
async def review_limits(ctx: Context, batch: int = 100) -> int:
    rules = ctx.deps.review
    now = ctx.clock.now()
    today = now.astimezone(_tz(ctx)).date()
    async with ctx.pool.acquire() as conn, conn.transaction():
        due = await store.due_reviews(conn, now - timedelta(days=rules.interval_days), batch)
        for row in due:
            profile, behaviour = store.profile_and_behaviour(row, _tz(ctx))
            score = domain.credit_score(profile, behaviour, today)
            limit = domain.reviewed_limit(row["credit_limit"], score, on_time_since=row["on_time_since_review"],
                                          late_since=row["late_since_review"], frozen=row["status"] == "frozen",
                                          rules=rules)
            await store.save_review(conn, row["user_id"], limit, score, now)
            if limit != row["credit_limit"]:
                log.info("credit limit raised", user_id=row["user_id"], old=row["credit_limit"], new=limit, score=score)
    return len(due)


async def run_timers(ctx: Context) -> None:
    """Reservation expiry and limit reviews: due times are columns, so they survive restarts."""
    async def scan() -> bool:
        expired = await expire_reservations(ctx)
        reviewed = await review_limits(ctx)
        return expired >= 100 or reviewed >= 100
    await timers.run(ctx, scan, name="credit timers")
