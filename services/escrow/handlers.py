"""Escrow effects: one function per escrow command, inside the consumer's transaction, and the
auto-confirm timer. Each locks the order's row, asks the domain for a decision and applies it:
state, ledger, refund record and outgoing events (outbox) in the same transaction."""
from __future__ import annotations


from itertools import repeat

import asyncpg
import structlog

from services.escrow import domain, store
from services.escrow.domain import Decision, FeeRates
from shared import events, ledger, outbox, timers, topics, tracing
from shared.consumer import transient
from shared.events import (CancelOrder, ClawbackSettled, ConfirmOrder, Envelope, HoldFunds, RefundOrder,
                           ShipOrder)
from shared.runtime import Context

SOURCE = "escrow"
AUTO_CONFIRM_BATCH = 100

log = structlog.get_logger("escrow")


async def apply(ctx: Context, conn: asyncpg.Connection, order_id: str, decision: Decision,
                causation_id: str | None, traceparent: str | None = None) -> None:
    """`traceparent` (tracing on, a new hold): the order's context, kept for the auto-confirm timer."""
    if decision.changes_nothing:
        log.info("escrow command changes nothing", order_id=order_id)
        return
    now = ctx.clock.now()
    if decision.escrow is not None:
        await store.save(conn, decision.escrow, now, traceparent)
    for t in decision.transfers:
        await ledger.transfer(conn, t.id, debit=t.debit, credit=t.credit, amount=t.amount, code=t.code, now=now,
                              order_id=order_id)
    if decision.refund is not None:
        await store.save_refund(conn, decision.refund, now)
    for event in decision.emit:
        await outbox.add(conn, topics.ESCROW_EVENTS, order_id,
                         events.new_event(event, source=SOURCE, occurred_at=now, correlation_id=order_id,
                                          causation_id=causation_id))
    log.debug("escrow decision applied", order_id=order_id,
             status=decision.escrow.status.value if decision.escrow else None,
             emitted=[type(e).__name__ for e in decision.emit])


async def apply_many(ctx: Context, conn: asyncpg.Connection, decisions: list[tuple[str, Decision, str | None]],
                     traceparents: list[str | None] | None = None) -> None:
    """`apply` for many (order_id, decision, causation_id) at once: a few statements in all.
    Decisions that record a refund are not for this path. `traceparents` (tracing on only):
    each decision's kept context, in the same order (see `apply`)."""
    now = ctx.clock.now()
    assert all(d.refund is None for _, d, _ in decisions), "refunds are applied one by one"
    saved = [(d.escrow, t) for (_, d, _), t in zip(decisions, traceparents or repeat(None)) if d.escrow is not None]
    # The escrows and their events in one statement, then the ledger (same transaction).
    await store.save_many(conn, [e for e, _ in saved], now, [t for _, t in saved] if traceparents is not None else None,
                          emit=[(topics.ESCROW_EVENTS, order_id,
                                 events.new_event(event, source=SOURCE, occurred_at=now, correlation_id=order_id,
                                                  causation_id=cause))
                                for order_id, d, cause in decisions for event in d.emit])
    await ledger.transfer_many(conn, [
        ledger.NewTransfer(t.id, t.debit, t.credit, t.amount, t.code, order_id=order_id)
        for order_id, d, _ in decisions for t in d.transfers], now)


async def holds(ctx: Context, conn: asyncpg.Connection, items: list[tuple[Envelope, HoldFunds]]) -> list:
    """HoldFunds for orders escrow has not seen yet, as a set; the others one by one (hold_funds)."""
    existing = await store.lock_many(conn, [cmd.order_id for _, cmd in items])
    new = [(env, cmd) for env, cmd in items if cmd.order_id not in existing]
    # Tracing on: each hold keeps its own record's context (shared/tracing.py set_run).
    traceparents = [tracing.traceparent_for(env.event_id, cmd.order_id) for env, cmd in new] \
        if tracing.ENABLED else None
    await apply_many(ctx, conn, [(cmd.order_id, domain.on_hold(None, cmd), env.event_id) for env, cmd in new],
                     traceparents)
    return [(env, cmd) for env, cmd in items if cmd.order_id in existing]


async def hold_funds(ctx: Context, conn: asyncpg.Connection, env: Envelope, cmd: HoldFunds) -> None:
    escrow = await store.lock(conn, cmd.order_id)
    # Tracing on: a new hold keeps the order's context, for its auto-confirm release later.
    traceparent = tracing.traceparent_for(env.event_id, cmd.order_id) if tracing.ENABLED and escrow is None else None
    await apply(ctx, conn, cmd.order_id, domain.on_hold(escrow, cmd), env.event_id, traceparent)


