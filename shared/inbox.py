"""Inbox: the consumer side of exactly-once effects. Call inside the effect's transaction."""
from __future__ import annotations

import asyncpg


async def first_delivery(conn: asyncpg.Connection, message_key: str, topic: str) -> bool:
    """Record `message_key` (an event_id, or a record position for dead letters); False when it
    was already recorded, i.e. this delivery is a duplicate and must change nothing."""
    inserted = await conn.fetchval(
        "INSERT INTO inbox (message_key, topic) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING true",
        message_key, topic)
    return bool(inserted)


async def first_deliveries(conn: asyncpg.Connection, message_keys: list[str], topics: list[str]) -> set[str]:
    """`first_delivery` for many (key, topic) pairs in one statement: the keys recorded now (the
    others were recorded before). A key given twice is returned once."""
    rows = await conn.fetch(
        """INSERT INTO inbox (message_key, topic) SELECT k, t FROM unnest($1::text[], $2::text[]) AS u(k, t)
           ON CONFLICT DO NOTHING RETURNING message_key""", message_keys, topics)
    return {r["message_key"] for r in rows}
