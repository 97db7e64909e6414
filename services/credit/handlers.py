"""Credit effects: one function per consumed event, inside the consumer's transaction."""
from __future__ import annotations

import asyncpg

from services.credit import domain, store
from shared.events import Envelope, UserRegistered
from shared.runtime import Context


async def user_registered(ctx: Context, conn: asyncpg.Connection, env: Envelope, event: UserRegistered) -> None:
    await store.upsert_profile(conn, domain.profile_from(event), ctx.clock.now())
