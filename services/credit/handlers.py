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
from shared import events, ledger, outbox, timers, topics, tracing
from shared.events import (AccountOverdue, AccountSettled, CancelCredit, CommitCredit, Envelope, OverpaymentRefunded,
                           PaymentSucceeded, RepaymentApplied, ReserveCredit, RestoreCredit, UserRegistered)
from shared.runtime import Context

SOURCE = "credit"
log = structlog.get_logger("credit")


def _tz(ctx: Context) -> ZoneInfo:
    return ctx.settings.zone


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
    for user_id in await store.count_behaviour_many(conn, counts, "successful_payments"):
        await refresh_score(ctx, conn, user_id)
    return []


# ---------------------------------------------------------------- drawdowns: try / confirm / cancel
# The rules are domain.on_reserve / on_commit / on_cancel / on_expire / on_restore (pure); these
# load the reservation, decide and apply the decision in one place (`_apply`).
async def _apply(ctx: Context, conn: asyncpg.Connection, d: domain.CreditDecision, user_id: str, order_id: str, *,
                 new: bool = False, cause: str | None, traceparent: str | None = None) -> None:
    """`traceparent` (tracing on, a new reservation): the order's context, kept for the expiry timer."""
    now = ctx.clock.now()
    r = d.reservation
    if r is not None and new:
        refusal = (r.reason_code, r.message) if r.state is domain.ReservationState.REFUSED else None
        await store.insert_reservation(conn, r.order_id, r.user_id, r.amount, r.installments, r.expires_at, now,
                                       refusal=refusal, traceparent=traceparent)
    elif r is not None:
        await store.set_reservation_state(conn, r.order_id, r.state.value, now, reason_code=r.reason_code,
                                          message=r.message, committed_at=r.committed_at)
    if (d.reserved or d.used) and not (new and d.reserved > 0):  # a new reservation took its credit already
        await store.move(conn, user_id, reserved=d.reserved, used=d.used)
    for t in d.transfers:
        await ledger.transfer(conn, t.id, t.debit, t.credit, t.amount, code=t.code, order_id=order_id, now=now)
    for event in d.emit:
        await _emit(ctx, conn, event, key=event.order_id, cause=cause)


async def _reservation(conn: asyncpg.Connection, order_id: str) -> domain.Reservation | None:
    row = await store.get_reservation(conn, order_id)
    return domain.Reservation.from_row(row) if row else None


async def reserve_credit(ctx: Context, conn: asyncpg.Connection, env: Envelope, c: ReserveCredit) -> None:
    existing = await _reservation(conn, c.order_id)
    now, ttl = ctx.clock.now(), ctx.deps.review.reservation_ttl_seconds
    if existing is not None:  # a re-sent command: the same answer again
        d = domain.on_reserve(existing, None, c, now, ttl)
        await _apply(ctx, conn, d, c.user_id, c.order_id, cause=env.event_id)
        return
    account = await store.get_account(conn, c.user_id, lock=True)
    d = domain.on_reserve(None, store.line_of(account), c, now, ttl)
    # The reservation is one conditional update: concurrent purchases can never overdraw the line.
    if d.reserved and not await store.try_reserve(conn, c.user_id, c.amount):
        refusal = domain.reservation_refusal(store.line_of(await store.get_account(conn, c.user_id)), c.amount)
        refusal = refusal or ("CREDIT_LIMIT_EXCEEDED", "the available credit is too small")
        d = domain.new_reservation(c, now, ttl, refusal)
    # Tracing on: the reservation keeps the order's context, for its expiry later.
    traceparent = tracing.traceparent_for(env.event_id, c.order_id) if tracing.ENABLED else None
    await _apply(ctx, conn, d, c.user_id, c.order_id, new=True, cause=env.event_id, traceparent=traceparent)


