"""A cheaper hand-over of each fetched record to the agents (a patch of faust's consumer).

faust hands every record over with
`await self.wait_first(callback(message), self.suspend_flow.wait())`
(faust/transport/consumer.py, `Consumer._drain_messages`): mode's `wait_first` wraps the
callback, the suspend event and the service's stopped and crashed events in four tasks, waits
for the first to finish and cancels the other three, for every record. py-spy put that at ~14 %
of the engine's samples. The callback nearly always finishes without waiting: it decodes the
record and puts it in an agent's queue that has room.

So the callback's first step is run by hand (in a copy of the context, as its task would have
had). If it finishes there (the usual case), that is all: no task, nothing to cancel. If it has
to wait (a full queue, flow control, the producer's buffer), the rest of it becomes a task of
mode's `wait_first` as before (`_Rest`): the task waits for what the callback is waiting for,
and a suspended flow or a stopping service cancels it, with `CancelledError` thrown into the
callback and the awaited future cancelled, as if it had been a task from the start. A flow
already suspended, a stopping service, or any other use of `wait_first` takes the original path.

Written against faust-streaming 0.15.3 and mode-streaming 0.7.1 (`install` checks the versions).
"""
from __future__ import annotations

import contextvars
import inspect
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Generator

from faust.transport.consumer import Consumer
from mode.services import Service, WaitResults

WRITTEN_FOR = {"faust-streaming": "0.15.3", "mode-streaming": "0.7.1"}

_wait_first = Consumer.wait_first


class _Rest:
    """The rest of a coroutine whose first step was run by hand and yielded `waiting_for`.
    Awaited by a task, it hands that task what the coroutine waits for, then passes on what
    the task sends or throws (a result, a CancelledError), each step in the coroutine's context."""

    def __init__(self, coro, waiting_for: Any, context: contextvars.Context):
        self._coro, self._waiting_for, self._context = coro, waiting_for, context

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, run, waiting_for = self._coro, self._context.run, self._waiting_for
        while True:
            try:
                step, arg = coro.send, (yield waiting_for)
            except BaseException as exc:  # thrown in by the task: cancelled, or the future failed
                step, arg = coro.throw, exc
            try:
                waiting_for = run(step, arg)
            except StopIteration as done:
                return done.value


async def wait_first(self: Consumer, *coros: Any, timeout: Any = None) -> WaitResults:
    if (timeout is not None or len(coros) != 2 or not inspect.iscoroutine(coros[0])
            or self.suspend_flow.is_set() or self._stopped.is_set() or self._crashed.is_set()):
        return await _wait_first(self, *coros, timeout=timeout)
    work, suspended = coros
    context = contextvars.copy_context()  # what the callback's own task would have run in
    try:
        waiting_for = context.run(work.send, None)
    except StopIteration as done:
        if inspect.iscoroutine(suspended):
            suspended.close()  # never awaited: nothing to cancel
        return WaitResults([work], [done.value], False)
    except BaseException:
        if inspect.iscoroutine(suspended):
            suspended.close()
        raise
    return await _wait_first(self, _Rest(work, waiting_for, context), suspended)


def _versions_match() -> bool:
    try:
        return all(version(name) == v for name, v in WRITTEN_FOR.items())
    except PackageNotFoundError:
        return False


def install() -> bool:
    """Patch faust's consumer; False (nothing patched) if faust or mode are not the versions
    this was written against, or faust's consumer has a `wait_first` of its own (an upgrade
    then keeps faust's own hand-over)."""
    if Consumer.wait_first is wait_first:
        return True
    if Consumer.wait_first is not Service.wait_first or not _versions_match():
        return False
    Consumer.wait_first = wait_first
    return True
