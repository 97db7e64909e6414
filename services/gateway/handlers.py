"""Gateway effects of upstream order events and the payment saga: one function per consumed
event or saga step. Each runs inside the caller's transaction and writes its outgoing events to
the outbox on the same connection, so a state change, its ledger transfers and its events commit
together. Users and wallets are in wallets.py, Huabei repayments in repayments.py; the ledger
accounts in accounts.py.
"""
from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg
import structlog

from services.gateway import domain, saga, store
from services.gateway.domain import OrderEventState as EventState, Route, SagaState
from shared import db, events, ledger, metrics, outbox, timers, topics, tracing
from shared.events import (ClawbackRequested, CreditRefused, CreditReserved, DrawdownCommitted, Envelope,
                           EscrowRefunded, EscrowRefundRejected, EscrowReleased, FundsHeld, HoldRefused, OrderPlaced,
                           RefundRejected, RefundRequested, RiskDecided)
from shared.ledger import InsufficientFunds
from shared.runtime import Context

SOURCE = "payment-gateway"
log = structlog.get_logger("gateway")


async def _publish(ctx: Context, conn: asyncpg.Connection, data, *, order_id: str, cause: str | None) -> None:
    """A public payments.events outcome."""
    await outbox.add(conn, topics.PAYMENTS, order_id, events.new_event(
        data, source=SOURCE, occurred_at=ctx.clock.now(), correlation_id=order_id, causation_id=cause))


# ---------------------------------------------------------------- upstream order events
async def order_event(ctx: Context, conn: asyncpg.Connection, env: Envelope, data) -> None:
    """Every accepted orders.events record is kept; where it goes depends on its payment."""
    now = ctx.clock.now()
    payload = data.model_dump(mode="json")
    if isinstance(data, OrderPlaced):
        await store.record_order_event(conn, env.event_id, data.order_id, env.type, payload, now, EventState.APPLIED)
        await order_placed(ctx, conn, env, data)
        return
    if isinstance(data, RefundRequested) and not await store.first_refund_request(conn, data.order_id, data.refund_id):
        # docs/contract.md §3: the same refund_id twice has effect once (and one outcome).
        await store.record_order_event(conn, env.event_id, data.order_id, env.type, payload, now, EventState.DUPLICATE)
        return
    payment = await store.lock_payment(conn, data.order_id)
    state = await _route(ctx, conn, env.type, payload, payment, cause=env.event_id)
    await store.record_order_event(conn, env.event_id, data.order_id, env.type, payload, now, state)
    if state is EventState.PARKED:
        log.info("order event parked until its order arrives", order_id=data.order_id, event_type=env.type)


ROUTE_STATES = {Route.FORWARD: EventState.FORWARDED, Route.KEEP: EventState.PENDING,
                Route.CANCEL_IN_FLIGHT: EventState.CANCEL_IN_FLIGHT, Route.PARK: EventState.PARKED,
                Route.REJECT_UNKNOWN_ORDER: EventState.REJECTED, Route.REJECT_NOT_PAID: EventState.REJECTED,
                Route.IGNORE: EventState.IGNORED}


async def _route(ctx: Context, conn: asyncpg.Connection, event_type: str, payload: dict, payment: dict | None, *,
                 cause: str) -> EventState:
    """Send an upstream event where its order's saga says (domain.route_order_event); returns the
    event's new state."""
    order_id = payload["order_id"]
    route = domain.route_order_event(event_type, SagaState(payment["saga_state"]) if payment else None)
    if route in (Route.FORWARD, Route.CANCEL_IN_FLIGHT):
        await _forward(ctx, conn, event_type, payload, cause=cause)
    if route is Route.CANCEL_IN_FLIGHT:  # the saga stops where it can (saga.CancelRequested)
        p, event = saga.Payment.from_row(payment), saga.CancelRequested()
        await apply(ctx, conn, p, saga.decide(p, event, ctx.clock.now(), ctx.deps.rules), event, cause=cause)
    if route in (Route.REJECT_UNKNOWN_ORDER, Route.REJECT_NOT_PAID):
        code = "UNKNOWN_ORDER" if route is Route.REJECT_UNKNOWN_ORDER else "NOT_PAID"
        await _publish(ctx, conn, RefundRejected(order_id=order_id, refund_id=payload.get("refund_id"),
                                                 reason_code=code), order_id=order_id, cause=cause)
    return ROUTE_STATES[route]


