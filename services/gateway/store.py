"""asyncpg queries for the gateway's schema."""
from __future__ import annotations

from datetime import datetime
from enum import StrEnum

import asyncpg

from services.gateway.domain import TIMED_STATES, OrderEventState, PaymentStatus, RepaymentState, SagaState
from shared import db, outbox
from shared.events import OrderPlaced


def _literals(*values: StrEnum) -> str:
    """Closed-set values written into the SQL text, where a bound parameter would not do (the
    planner matches a partial index's predicate only against literals); each table's CHECK
    refuses a value its enum does not have."""
    return ", ".join(f"'{v.value}'" for v in values)


# ---------------------------------------------------------------- users
async def insert_user(conn: asyncpg.Connection, user: dict, registered_at: datetime) -> bool:
    """False when the user_id is taken (the caller compares bodies)."""
    return bool(await conn.fetchval(
        """INSERT INTO users (user_id, full_name, birth_date, phone_hash, phone_masked, id_number_hash,
                             id_number_masked, real_name_verified, registered_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (user_id) DO NOTHING RETURNING true""",
        user["user_id"], user["full_name"], user["birth_date"], user["phone_hash"], user["phone_masked"],
        user["id_number_hash"], user["id_number_masked"], user["real_name_verified"], registered_at))


async def get_user(conn: asyncpg.Connection | asyncpg.Pool, user_id: str) -> dict | None:
    row = await conn.fetchrow("SELECT * FROM users WHERE user_id = $1", user_id)
    return dict(row) if row else None


async def registered_at(conn: asyncpg.Connection, *user_ids: str) -> dict[str, datetime]:
    """When each of these users registered (unknown users are absent)."""
    rows = await conn.fetch("SELECT user_id, registered_at FROM users WHERE user_id = ANY($1::text[])", list(user_ids))
    return {r["user_id"]: r["registered_at"] for r in rows}


# ---------------------------------------------------------------- payments
async def insert_payment(conn: asyncpg.Connection, event_id: str, order: OrderPlaced, payment_id: str,
                         now: datetime, traceparent: str | None = None) -> bool:
    """False when a payment for this order_id already exists. `traceparent`: the order's trace
    context, kept for the saga worker (tracing on only)."""
    return bool(await conn.fetchval(
        """INSERT INTO payments (order_id, placed_event_id, payment_id, buyer_id, seller_id, amount, currency,
                                 payment_method, card_token, installments, auto_confirm_days, status, saga_state,
                                 accepted_at, updated_at, traceparent)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $14, $15, $12, $12, $13)
           ON CONFLICT (order_id) DO NOTHING RETURNING true""",
        order.order_id, event_id, payment_id, order.buyer_id, order.seller_id, order.amount, order.currency,
        order.payment_method, order.card_token, order.installments, order.auto_confirm_days, now, traceparent,
        PaymentStatus.PENDING.value, SagaState.NEW.value))


async def get_payment(conn: asyncpg.Connection | asyncpg.Pool, order_id: str) -> dict | None:
    row = await conn.fetchrow("SELECT * FROM payments WHERE order_id = $1", order_id)
    return dict(row) if row else None


async def lock_payment(conn: asyncpg.Connection, order_id: str) -> dict | None:
    """The payment row, locked for this transaction: one order's changes are serialised."""
    row = await conn.fetchrow("SELECT * FROM payments WHERE order_id = $1 FOR UPDATE", order_id)
    return dict(row) if row else None


async def update_payment(conn: asyncpg.Connection, order_id: str, now: datetime, **changes) -> None:
    columns = list(changes)
    assignments = ", ".join(f"{c} = ${i + 3}" for i, c in enumerate(columns))
    await conn.execute(f"UPDATE payments SET updated_at = $2, {assignments} WHERE order_id = $1",
                       order_id, now, *[changes[c] for c in columns])