async def commit_credit(ctx: Context, conn: asyncpg.Connection, env: Envelope, c: CommitCredit) -> None:
    r = await _reservation(conn, c.order_id)
    if r is None:
        return
    line = None
    if r.state is domain.ReservationState.EXPIRED:
        # Its credit went back to the line: the check and the drawdown happen under the account's
        # lock (reservation, then account: the order the expiry loop locks them in too).
        line = store.line_of(await store.get_account(conn, r.user_id, lock=True))
    d = domain.on_commit(r, line, ctx.clock.now())
    if r.state is domain.ReservationState.EXPIRED:
        refused = d.reservation is not None and d.reservation.state is domain.ReservationState.REFUSED
        log.warning("commit of an expired reservation", order_id=c.order_id, refused=refused)
    await _apply(ctx, conn, d, r.user_id, c.order_id, cause=env.event_id)


async def cancel_credit(ctx: Context, conn: asyncpg.Connection, env: Envelope, c: CancelCredit) -> None:
    r = await _reservation(conn, c.order_id)
    if r is not None:
        await _apply(ctx, conn, domain.on_cancel(r, ctx.clock.now()), r.user_id, c.order_id, cause=env.event_id)


async def restore_credit(ctx: Context, conn: asyncpg.Connection, env: Envelope, c: RestoreCredit) -> None:
    """A refund of a Huabei-funded order: the principal goes back to the lender and the line."""
    first = await store.first_restoration(conn, c.order_id, c.refund_key, c.amount)
    await _apply(ctx, conn, domain.on_restore(first, c, ctx.clock.now()), c.user_id, c.order_id, cause=env.event_id)


async def expire_reservations(ctx: Context, batch: int = 100) -> int:
    async with ctx.pool.acquire() as conn, conn.transaction():
        now = ctx.clock.now()
        expired = await store.expired_reservations(conn, now, batch)
        for row in expired:
            r = domain.Reservation.from_row(row)
            # Tracing on: the expiry resumes the order's trace (kept on the reservation), so the
            # credit freed (its statements, its log line) shows in the order's trace.
            if not tracing.ENABLED:
                await _expire(ctx, conn, r, now)
                continue
            with tracing.resuming(row.get("traceparent"), "reservation expiry",
                                  {"danbao.correlation_id": r.order_id}) as trace_ids, \
                    structlog.contextvars.bound_contextvars(**trace_ids):
                await _expire(ctx, conn, r, now)
    return len(expired)


async def _expire(ctx: Context, conn: asyncpg.Connection, r: domain.Reservation, now) -> None:
    await _apply(ctx, conn, domain.on_expire(r, now), r.user_id, r.order_id, cause=None)
    log.info("reservation expired; credit freed", order_id=r.order_id, amount=r.amount)


# ---------------------------------------------------------------- billing's news
async def repayment_applied(ctx: Context, conn: asyncpg.Connection, env: Envelope, e: RepaymentApplied) -> None:
    """Repaid principal comes back to the lender (through the gateway) and to the line."""
    if e.principal:
        await store.move(conn, e.user_id, used=-e.principal)
        await ledger.transfer(conn, f"repayment:{e.repayment_id}", domain.LENT, domain.loan_account(e.user_id),
                              e.principal,
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
    await ledger.transfer(conn, f"overpayment:{e.order_id}:{e.refund_key}", domain.loan_account(e.user_id), domain.LENT,
                          e.amount,
                          code="huabei_overpayment", order_id=e.order_id, now=ctx.clock.now())


async def account_overdue(ctx: Context, conn: asyncpg.Connection, env: Envelope, e: AccountOverdue) -> None:
    await store.set_status(conn, e.user_id, domain.AccountStatus.FROZEN)
    await store.set_days_overdue(conn, e.user_id, e.days_overdue)
    await refresh_score(ctx, conn, e.user_id)


async def account_settled(ctx: Context, conn: asyncpg.Connection, env: Envelope, e: AccountSettled) -> None:
    await store.set_status(conn, e.user_id, domain.AccountStatus.ACTIVE)


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
                                          late_since=row["late_since_review"],
                                          frozen=row["status"] == domain.AccountStatus.FROZEN,
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