async def release_parked(ctx: Context, conn: asyncpg.Connection, order_ids: list[str]) -> None:
    """The order has arrived: its parked events go where its saga now says, oldest first."""
    await _route_released(ctx, conn, await store.take_events_many(conn, order_ids, EventState.PARKED, EventState.RELEASED))


async def _route_released(ctx: Context, conn: asyncpg.Connection, parked: dict[str, list[dict]]) -> None:
    for order_id, kept in parked.items():
        payment = await store.lock_payment(conn, order_id)
        for event in kept:
            state = await _route(ctx, conn, event["type"], event["data"], payment, cause=event["event_id"])
            await store.set_event_state(conn, event["event_id"], state)
            log.info("parked order event released", order_id=order_id, event_type=event["type"], state=state)


async def expire_parked(ctx: Context, limit: int = 100) -> int:
    """Parked events whose order has not come within PARKED_EVENT_TTL_SECONDS: logged, counted
    and marked expired (they change nothing)."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        before = ctx.clock.now() - timedelta(seconds=ctx.deps.rules.parked_event_ttl_seconds)
        expired = await store.expire_parked(conn, before, limit)
    for event in expired:
        metrics.PARKED_EXPIRED.labels(type=event["type"]).inc()
        log.warning("parked order event expired: its order never arrived", order_id=event["order_id"],
                    event_type=event["type"], event_id=event["event_id"], received_at=event["received_at"].isoformat())
    return len(expired)


async def parked_expiry_loop(ctx: Context) -> None:
    async def scan() -> bool:
        return await expire_parked(ctx) >= 100
    await timers.run(ctx, scan, name="parked events", interval=5.0)


async def _forward(ctx: Context, conn: asyncpg.Connection, event_type: str, data: dict, *, cause: str) -> None:
    command = saga.forward_command(event_type, data)
    await outbox.add(conn, topics.ESCROW_COMMANDS, command.order_id, events.new_event(
        command, source=SOURCE, occurred_at=ctx.clock.now(), correlation_id=command.order_id, causation_id=cause))


# ---------------------------------------------------------------- the payment saga
# The rules are services/gateway/saga.py (pure): each handler below loads the payment, asks
# saga.decide and applies the decision here, in one place.
async def apply(ctx: Context, conn: asyncpg.Connection, p: saga.Payment, decision: saga.Decision, event, *,
                cause: str | None) -> saga.Decision:
    """Apply what the core decided for payment `p` (in the caller's transaction, under the
    payment's row lock): ledger transfers first (a wallet that cannot pay refuses the first one
    and changes nothing; then the core decides `Short(event)` instead), bank calls, the new
    state, the outbox, and the kept upstream events. Returns the decision applied."""
    now = ctx.clock.now()
    try:
        await _apply_ledger(conn, p.order_id, decision.ledger, now)
    except InsufficientFunds:
        debit = next(t.debit for t in decision.ledger if isinstance(t, saga.Transfer))
        available = (await ledger.account(conn, debit)).available
        decision = saga.decide(p, saga.Short(event, available), now, ctx.deps.rules)
        await _apply_ledger(conn, p.order_id, decision.ledger, now)
    for call in decision.bank:
        await _bank(ctx, call)
    if decision.payment is not None:
        changed = saga.changes(p, decision.payment)
        if changed:
            await store.update_payment(conn, p.order_id, now, **changed)
    await _emit(ctx, conn, decision.emit, cause=cause, now=now)
    if decision.kept is not None:
        await _settle_kept(ctx, conn, p.order_id, decision.kept, cause=cause)
    return decision


async def _apply_ledger(conn: asyncpg.Connection, order_id: str, intents, now: datetime) -> None:
    for t in intents:
        if isinstance(t, saga.Resolve):
            await (ledger.post_pending if t.post else ledger.void_pending)(conn, t.id, t.pending_id, now)
        else:
            await ledger.transfer(conn, t.id, t.debit, t.credit, t.amount, code=t.code, order_id=order_id, now=now,
                                  pending=t.pending)


async def _bank(ctx: Context, call: saga.Bank) -> None:
    bank = ctx.deps.bank
    if call.op is saga.BankOp.CAPTURE:
        await bank.capture(call.request_id, call.amount)
    elif call.op is saga.BankOp.VOID:
        await bank.void(call.request_id)
    else:
        await bank.refund(call.request_id, call.charge_id, call.amount)


def _envelope(ctx: Context, e: saga.Emit, cause: str | None, now: datetime) -> dict:
    order_id = getattr(e.data, "order_id", None)
    return events.new_event(e.data, source=SOURCE, occurred_at=now, correlation_id=order_id, causation_id=cause)


async def _emit(ctx: Context, conn: asyncpg.Connection, emits, *, cause: str | None, now: datetime) -> None:
    if len(emits) == 1:
        await outbox.add(conn, emits[0].topic, emits[0].key, _envelope(ctx, emits[0], cause, now))
    elif emits:
        await outbox.add_many(conn, [(e.topic, e.key, _envelope(ctx, e, cause, now)) for e in emits])


async def _settle_kept(ctx: Context, conn: asyncpg.Connection, order_id: str, kept: saga.Kept, *,
                       cause: str | None) -> None:
    """Upstream events kept while the payment was in flight: forwarded once it succeeded, or
    answered (saga.kept_outcomes) once it failed."""
    if kept.failed_reason is None:
        for event in await store.take_events(conn, order_id, EventState.PENDING, EventState.FORWARDED):
            await _forward(ctx, conn, event["type"], event["data"], cause=event["event_id"])
        return
    cancels = await store.take_events(conn, order_id, EventState.CANCEL_IN_FLIGHT, EventState.REJECTED)
    pending = await store.take_events(conn, order_id, EventState.PENDING, EventState.REJECTED)
    for event, by in saga.kept_outcomes(kept.failed_reason, cancels, pending):
        await _publish(ctx, conn, RefundRejected(order_id=order_id, refund_id=event["data"].get("refund_id"),
                                                 reason_code="NOT_PAID"),
                       order_id=order_id, cause=cause if by == "payment" else event["event_id"])


async def _decide(ctx: Context, conn: asyncpg.Connection, order_id: str, event, *, cause: str | None) -> None:
    """The one-by-one path of a consumed saga event: lock, decide, apply."""
    row = await store.lock_payment(conn, order_id)
    if row is None:
        log.info("event for an unknown payment; ignored", order_id=order_id, event_type=type(event).__name__)
        return
    p = saga.Payment.from_row(row)
    await apply(ctx, conn, p, saga.decide(p, event, ctx.clock.now(), ctx.deps.rules), event, cause=cause)


async def order_placed(ctx: Context, conn: asyncpg.Connection, env: Envelope, order: OrderPlaced) -> None:
    now = ctx.clock.now()
    p = saga.Payment.new(order, env.event_id, now)
    # Tracing on: the order's context stays with the payment, for the steps the saga worker drives.
    traceparent = tracing.traceparent_for(env.event_id, order.order_id) if tracing.ENABLED else None
    if not await store.insert_payment(conn, env.event_id, order, p.payment_id, now, traceparent):
        await _emit(ctx, conn, saga.duplicate_order(order).emit, cause=env.event_id, now=now)
        return
    known = await store.registered_at(conn, order.buyer_id, order.seller_id)
    placed = saga.Placed(buyer_registered_at=known.get(order.buyer_id), seller_known=order.seller_id in known)
    await apply(ctx, conn, p, saga.decide(p, placed, now, ctx.deps.rules), placed, cause=env.event_id)
    await release_parked(ctx, conn, [order.order_id])


async def review_decided(ctx: Context, conn: asyncpg.Connection, order_id: str, approve: bool) -> bool:
    """An operator's decision on a payment held for review; False when it is not in review."""
    row = await store.lock_payment(conn, order_id)
    if row is None:
        return False
    p = saga.Payment.from_row(row)
    event = saga.ReviewDecided(approve)
    decision = saga.decide(p, event, ctx.clock.now(), ctx.deps.rules)
    if decision.changes_nothing:
        return False
    await apply(ctx, conn, p, decision, event, cause=None)
    return True