async def lock_payments(conn: asyncpg.Connection, order_ids: list[str]) -> dict[str, dict]:
    """`lock_payment` for many orders, locked in order_id order (no deadlock between batches)."""
    rows = await conn.fetch("SELECT * FROM payments WHERE order_id = ANY($1::text[]) ORDER BY order_id FOR UPDATE",
                            sorted(set(order_ids)))
    return {r["order_id"]: dict(r) for r in rows}


def _payment_rows(payments: list, now: datetime, traceparents: list[str | None] | None) -> list[dict]:
    """New payments (services.gateway.saga.Payment) as rows, straight in the state the saga decided
    for them (its state, status and timers); `traceparents` (tracing on only): each payment's
    trace context, in the same order."""
    if traceparents is not None and len(traceparents) != len(payments):
        raise ValueError("one traceparent per payment")
    return [{"order_id": p.order_id, "placed_event_id": p.placed_event_id, "payment_id": p.payment_id,
             "buyer_id": p.buyer_id, "seller_id": p.seller_id, "amount": p.amount, "currency": p.currency,
             "payment_method": p.payment_method, "card_token": p.card_token, "installments": p.installments,
             "auto_confirm_days": p.auto_confirm_days, "status": p.status.value, "saga_state": p.state.value,
             "accepted_at": p.accepted_at, "updated_at": now, "next_action_at": p.next_action_at,
             "deadline_at": p.deadline_at, "traceparent": traceparents[i] if traceparents else None}
            for i, p in enumerate(payments)]


async def place_orders(conn: asyncpg.Connection, now: datetime, placed: list[tuple[str, str, str, dict]],
                       payments: list, emit: list[tuple[str, outbox.Row]],
                       traceparents: list[str | None] | None = None) -> tuple[set[str], dict[str, list[dict]]]:
    """New orders in one statement (a saga's first step at light load is one record): record
    their `OrderPlaced` events (event_id, order_id, type, data) as applied, insert their payments
    (those whose order_id has none yet), write the outbox rows of the orders inserted (`emit`: (order_id, row)),
    and take the events parked for those orders (released). Returns the order ids inserted and
    their parked events, oldest first (as `take_events_many`)."""
    rows = _payment_rows(payments, now, traceparents)
    columns = ", ".join(rows[0])
    e = outbox.emitting([row for _, row in emit], 6, guard=("SELECT order_id FROM inserted", [o for o, _ in emit]))
    tail = "" if e.collecting else f" UNION ALL SELECT 'notify', NULL, NULL, NULL, NULL, NULL, NULL FROM ({outbox.NOTIFY_EMITTED}) AS n"
    result = await conn.fetch(
        f"""WITH recorded AS (INSERT INTO order_events (event_id, order_id, type, data, received_at, state)
                              SELECT e, o, t, d::jsonb, $1, {_literals(OrderEventState.APPLIED)}
                              FROM unnest($2::text[], $3::text[], $4::text[], $5::text[]) WITH ORDINALITY AS u(e, o, t, d, n)
                              ORDER BY n ON CONFLICT DO NOTHING),
                 inserted AS (INSERT INTO payments ({columns})
                              SELECT {columns} FROM jsonb_populate_recordset(NULL::payments, ${6 + len(e.args)}::text::jsonb)
                              ON CONFLICT (order_id) DO NOTHING RETURNING order_id),
                 parked AS (UPDATE order_events SET state = {_literals(OrderEventState.RELEASED)}
                            WHERE order_id IN (SELECT order_id FROM inserted) AND state = {_PARKED}
                            RETURNING order_id, event_id, type, data, seq),
                 {e.cte}
            SELECT 'inserted' AS kind, order_id, NULL::bigint AS id, NULL AS event_id, NULL AS type, NULL::jsonb AS data,
                   NULL::bigint AS seq FROM inserted
            UNION ALL SELECT 'emitted', NULL, id, NULL, NULL, NULL, NULL FROM emitted
            UNION ALL SELECT 'parked', order_id, NULL, event_id, type, data, seq FROM parked{tail}""",
        now, [r[0] for r in placed], [r[1] for r in placed], [r[2] for r in placed],
        [db.json_text(r[3]) for r in placed], *e.args, db.json_rows(rows))
    inserted = {r["order_id"] for r in result if r["kind"] == "inserted"}
    e.written([r["id"] for r in result if r["kind"] == "emitted"], [i for i, (o, _) in enumerate(emit) if o in inserted])
    taken: dict[str, list[dict]] = {}
    for r in sorted((r for r in result if r["kind"] == "parked"), key=lambda r: r["seq"]):
        taken.setdefault(r["order_id"], []).append({k: r[k] for k in ("order_id", "event_id", "type", "data", "seq")})
    return inserted, taken