async def ship_order(ctx: Context, conn: asyncpg.Connection, env: Envelope, cmd: ShipOrder) -> None:
    escrow = await store.lock(conn, cmd.order_id)
    await apply(ctx, conn, cmd.order_id, domain.on_ship(escrow, ctx.clock.now()), env.event_id)


async def confirm_order(ctx: Context, conn: asyncpg.Connection, env: Envelope, cmd: ConfirmOrder, *,
                        rates: FeeRates) -> None:
    escrow = await store.lock(conn, cmd.order_id)
    await apply(ctx, conn, cmd.order_id, domain.on_confirm(escrow, ctx.clock.now(), rates), env.event_id)


async def cancel_order(ctx: Context, conn: asyncpg.Connection, env: Envelope, cmd: CancelOrder) -> None:
    escrow = await store.lock(conn, cmd.order_id)
    await apply(ctx, conn, cmd.order_id, domain.on_cancel(escrow, cmd.order_id), env.event_id)


async def refund_order(ctx: Context, conn: asyncpg.Connection, env: Envelope, cmd: RefundOrder) -> None:
    escrow = await store.lock(conn, cmd.order_id)  # also serializes refunds of this order
    seen = await store.get_refund(conn, cmd.order_id, cmd.refund_id) is not None
    await apply(ctx, conn, cmd.order_id, domain.on_refund(escrow, cmd, seen), env.event_id)


async def clawback_settled(ctx: Context, conn: asyncpg.Connection, env: Envelope, cmd: ClawbackSettled) -> None:
    escrow = await store.lock(conn, cmd.order_id)
    refund = await store.get_refund(conn, cmd.order_id, cmd.refund_id)
    if refund is not None and refund.amount != cmd.amount:
        # Our record is the reservation the sum rule counted; settle that, but say so.
        log.warning("clawback settled with another amount than requested", order_id=cmd.order_id,
                    refund_id=cmd.refund_id, requested=refund.amount, settled=cmd.amount)
    await apply(ctx, conn, cmd.order_id, domain.on_clawback_settled(escrow, refund, cmd.ok), env.event_id)


# ---------------------------------------------------------------- auto-confirm timer
async def release_due(ctx: Context, rates: FeeRates, limit: int = AUTO_CONFIRM_BATCH) -> tuple[int, int]:
    """Release the holds whose auto-confirm time has come, in one transaction. The status
    changes with the release, so each fires once. Returns (selected, released)."""
    released = 0
    async with ctx.pool.acquire() as conn, conn.transaction():
        now = ctx.clock.now()
        due = await store.lock_due(conn, now, limit)
        for escrow, traceparent in due:
            # Tracing on: the release resumes the order's trace (kept on the hold), so the
            # FundsReleased it emits stays in it.
            if not tracing.ENABLED:
                released += await _auto_confirm(ctx, conn, escrow, now, rates)
                continue
            with _resumed(escrow, traceparent) as trace_ids, structlog.contextvars.bound_contextvars(**trace_ids):
                released += await _auto_confirm(ctx, conn, escrow, now, rates)
    return len(due), released


def _resumed(escrow, traceparent: str | None):
    return tracing.resuming(traceparent, "auto-confirm", {"danbao.correlation_id": escrow.order_id})


async def _auto_confirm(ctx: Context, conn: asyncpg.Connection, escrow, now, rates: FeeRates) -> int:
    """One due release in a savepoint: 1 if released, 0 if it failed (retried next tick)."""
    try:
        async with conn.transaction():  # savepoint: one bad row does not stop the others
            await apply(ctx, conn, escrow.order_id, domain.on_auto_confirm(escrow, now, rates), None)
        return 1
    except Exception as exc:
        if transient(exc):
            raise  # the connection or the transaction is gone: the loop retries the scan
        if tracing.ENABLED:
            tracing.failed(exc)
        log.exception("auto-confirm failed; retried next tick", order_id=escrow.order_id)
        return 0


async def auto_confirm_loop(ctx: Context, rates: FeeRates) -> None:
    """Every second, and as soon as the test clock moves here. The timer is the
    auto_confirm_at column, so a restart loses nothing."""
    async def scan() -> bool:
        selected, released = await release_due(ctx, rates)
        return selected == released == AUTO_CONFIRM_BATCH  # more may be due right now
    await timers.run(ctx, scan, name="auto-confirm")