async def saga_step(ctx: Context, conn: asyncpg.Connection, row: dict) -> None:
    """The saga worker's look at one due payment; a card is authorized first when the core says so."""
    p = saga.Payment.from_row(row)
    card = None
    if saga.charges_card(p):
        card = await ctx.deps.bank.authorize(f"charge:{p.order_id}", p.card_token, p.amount)
    if p.state in (SagaState.RESERVING, SagaState.COMMITTING, SagaState.HOLDING):
        log.warning("no answer yet; re-sending the command", order_id=p.order_id, saga_state=p.state.value,
                    attempts=p.attempts)
    event = saga.Due(card)
    await apply(ctx, conn, p, saga.decide(p, event, ctx.clock.now(), ctx.deps.rules), event, cause=None)


# ---------------------------------------------------------------- the risk engine's, escrow's and credit's answers
SagaAnswer = (RiskDecided | FundsHeld | HoldRefused | EscrowReleased | EscrowRefunded | ClawbackRequested
              | CreditReserved | CreditRefused | DrawdownCommitted)


async def saga_answer(ctx: Context, conn: asyncpg.Connection, env: Envelope, e: SagaAnswer) -> None:
    """An event `saga.decide` takes as it comes, one by one: its payment locked, decided on, the
    decision applied."""
    await _decide(ctx, conn, e.order_id, e, cause=env.event_id)


