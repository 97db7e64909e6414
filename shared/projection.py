"""Read-your-writes across services: a service's copy of another's data (a projection, fed by
Kafka) lags its source by a moment. An endpoint that depends on one waits briefly for the record
a user has just created elsewhere instead of calling it unknown."""
from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

# Long enough for a healthy pipeline (tens of milliseconds) with a margin; short enough for
# an HTTP request. A record still missing after it is then really unknown.
WAIT_SECONDS = 5.0
POLL_SECONDS = 0.025


async def wait_for(lookup: Callable[[], Awaitable[Any]], timeout: float = WAIT_SECONDS) -> Any:
    """`lookup()` once it returns something, polling for up to `timeout` seconds; None after."""
    deadline = time.monotonic() + timeout
    while True:
        found = await lookup()
        if found is not None or time.monotonic() >= deadline:
            return found
        await asyncio.sleep(POLL_SECONDS)