async def update_payments(conn: asyncpg.Connection, now: datetime, changes: list[dict],
                          emit: list[outbox.Row] = ()) -> None:
    """`update_payment` for many orders: every dict has `order_id` and the columns to set; one
    statement per set of columns (usually one). `emit`: outbox rows written in the first of
    those statements (a round trip less per batch)."""
    groups: dict[tuple[str, ...], list[dict]] = {}
    for c in changes:
        groups.setdefault(tuple(k for k in c if k != "order_id"), []).append(c)
    for columns, rows in groups.items():
        if not columns:
            continue
        assignments = ", ".join(f"{c} = r.{c}" for c in columns)
        # `p.order_id = ANY($3)`: the planner takes the function for 100 rows and, with the key list
        # alone, would hash-join it against a scan of every payment.
        update = f"""UPDATE payments p SET updated_at = $2, {assignments}
                     FROM jsonb_populate_recordset(NULL::payments, $1::text::jsonb) AS r
                     WHERE p.order_id = r.order_id AND p.order_id = ANY($3::text[])"""
        keys = [r["order_id"] for r in rows]
        if not emit:
            await conn.execute(update, db.json_rows(rows), now, keys)
            continue
        await outbox.write_with(conn, f"updated AS ({update})", [db.json_rows(rows), now, keys], list(emit))
        emit = ()
    await outbox.add_many(conn, list(emit))  # no column changed anywhere: the rows alone


_DUE = f"saga_state IN ({_literals(*TIMED_STATES)}) AND next_action_at <= $1"  # the index payments_saga_due


async def due_saga_ids(conn: asyncpg.Connection, now: datetime, limit: int) -> list[str]:
    """Orders whose saga step is due, oldest first (not locked: see lock_due_saga)."""
    rows = await conn.fetch(f"SELECT order_id FROM payments WHERE {_DUE} ORDER BY next_action_at LIMIT $2", now, limit)
    return [r["order_id"] for r in rows]


async def lock_due_saga(conn: asyncpg.Connection, order_id: str, now: datetime) -> dict | None:
    """The payment, locked, if its step is still due and nobody else holds it (SKIP LOCKED lets
    several gateways share the work)."""
    row = await conn.fetchrow(f"SELECT * FROM payments WHERE {_DUE} AND order_id = $2 FOR UPDATE SKIP LOCKED",
                              now, order_id)
    return dict(row) if row else None


# ---------------------------------------------------------------- upstream order events
async def record_order_event(conn: asyncpg.Connection, event_id: str, order_id: str, type_: str, data: dict,
                             now: datetime, state: str) -> None:
    await conn.execute(
        """INSERT INTO order_events (event_id, order_id, type, data, received_at, state) VALUES ($1, $2, $3, $4, $5, $6)
           ON CONFLICT DO NOTHING""", event_id, order_id, type_, data, now, state)


async def take_events_many(conn: asyncpg.Connection, order_ids: list[str], state: str,
                           new_state: str) -> dict[str, list[dict]]:
    """`take_events` for many orders: order_id -> its events, oldest first."""
    rows = await conn.fetch(
        """UPDATE order_events SET state = $3 WHERE order_id = ANY($1::text[]) AND state = $2
           RETURNING order_id, event_id, type, data, seq""", order_ids, state, new_state)
    taken: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["seq"]):
        taken.setdefault(r["order_id"], []).append(dict(r))
    return taken


