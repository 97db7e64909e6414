"""The risk engine's cheaper hand-over of fetched records (services/risk/handover.py): a callback
that does not wait finishes without a task; one that waits still yields to a suspended flow."""
import asyncio

from mode import Service

from services.risk import handover


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


async def test_a_suspended_flow_interrupts_a_waiting_callback():
    consumer, queue, cleaned = _Consumer(), asyncio.Queue(maxsize=1), []
    queue.put_nowait("earlier")

    async def callback(message):
        try:
            await queue.put(message)
        finally:
            cleaned.append(message)

    waiting = asyncio.create_task(handover.wait_first(consumer, callback("m3"), consumer.suspend_flow.wait()))
    await asyncio.sleep(0.01)
    consumer.suspend_flow.set()  # a rebalance
    await asyncio.wait_for(waiting, 1)
    await asyncio.sleep(0)
    assert cleaned == ["m3"]  # the callback was ended, not left waiting
    assert queue.qsize() == 1 and queue.get_nowait() == "earlier"  # and it put nothing


async def test_an_error_in_the_callback_reaches_the_caller():
    consumer = _Consumer()

    async def callback(message):
        raise ValueError(f"cannot decode {message}")

    try:
        await handover.wait_first(consumer, callback("m4"), consumer.suspend_flow.wait())
    except ValueError as exc:
        assert str(exc) == "cannot decode m4"
    else:
        raise AssertionError("the error was swallowed")


async def test_other_uses_take_the_original_path():
    consumer = _Consumer()

    async def slow():
        await asyncio.sleep(0.01)
        return 1

    result = await handover.wait_first(consumer, slow())  # one waitable, as Service.wait does
    assert result.results == [1]


def test_install_patches_faust_once_and_only_the_method_it_knows():
    from faust.transport.consumer import Consumer

    original = Consumer.wait_first
    try:
        assert handover.install() is True and Consumer.wait_first is handover.wait_first
        assert handover.install() is True  # twice: still the patch, nothing wrapped twice
        Consumer.wait_first = lambda self, *coros, timeout=None: None  # as if faust had its own now
        assert handover.install() is False and Consumer.wait_first is not handover.wait_first
    finally:
        Consumer.wait_first = original
