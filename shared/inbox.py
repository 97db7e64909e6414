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


async def first_deliveries(conn: asyncpg.Connection, message_keys: list[str], topic: str) -> set[str]:
    """`first_delivery` for many keys in one statement: the keys recorded now (the others were
    recorded before). A key given twice is returned once."""
    rows = await conn.fetch(
        """INSERT INTO inbox (message_key, topic) SELECT k, $2 FROM unnest($1::text[]) AS k
           ON CONFLICT DO NOTHING RETURNING message_key""", message_keys, topic)
    return {r["message_key"] for r in rows}
