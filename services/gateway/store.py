"""asyncpg queries for the gateway's schema."""
from __future__ import annotations

from datetime import datetime

import asyncpg

from shared.events import OrderPlaced


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


async def insert_payment(conn: asyncpg.Connection, event_id: str, order: OrderPlaced, status: str,
                         now: datetime) -> bool:
    """False when a payment for this order_id already exists."""
    return bool(await conn.fetchval(
        """INSERT INTO payments (order_id, placed_event_id, buyer_id, seller_id, amount, currency, payment_method,
                                 card_token, installments, auto_confirm_days, status, accepted_at, updated_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12)
           ON CONFLICT (order_id) DO NOTHING RETURNING true""",
        order.order_id, event_id, order.buyer_id, order.seller_id, order.amount, order.currency,
        order.payment_method, order.card_token, order.installments, order.auto_confirm_days, status, now))


async def get_payment(conn: asyncpg.Connection | asyncpg.Pool, order_id: str) -> dict | None:
    row = await conn.fetchrow("SELECT * FROM payments WHERE order_id = $1", order_id)
    return dict(row) if row else None


async def record_order_event(conn: asyncpg.Connection, event_id: str, order_id: str, type_: str, data: dict,
                             now: datetime) -> None:
    await conn.execute(
        """INSERT INTO order_events (event_id, order_id, type, data, received_at) VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT DO NOTHING""", event_id, order_id, type_, data, now)
