"""The platform's clock. Nothing reads the wall clock directly (docs/design.md, Time).

`SystemClock` is the real time. `ControllableClock` is docs/contract.md §6's test clock: real time
plus one offset shared by every service. The offset lives in Postgres (schema `danbao_clock`) so
that moving the clock at one service moves it for all; each service caches it and refreshes it
every half second, and timer loops pick up whatever fell due at their next tick.
"""
from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import asyncpg


class ClockMovedBack(Exception):
    pass


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class SystemClock:
    controllable = False

    def now(self) -> datetime:
        return utcnow()

    async def start(self, pool: asyncpg.Pool) -> None:
        return None

    async def stop(self) -> None:
        return None


_SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS danbao_clock;
CREATE TABLE IF NOT EXISTS danbao_clock.test_clock (
    id smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    offset_us bigint NOT NULL DEFAULT 0
);
INSERT INTO danbao_clock.test_clock (id, offset_us) VALUES (1, 0) ON CONFLICT DO NOTHING;
"""


class ControllableClock:
    controllable = True

    def __init__(self, refresh_seconds: float = 0.5):
        self._offset = timedelta(0)
        self._pool: asyncpg.Pool | None = None
        self._task: asyncio.Task | None = None
        self._refresh_seconds = refresh_seconds

    def now(self) -> datetime:
        return utcnow() + self._offset

    async def start(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('danbao_clock'))")
            await conn.execute(_SCHEMA_SQL)
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_loop(), name="clock-refresh")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def refresh(self) -> datetime:
        assert self._pool is not None
        offset_us = await self._pool.fetchval("SELECT offset_us FROM danbao_clock.test_clock WHERE id = 1")
        self._offset = timedelta(microseconds=offset_us)
        return self.now()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_seconds)
            try:
                await self.refresh()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pass  # keep the last known offset; the next tick retries

    async def advance(self, seconds: float) -> datetime:
        if seconds < 0:
            raise ClockMovedBack("the test clock never moves back")
        return await self._move(lambda offset_us, real_now: offset_us + round(seconds * 1_000_000))

    async def set(self, target: datetime) -> datetime:
        def new_offset(offset_us: int, real_now: datetime) -> int:
            if target < real_now + timedelta(microseconds=offset_us):
                raise ClockMovedBack(f"{target.isoformat()} is before the clock's current time")
            return (target - real_now) // timedelta(microseconds=1)
        return await self._move(new_offset)

    async def _move(self, new_offset) -> datetime:
        assert self._pool is not None
        async with self._pool.acquire() as conn, conn.transaction():
            current = await conn.fetchval("SELECT offset_us FROM danbao_clock.test_clock WHERE id = 1 FOR UPDATE")
            offset_us = new_offset(current, utcnow())
            await conn.execute("UPDATE danbao_clock.test_clock SET offset_us = $1 WHERE id = 1", offset_us)
        self._offset = timedelta(microseconds=offset_us)
        return self.now()


def make_clock(mode: str) -> SystemClock | ControllableClock:
    return ControllableClock() if mode == "controllable" else SystemClock()
