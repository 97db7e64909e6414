"""asyncpg queries for the credit service's schema."""
from __future__ import annotations

from datetime import datetime

import asyncpg


async def upsert_profile(conn: asyncpg.Connection, profile: dict, now: datetime) -> None:
    await conn.execute(
        """INSERT INTO profiles (user_id, birth_date, phone, id_number, real_name_verified, registered_at, updated_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7)
           ON CONFLICT (user_id) DO UPDATE SET birth_date = EXCLUDED.birth_date, phone = EXCLUDED.phone,
               id_number = EXCLUDED.id_number, real_name_verified = EXCLUDED.real_name_verified,
               updated_at = EXCLUDED.updated_at""",
        profile["user_id"], profile["birth_date"], profile["phone"], profile["id_number"],
        profile["real_name_verified"], profile["registered_at"], now)


async def get_profile(conn: asyncpg.Connection | asyncpg.Pool, user_id: str) -> dict | None:
    row = await conn.fetchrow("SELECT * FROM profiles WHERE user_id = $1", user_id)
    return dict(row) if row else None