async def take_events(conn: asyncpg.Connection, order_id: str, state: str, new_state: str) -> list[dict]:
    """Events of an order in `state`, oldest first, moved to `new_state`."""
    rows = await conn.fetch(
        """UPDATE order_events SET state = $3 WHERE order_id = $1 AND state = $2
           RETURNING event_id, type, data, seq""", order_id, state, new_state)
    return sorted((dict(r) for r in rows), key=lambda r: r["seq"])


async def set_event_state(conn: asyncpg.Connection, event_id: str, state: str) -> None:
    await conn.execute("UPDATE order_events SET state = $2 WHERE event_id = $1", event_id, state)


_PARKED = _literals(OrderEventState.PARKED)  # the index order_events_parked


async def expire_parked(conn: asyncpg.Connection, received_before: datetime, limit: int) -> list[dict]:
    """Parked events received before `received_before`, marked expired (oldest first)."""
    rows = await conn.fetch(
        f"""UPDATE order_events SET state = {_literals(OrderEventState.EXPIRED)} WHERE event_id IN (
               SELECT event_id FROM order_events WHERE state = {_PARKED} AND received_at < $1
               ORDER BY received_at LIMIT $2 FOR UPDATE SKIP LOCKED)
           RETURNING event_id, order_id, type, received_at""", received_before, limit)
    return sorted((dict(r) for r in rows), key=lambda r: r["received_at"])


async def parked_events(conn: asyncpg.Connection | asyncpg.Pool, limit: int = 1000) -> list[dict]:
    rows = await conn.fetch(
        f"""SELECT event_id, order_id, type, data, received_at FROM order_events WHERE state = {_PARKED}
           ORDER BY received_at LIMIT $1""", limit)
    return [dict(r) for r in rows]


async def first_refund_request(conn: asyncpg.Connection, order_id: str, refund_id: str) -> bool:
    return bool(await conn.fetchval(
        "INSERT INTO refund_requests (order_id, refund_id) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING true",
        order_id, refund_id))


# ---------------------------------------------------------------- withdrawals
async def lifetime_withdrawn(conn: asyncpg.Connection, user_id: str) -> int:
    return await conn.fetchval("SELECT coalesce(sum(amount), 0)::bigint FROM withdrawals WHERE user_id = $1", user_id)


async def insert_withdrawal(conn: asyncpg.Connection, user_id: str, key: str, amount: int, fee: int,
                            now: datetime) -> None:
    await conn.execute(
        "INSERT INTO withdrawals (user_id, idempotency_key, amount, fee, created_at) VALUES ($1, $2, $3, $4, $5)",
        user_id, key, amount, fee, now)


async def lock_wallet(conn: asyncpg.Connection, account: str) -> None:
    """Serialise one wallet's withdrawals (the fee depends on what was withdrawn before); the lock
    is keyed by the wallet's account name (accounts.wallet)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", account)


# ---------------------------------------------------------------- repayments
async def insert_repayment(conn: asyncpg.Connection, repayment_id: str, user_id: str, amount: int, source: str,
                           now: datetime) -> None:
    await conn.execute(
        """INSERT INTO repayments (repayment_id, user_id, amount, source, state, created_at, updated_at)
           VALUES ($1, $2, $3, $4, $6, $5, $5)""", repayment_id, user_id, amount, source, now,
        RepaymentState.REQUESTED.value)


async def get_repayment(conn: asyncpg.Connection | asyncpg.Pool, repayment_id: str, *, lock: bool = False) -> dict | None:
    row = await conn.fetchrow(f"SELECT * FROM repayments WHERE repayment_id = $1{' FOR UPDATE' if lock else ''}",
                              repayment_id)
    return dict(row) if row else None


async def allocate_repayment(conn: asyncpg.Connection, repayment_id: str, allocation: dict, now: datetime) -> None:
    await conn.execute("UPDATE repayments SET state = $4, allocation = $2, updated_at = $3 WHERE repayment_id = $1",
                       repayment_id, allocation, now, RepaymentState.ALLOCATED.value)