async def escrow_refund_rejected(ctx: Context, conn: asyncpg.Connection, env: Envelope,
                                 e: EscrowRefundRejected) -> None:
    await _emit(ctx, conn, saga.refund_rejected(e).emit, cause=env.event_id, now=ctx.clock.now())


# ---------------------------------------------------------------- the hot path, as sets
# The consumer hands each run of OrderPlaced, RiskDecided or FundsHeld to these first. They ask
# the same core (saga.decide) for every record, and apply the usual decisions for hundreds of
# orders in a few statements; the records whose decisions are not the usual case (unknown
# users, a duplicate order id, a card payment, a short wallet, ...) go back to the one-by-one
# handlers above.
Batch = list[tuple[Envelope, object]]
_INSERTED = {"saga_state", "status", "next_action_at", "deadline_at"}  # what store.place_orders writes


async def orders_placed(ctx: Context, conn: asyncpg.Connection, items: Batch) -> Batch:
    """New orders of known users whose decision only sets the state and emits (the risk
    request, or with risk control off a credit reservation or a card charge to come)."""
    rules = ctx.deps.rules
    now = ctx.clock.now()
    known = await store.registered_at(conn, *{u for _, o in items for u in (o.buyer_id, o.seller_id)})
    fast = []
    for env, o in items:
        p = saga.Payment.new(o, env.event_id, now)
        d = saga.decide(p, saga.Placed(buyer_registered_at=known.get(o.buyer_id), seller_known=o.seller_id in known),
                        now, rules)
        if (d.payment is not None and not d.ledger and not d.bank and d.kept is None
                and saga.changes(p, d.payment).keys() <= _INSERTED):
            fast.append((env, o, d))
    if not fast:
        return items
    traceparents = [tracing.traceparent_for(env.event_id, o.order_id) for env, o, _ in fast] \
        if tracing.ENABLED else None  # each order's own context (shared/tracing.py set_run)
    # One statement: the events, the payments, the outbox rows of the orders inserted, and the
    # events parked for them (at light load a batch is one order: three round trips less).
    inserted, parked = await store.place_orders(
        conn, now, [(env.event_id, o.order_id, env.type, o.model_dump(mode="json")) for env, o, _ in fast],
        [d.payment for _, _, d in fast],
        [(o.order_id, (e.topic, e.key, _envelope(ctx, e, env.event_id, now))) for env, o, d in fast for e in d.emit],
        traceparents)
    await _route_released(ctx, conn, {o: parked[o] for o in sorted(parked)})
    return [(env, o) for env, o in items if o.order_id not in inserted]


