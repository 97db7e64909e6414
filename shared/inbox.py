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
