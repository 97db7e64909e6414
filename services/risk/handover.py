"""A cheaper hand-over of each fetched record to the agents (a patch of faust's consumer).

faust hands every record over with
`await self.wait_first(callback(message), self.suspend_flow.wait())`
(faust/transport/consumer.py, `Consumer._drain_messages`): mode's `wait_first` wraps the
callback, the suspend event and the service's stopped and crashed events in four tasks, waits
for the first to finish and cancels the other three, for every record. py-spy put that at ~14 %
of the engine's samples. The callback nearly always finishes without waiting: it decodes the
record and puts it in an agent's queue that has room.

So the callback is first run by hand up to its first wait. If it finishes there (the usual
case), that is all: no task, nothing to cancel. If it has to wait (a full queue, flow control,
the producer's buffer), the rest of it goes through mode's `wait_first` as before, so that a
suspended flow or a stopping service still interrupts it. A flow already suspended, or any
other use of `wait_first`, takes the original path.
"""
from __future__ import annotations

import asyncio
import inspect
from typing import Any

from faust.transport.consumer import Consumer
from mode.services import Service, WaitResults

_wait_first = Consumer.wait_first


async def _finish(coro, waiting_for: Any) -> Any:
    """Run to its end a coroutine that was started by hand and now waits for `waiting_for`
    (what it yielded: a future, or None for a bare yield), as its task would have."""
    try:
        while True:
            if waiting_for is None:
                await asyncio.sleep(0)
            else:
                await asyncio.wait([waiting_for])  # done, whatever the outcome: the coroutine reads it
            try:
                waiting_for = coro.send(None)
            except StopIteration as done:
                return done.value
    except BaseException:  # cancelled (the flow was suspended, the service stops) or it raised
        coro.close()
        raise


async def wait_first(self: Consumer, *coros: Any, timeout: Any = None) -> WaitResults:
    if (timeout is not None or len(coros) != 2 or not inspect.iscoroutine(coros[0])
            or self.suspend_flow.is_set() or self._stopped.is_set() or self._crashed.is_set()):
        return await _wait_first(self, *coros, timeout=timeout)
    work, suspended = coros
    try:
        waiting_for = work.send(None)
    except StopIteration as done:
        if inspect.iscoroutine(suspended):
            suspended.close()  # never awaited: nothing to cancel
        return WaitResults([work], [done.value], False)
    except BaseException:
        if inspect.iscoroutine(suspended):
            suspended.close()
        raise
    return await _wait_first(self, _finish(work, waiting_for), suspended)


def install() -> bool:
    """Patch faust's consumer; False (nothing patched) if faust or mode no longer have the
    `wait_first` this was written against (a faust upgrade then keeps its own hand-over)."""
    if Consumer.wait_first is not Service.wait_first or _wait_first is not Service.wait_first:
        return Consumer.wait_first is wait_first  # already installed, or not ours to change
    Consumer.wait_first = wait_first
    return True