async def _lock_and_decide(ctx: Context, conn: asyncpg.Connection, items: Batch) -> list:
    """Lock the payments of a run of answers (in order_id order) and decide each:
    (envelope, answer, payment, decision), for the answers of known payments."""
    rows = await store.lock_payments(conn, [e.order_id for _, e in items])
    now, rules = ctx.clock.now(), ctx.deps.rules
    decided = []
    for env, e in items:
        if e.order_id in rows:
            p = saga.Payment.from_row(rows[e.order_id])
            decided.append((env, e, p, saga.decide(p, e, now, rules)))
    return decided


async def _save_many(ctx: Context, conn: asyncpg.Connection, done: list, now: datetime) -> None:
    """State and outbox of many (envelope, answer, payment, decision), in one statement."""
    await store.update_payments(conn, now, [{"order_id": p.order_id, **saga.changes(p, d.payment)}
                                            for _, _, p, d in done],
                                emit=[(x.topic, x.key, _envelope(ctx, x, env.event_id, now))
                                      for env, _, _, d in done for x in d.emit])


def _rest(items: Batch, done: list) -> Batch:
    """The records of `items` not applied by a set path (late or repeated answers that change
    nothing are applied too: nothing to do)."""
    applied = {p.order_id for _, _, p, _ in done}
    return [(env, e) for env, e in items if e.order_id not in applied]


async def risk_decisions(ctx: Context, conn: asyncpg.Connection, items: Batch) -> Batch:
    """Approved wallet payments: reserve the money, ask escrow to hold it."""
    decided = await _lock_and_decide(ctx, conn, items)
    late = [x for x in decided if x[3].changes_nothing]  # late (the fallback decided) or repeated
    candidates = [x for x in decided if x[3].payment is not None and x[3].payment.state is SagaState.HOLDING
                  and not x[3].bank and x[3].kept is None and len(x[3].ledger) == 1
                  and isinstance(x[3].ledger[0], saga.Transfer)]
    if not candidates:
        return _rest(items, late)
    now = ctx.clock.now()
    # In order; an order its wallet can no longer pay is refused here and goes one by one (and fails).
    applied, refused = await ledger.transfer_many(conn, [
        ledger.NewTransfer(t.id, t.debit, t.credit, t.amount, code=t.code, order_id=p.order_id, pending=t.pending)
        for _, _, p, d in candidates for t in d.ledger], now, partial=True)
    if len(applied) + len(refused) != len(candidates):
        raise RuntimeError("a wallet payment was reserved before its risk decision")  # one by one sorts it out
    fast = [x for x in candidates if x[3].ledger[0].id in applied]
    await _save_many(ctx, conn, fast, now)
    return _rest(items, late + fast)


