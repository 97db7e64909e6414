"""The loop every durable timer runs in. Due times are columns in the service's schema (so a
restart loses nothing and, with SKIP LOCKED or row locks, nothing fires twice); this loop only
decides when to look: at once while a scan says more is due, otherwise after `interval` seconds
or as soon as the test clock is moved at this service."""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import structlog

log = structlog.get_logger("timers")


async def run(ctx, scan: Callable[[], Awaitable[bool]], *, name: str, interval: float = 1.0) -> None:
    """Call `scan` forever; it returns True when more may be due right now."""
    while True:
        ctx.clock_moved.clear()  # before the scan: a move during it triggers the next one
        try:
            if await scan():
                continue
        except Exception:  # never let a timer die (CancelledError is not an Exception)
            log.exception("timer scan failed; retrying", timer=name)
        try:
            await asyncio.wait_for(ctx.clock_moved.wait(), timeout=interval)
        except asyncio.TimeoutError:
            pass
