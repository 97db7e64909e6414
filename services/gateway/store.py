"""asyncpg queries for the gateway's schema."""
from __future__ import annotations

from datetime import datetime

import asyncpg

from shared.events import OrderPlaced


# ---------------------------------------------------------------- users
async def insert_user(conn: asyncpg.Connection, user: dict, registered_at: datetime) -> bool:
    """False when the user_id is taken (the caller compares bodies)."""
    return bool(await conn.fetchval(
        """INSERT INTO users (user_id, full_name, birth_date, phone, id_number, real_name_verified, registered_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (user_id) DO NOTHING RETURNING true""",
        user["user_id"], user["full_name"], user["birth_date"], user["phone"], user["id_number"],
        user["real_name_verified"], registered_at))


async def get_user(conn: asyncpg.Connection | asyncpg.Pool, user_id: str) -> dict | None:
    row = await conn.fetchrow("SELECT * FROM users WHERE user_id = $1", user_id)
    return dict(row) if row else None


async def registered_at(conn: asyncpg.Connection, *user_ids: str) -> dict[str, datetime]:
    """When each of these users registered (unknown users are absent)."""
    rows = await conn.fetch("SELECT user_id, registered_at FROM users WHERE user_id = ANY($1::text[])", list(user_ids))
    return {r["user_id"]: r["registered_at"] for r in rows}


# ---------------------------------------------------------------- payments
async def insert_payment(conn: asyncpg.Connection, event_id: str, order: OrderPlaced, payment_id: str,
                         now: datetime) -> bool:
    """False when a payment for this order_id already exists."""
    return bool(await conn.fetchval(
        """INSERT INTO payments (order_id, placed_event_id, payment_id, buyer_id, seller_id, amount, currency,
                                 payment_method, card_token, installments, auto_confirm_days, status, saga_state,
                                 accepted_at, updated_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'PENDING', 'NEW', $12, $12)
           ON CONFLICT (order_id) DO NOTHING RETURNING true""",
        order.order_id, event_id, payment_id, order.buyer_id, order.seller_id, order.amount, order.currency,
        order.payment_method, order.card_token, order.installments, order.auto_confirm_days, now))


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


async def due_sagas(conn: asyncpg.Connection, now: datetime, limit: int) -> list[dict]:
    rows = await conn.fetch(
        """SELECT * FROM payments WHERE saga_state IN ('RISK_CHECK', 'REVIEW', 'RESERVING', 'FUNDING', 'HOLDING') AND next_action_at <= $1
           ORDER BY next_action_at LIMIT $2 FOR UPDATE SKIP LOCKED""", now, limit)
    return [dict(r) for r in rows]


# ---------------------------------------------------------------- upstream order events
async def record_order_event(conn: asyncpg.Connection, event_id: str, order_id: str, type_: str, data: dict,
                             now: datetime, state: str) -> None:
    await conn.execute(
        """INSERT INTO order_events (event_id, order_id, type, data, received_at, state) VALUES ($1, $2, $3, $4, $5, $6)
           ON CONFLICT DO NOTHING""", event_id, order_id, type_, data, now, state)


async def take_events(conn: asyncpg.Connection, order_id: str, state: str, new_state: str) -> list[dict]:
    """Events of an order in `state`, oldest first, moved to `new_state`."""
    rows = await conn.fetch(
        """UPDATE order_events SET state = $3 WHERE order_id = $1 AND state = $2
           RETURNING event_id, type, data, seq""", order_id, state, new_state)
    return sorted((dict(r) for r in rows), key=lambda r: r["seq"])


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


async def lock_wallet(conn: asyncpg.Connection, user_id: str) -> None:
    """Serialise one wallet's withdrawals (the fee depends on what was withdrawn before)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('wallet:' || $1))", user_id)


# ---------------------------------------------------------------- repayments
async def insert_repayment(conn: asyncpg.Connection, repayment_id: str, user_id: str, amount: int, source: str,
                           now: datetime) -> None:
    await conn.execute(
        """INSERT INTO repayments (repayment_id, user_id, amount, source, state, created_at, updated_at)
           VALUES ($1, $2, $3, $4, 'requested', $5, $5)""", repayment_id, user_id, amount, source, now)


async def get_repayment(conn: asyncpg.Connection | asyncpg.Pool, repayment_id: str, *, lock: bool = False) -> dict | None:
    row = await conn.fetchrow(f"SELECT * FROM repayments WHERE repayment_id = $1{' FOR UPDATE' if lock else ''}",
                              repayment_id)
    return dict(row) if row else None


async def allocate_repayment(conn: asyncpg.Connection, repayment_id: str, allocation: dict, now: datetime) -> None:
    await conn.execute("UPDATE repayments SET state = 'allocated', allocation = $2, updated_at = $3 WHERE repayment_id = $1",
                       repayment_id, allocation, now)