async def funds_held_many(ctx: Context, conn: asyncpg.Connection, items: Batch) -> Batch:
    """Payments escrow now holds whose settlement is posting a wallet reservation (or, for
    Huabei, nothing: the drawdown was committed before the hold): PaymentSucceeded, kept events
    forwarded."""
    decided = await _lock_and_decide(ctx, conn, items)
    late = [x for x in decided if x[3].changes_nothing]  # the answer to a re-sent hold, already applied
    fast = [x for x in decided if x[3].payment is not None and x[3].payment.state is SagaState.COMPLETED
            and not x[3].bank and all(isinstance(t, saga.Resolve) and t.post for t in x[3].ledger)]
    if not fast:
        return _rest(items, late)
    now = ctx.clock.now()
    resolutions = [(t.id, t.pending_id) for _, _, _, d in fast for t in d.ledger]
    posted = await ledger.resolve_many(conn, resolutions, post=True, now=now)
    if len(posted) != len(resolutions):
        raise RuntimeError("a wallet reservation was missing or resolved already")  # one by one sorts it out
    await _save_many(ctx, conn, fast, now)
    order_ids = [p.order_id for _, _, p, _ in fast]
    kept = await store.take_events_many(conn, order_ids, EventState.PENDING, EventState.FORWARDED)
    for order_id in order_ids:  # events that came before the payment completed: now they go on
        for event in kept.get(order_id, []):
            await _forward(ctx, conn, event["type"], event["data"], cause=event["event_id"])
    return _rest(items, late + fast)


# ---------------------------------------------------------------- the saga worker
async def saga_worker(ctx: Context, batch: int = 100) -> None:
    """Drives sagas whose next step is due (risk deadlines, card charges, channel deadlines,
    command re-sends). The due time is a column; SKIP LOCKED lets several gateways share."""
    async def scan() -> bool:
        return await run_due_sagas(ctx, batch) >= batch
    await timers.run(ctx, scan, name="saga worker", interval=0.2)


async def run_due_sagas(ctx: Context, batch: int) -> int:
    """Each due saga in a transaction of its own, so the worker never holds many payments while
    the consumer waits for them. The consumer locks wallets, then the payments of its next run;
    the worker a payment, then its wallet: the worker waits at most 100 ms and gives way."""
    async with ctx.pool.acquire() as conn:
        due = await store.due_saga_ids(conn, ctx.clock.now(), batch)
        for order_id in due:
            with structlog.contextvars.bound_contextvars(correlation_id=order_id):
                async with conn.transaction():
                    await conn.execute("SET LOCAL lock_timeout = '100ms'")
                    payment = await store.lock_due_saga(conn, order_id, ctx.clock.now())
                    if payment is None:  # another gateway has it, or the consumer moved it on
                        continue
                    # Tracing on: the step resumes the order's trace (kept on the payment), so the
                    # events it emits (a card charged, a command re-sent, a timeout) stay in it.
                    if not tracing.ENABLED:
                        await _step_or_retry(ctx, conn, payment)
                        continue
                    with _resumed(payment) as trace_ids, structlog.contextvars.bound_contextvars(**trace_ids):
                        await _step_or_retry(ctx, conn, payment)
    return len(due)


def _resumed(payment: dict):
    return tracing.resuming(payment.get("traceparent"), "saga step", {
        "danbao.correlation_id": payment["order_id"], "danbao.saga_state": payment["saga_state"],
        "danbao.attempts": payment["attempts"]})


async def _step_or_retry(ctx: Context, conn: asyncpg.Connection, payment: dict) -> None:
    """One due step in a savepoint; a step that fails is retried later (connection errors end the scan)."""
    order_id = payment["order_id"]
    try:
        async with conn.transaction():  # savepoint: a failed step leaves no trace
            await saga_step(ctx, conn, payment)
    except asyncpg.exceptions.LockNotAvailableError:
        log.info("saga step waits for a lock the consumer holds; retrying in a second")
        await store.update_payment(conn, order_id, ctx.clock.now(),
                                   next_action_at=ctx.clock.now() + timedelta(seconds=1))
    except Exception as exc:
        if db.connection_lost(exc):
            raise
        if tracing.ENABLED:
            tracing.failed(exc)
        log.exception("saga step failed; retrying later")
        await store.update_payment(conn, order_id, ctx.clock.now(),
                                   next_action_at=ctx.clock.now() + timedelta(seconds=5))
