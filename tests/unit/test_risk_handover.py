"""The risk engine's cheaper hand-over of fetched records (services/risk/handover.py): a callback
that does not wait finishes without a task; one that waits becomes a task as before, which a
suspended flow cancels the way asyncio cancels a task."""
import asyncio
import contextvars

import pytest
from mode import Service

from services.risk import handover

_SEEN = contextvars.ContextVar("seen", default=None)


class _Consumer(Service):
    """What faust's Consumer.wait_first uses: mode's service events and the suspend_flow event."""

    def __init__(self) -> None:
        super().__init__()
        self.suspend_flow = asyncio.Event()


async def test_a_callback_that_does_not_wait_finishes_without_a_task():
    consumer, seen = _Consumer(), []

    async def callback(message):
        seen.append((message, asyncio.current_task()))
        return "delivered"

    suspended = consumer.suspend_flow.wait()
    result = await handover.wait_first(consumer, callback("m1"), suspended)
    assert result.results == ["delivered"] and not result.stopped
    assert seen == [("m1", asyncio.current_task())]  # ran in the caller's task: none of its own
    assert suspended.cr_frame is None  # the suspend waiter was closed, never left pending


async def test_a_callback_that_waits_for_room_finishes_once_there_is_room():
    consumer, queue = _Consumer(), asyncio.Queue(maxsize=1)
    queue.put_nowait("earlier")

    async def callback(message):
        await queue.put(message)  # full: waits
        return "delivered"

    waiting = asyncio.create_task(handover.wait_first(consumer, callback("m2"), consumer.suspend_flow.wait()))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    assert queue.get_nowait() == "earlier"
    result = await asyncio.wait_for(waiting, 1)
    assert result.results == ["delivered"] and queue.get_nowait() == "m2"


async def test_a_suspended_flow_cancels_a_waiting_callback_as_asyncio_cancels_a_task():
    consumer, queue, ended = _Consumer(), asyncio.Queue(maxsize=1), []
    queue.put_nowait("earlier")

    async def callback(message):
        try:
            await queue.put(message)
        except asyncio.CancelledError:
            ended.append(("cancelled", message))
            raise

    waiting = asyncio.create_task(handover.wait_first(consumer, callback("m3"), consumer.suspend_flow.wait()))
    await asyncio.sleep(0.01)
    consumer.suspend_flow.set()  # a rebalance
    await asyncio.wait_for(waiting, 1)
    await asyncio.sleep(0.01)
    assert ended == [("cancelled", "m3")]  # CancelledError, as in a task, not just closed
    assert queue.qsize() == 1 and queue.get_nowait() == "earlier"  # and it put nothing
    assert not queue._putters  # the future it waited on was cancelled and dropped


@pytest.mark.parametrize("turns", [0, 1, 2, 3])
async def test_a_lock_handed_to_an_interrupted_callback_is_passed_on(turns):
    """asyncio.Lock passes itself on when a woken waiter is cancelled before it runs: only a real
    CancelledError in the waiter does that (closing the coroutine left the next waiter hanging)."""
    consumer, lock = _Consumer(), asyncio.Lock()
    await lock.acquire()

    async def callback(message):
        async with lock:
            return message

    waiting = asyncio.create_task(handover.wait_first(consumer, callback("m4"), consumer.suspend_flow.wait()))
    await asyncio.sleep(0.01)
    third = asyncio.create_task(lock.acquire())
    await asyncio.sleep(0.01)
    consumer.suspend_flow.set()  # the flow is suspended...
    for _ in range(turns):
        await asyncio.sleep(0)
    lock.release()  # ...about when the lock is handed to the callback's waiter
    await asyncio.wait_for(waiting, 1)
    assert await asyncio.wait_for(third, 1)  # the lock went on to the next waiter


async def test_an_error_after_a_wait_reaches_the_caller():
    consumer, gate = _Consumer(), asyncio.Event()

    async def callback(message):
        await gate.wait()
        raise ValueError(f"cannot decode {message}")

    waiting = asyncio.create_task(handover.wait_first(consumer, callback("m5"), consumer.suspend_flow.wait()))
    await asyncio.sleep(0.01)
    gate.set()
    with pytest.raises(ValueError, match="cannot decode m5"):
        await asyncio.wait_for(waiting, 1)


async def test_an_error_before_any_wait_reaches_the_caller():
    consumer = _Consumer()

    async def callback(message):
        raise ValueError(f"cannot decode {message}")

    with pytest.raises(ValueError, match="cannot decode m6"):
        await handover.wait_first(consumer, callback("m6"), consumer.suspend_flow.wait())


async def test_the_callback_keeps_its_own_context():
    consumer, gate, seen = _Consumer(), asyncio.Event(), []

    async def callback(message):
        token = _SEEN.set(message)
        await gate.wait()
        seen.append(_SEEN.get())
        _SEEN.reset(token)  # a token from the same context: no ValueError

    waiting = asyncio.create_task(handover.wait_first(consumer, callback("m7"), consumer.suspend_flow.wait()))
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.wait_for(waiting, 1)
    assert seen == ["m7"]

    async def sets_only(message):
        _SEEN.set(message)

    await handover.wait_first(consumer, sets_only("m8"), consumer.suspend_flow.wait())
    assert _SEEN.get() is None  # nothing leaked into the caller's context


async def test_a_stopping_service_and_other_uses_take_the_original_path():
    consumer, tasks = _Consumer(), []

    async def callback(message):
        tasks.append(asyncio.current_task())
        return message

    consumer._stopped.set()  # the service is stopping
    await handover.wait_first(consumer, callback("m9"), consumer.suspend_flow.wait())
    assert tasks and tasks[0] is not asyncio.current_task()  # mode's own wait_first: a task of its own

    async def slow():
        await asyncio.sleep(0.01)
        return 1

    result = await handover.wait_first(_Consumer(), slow())  # one waitable, as Service.wait does
    assert result.results == [1]


def test_install_patches_faust_once_and_only_what_it_was_written_for(monkeypatch):
    from faust.transport.consumer import Consumer

    original = Consumer.wait_first
    try:
        assert handover.install() is True and Consumer.wait_first is handover.wait_first
        assert handover.install() is True  # twice: still the patch, nothing wrapped twice
        Consumer.wait_first = original
        monkeypatch.setitem(handover.WRITTEN_FOR, "faust-streaming", "0.15.4")  # another faust
        assert handover.install() is False and Consumer.wait_first is original
        monkeypatch.undo()
        Consumer.wait_first = lambda self, *coros, timeout=None: None  # faust with its own wait_first
        assert handover.install() is False and Consumer.wait_first is not handover.wait_first
    finally:
        Consumer.wait_first = original
