"""The shared runtime on its own, against the real Kafka and Postgres: outbox -> relay -> Kafka
-> consumer loop -> handler, exactly-once effects, dead letters, and restart safety."""
from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from shared import db as dbmod, events, outbox
from shared.consumer import ConsumerLoop, Subscription
from shared.events import UserRegistered
from shared.kafka import ensure_topics, make_producer
from shared.outbox import Relay
from tests.integration.conftest import committed_through, eventually

SCHEMAS = {"UserRegistered": UserRegistered}


@pytest.fixture
async def scratch(infra):
    """A fresh schema with the runtime's tables, a pool on it, and a fresh topic (+ its DLQ)."""
    schema = f"rt_{uuid.uuid4().hex[:8]}"
    topic = f"test.{schema}"
    pool = await dbmod.create_pool(infra.database_url, schema)
    await dbmod.migrate(pool, schema, [dbmod.RUNTIME_MIGRATIONS])
    await pool.execute("CREATE TABLE applied (user_id text PRIMARY KEY, times int NOT NULL)")
    await ensure_topics(infra.kafka, [topic], partitions=2)
    yield schema, topic, pool
    await pool.close()


def registered(user_id: str) -> dict:
    data = UserRegistered(user_id=user_id, birth_date=None, phone=None, id_number=None, real_name_verified=False,
                          registered_at=datetime(2026, 11, 25, tzinfo=timezone.utc))
    return events.new_event(data, source="test", occurred_at=datetime.now(timezone.utc), correlation_id=user_id)


async def count_applied(conn: asyncpg.Connection, env, data) -> None:
    await conn.execute("""INSERT INTO applied (user_id, times) VALUES ($1, 1)
                          ON CONFLICT (user_id) DO UPDATE SET times = applied.times + 1""", data.user_id)


class Running:
    def __init__(self, infra, schema, topic, pool, commit_ms: int = 0):
        self.infra, self.schema, self.topic, self.pool = infra, schema, topic, pool
        self.commit_ms = commit_ms
        self.tasks: list[asyncio.Task] = []
        self.producer = make_producer(infra.kafka)

    async def __aenter__(self):
        await self.producer.start()
        relay = Relay(self.infra.database_url, self.schema, self.pool, self.producer)
        loop = ConsumerLoop(bootstrap=self.infra.kafka, group_id=f"g-{self.schema}", pool=self.pool,
                            subscriptions=[Subscription(self.topic, {"UserRegistered": count_applied}, SCHEMAS)],
                            commit_ms=self.commit_ms)
        self.tasks = [asyncio.create_task(relay.run()), asyncio.create_task(loop.run())]
        return self

    async def __aexit__(self, *exc):
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.producer.stop()


async def applied_times(pool, user_id):
    return await pool.fetchval("SELECT times FROM applied WHERE user_id = $1", user_id)


async def test_outbox_to_kafka_to_consumer_round_trip(infra, scratch):
    schema, topic, pool = scratch
    async with Running(infra, schema, topic, pool):
        async with pool.acquire() as conn, conn.transaction():
            await outbox.add(conn, topic, "u-1", registered("u-1"))
        assert await eventually(lambda: applied_times(pool, "u-1")) == 1
        # Stamped published within a second (with the next run's read, or alone after 0.5 s).
        await eventually(lambda: pool.fetchval("SELECT count(*) = 0 FROM outbox WHERE published_at IS NULL"), timeout=5)


async def test_rolled_back_transaction_publishes_nothing(infra, scratch):
    schema, topic, pool = scratch
    async with Running(infra, schema, topic, pool):
        with pytest.raises(RuntimeError):
            async with pool.acquire() as conn, conn.transaction():
                await outbox.add(conn, topic, "u-ghost", registered("u-ghost"))
                raise RuntimeError("the state change failed")
        async with pool.acquire() as conn, conn.transaction():
            await outbox.add(conn, topic, "u-real", registered("u-real"))
        await eventually(lambda: applied_times(pool, "u-real"))
        assert await applied_times(pool, "u-ghost") is None
        assert await pool.fetchval("SELECT count(*) FROM outbox") == 1


async def test_redelivered_event_is_applied_once(infra, scratch, kafka):
    schema, topic, pool = scratch
    event = registered("u-dup")
    async with Running(infra, schema, topic, pool):
        for _ in range(3):
            await kafka.send(topic, event, key="u-dup")
        await kafka.send(topic, registered("u-after"), key="u-dup")  # same partition, after the copies
        await eventually(lambda: applied_times(pool, "u-after"))
        assert await applied_times(pool, "u-dup") == 1


async def test_offsets_are_committed_in_the_background_up_to_the_last_record(infra, scratch, kafka):
    """Commits go in the background, at most one per CONSUMER_COMMIT_MS: the last batch is
    committed too, soon after, with nothing more arriving to carry it."""
    schema, topic, pool = scratch
    async with Running(infra, schema, topic, pool, commit_ms=300):
        for i in range(20):
            await kafka.send(topic, registered(f"u-c{i}"), key=f"u-c{i}")
        await eventually(lambda: applied_times(pool, "u-c19"))
        await committed_through(infra.kafka, f"g-{schema}", await kafka.end_offsets(topic), timeout=5)


async def test_purge_deletes_old_published_rows_up_to_the_first_one_still_needed(infra, scratch):
    schema, topic, pool = scratch
    async with pool.acquire() as conn, conn.transaction():
        for i in range(6):
            await outbox.add(conn, topic, f"u-{i}", registered(f"u-purge-{i}"))
    ids = [r["id"] for r in await pool.fetch("SELECT id FROM outbox ORDER BY id")]
    day, hour = timedelta(days=1), timedelta(hours=1)
    stamps = [2 * day, 2 * day, None, 2 * day, hour, 2 * day]  # published how long ago (None: not yet)
    for row_id, ago in zip(ids, stamps):
        if ago:
            await pool.execute("UPDATE outbox SET published_at = now() - $2::interval WHERE id = $1", row_id, ago)
    relay = Relay(infra.database_url, schema, pool, producer=None, retention_hours=24)
    await relay._purge()
    left = [r["id"] for r in await pool.fetch("SELECT id FROM outbox ORDER BY id")]
    assert left == ids[2:]  # the unpublished third row holds back the old rows behind it
    await pool.execute("UPDATE outbox SET published_at = now() - interval '3 days' WHERE id = $1", ids[2])
    await relay._purge()
    left = [r["id"] for r in await pool.fetch("SELECT id FROM outbox ORDER BY id")]
    assert left == ids[4:]  # up to the row published an hour ago; never a recent or unpublished row


async def test_relay_publishes_rows_committed_while_it_was_down(infra, scratch):
    schema, topic, pool = scratch
    # Committed with no relay running: exactly the state a crash between commit and publish leaves.
    async with pool.acquire() as conn, conn.transaction():
        for i in range(3):
            await outbox.add(conn, topic, f"u-{i}", registered(f"u-late-{i}"))
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 3
    async with Running(infra, schema, topic, pool):
        for i in range(3):
            assert await eventually(lambda: applied_times(pool, f"u-late-{i}")) == 1


async def test_poison_record_is_dead_lettered_and_the_partition_moves_on(infra, scratch, kafka):
    schema, topic, pool = scratch
    dlq_start = await kafka.end_offsets(f"{topic}.dlq")
    async with Running(infra, schema, topic, pool):
        bad = b'{"event_id": 1}'
        meta = await kafka.send(topic, bad, key="k")
        await kafka.send(topic, registered("u-next"), key="k")
        await eventually(lambda: applied_times(pool, "u-next"))
        records = await kafka.read(f"{topic}.dlq", dlq_start, until=lambda rs: len(rs) >= 1)
    assert [r.value for r in records] == [bad]
    headers = dict(records[0].headers)
    assert headers["error.code"] == b"INVALID_ENVELOPE"
    assert headers["original.offset"] == str(meta.offset).encode()


async def _dead_letters(infra, scratch, kafka, handler, failing: str, following: str) -> list:
    """Run a consumer (and a relay) with `handler` on two records, `failing` then `following`,
    until `following` is applied; the dead letters written meanwhile."""
    schema, topic, pool = scratch
    dlq_start = await kafka.end_offsets(f"{topic}.dlq")
    producer = make_producer(infra.kafka)
    await producer.start()
    relay = asyncio.create_task(Relay(infra.database_url, schema, pool, producer).run())
    loop = ConsumerLoop(bootstrap=infra.kafka, group_id=f"g-{schema}", pool=pool,
                        subscriptions=[Subscription(topic, {"UserRegistered": handler}, SCHEMAS)])
    consumer = asyncio.create_task(loop.run())
    try:
        await kafka.send(topic, registered(failing), key="k")
        await kafka.send(topic, registered(following), key="k")
        await eventually(lambda: applied_times(pool, following))
        return await kafka.read(f"{topic}.dlq", dlq_start, until=lambda rs: len(rs) >= 1)
    finally:
        for t in (relay, consumer):
            t.cancel()
        await asyncio.gather(relay, consumer, return_exceptions=True)
        await producer.stop()


async def test_handler_failure_parks_the_record_and_keeps_no_partial_effect(infra, scratch, kafka):
    pool = scratch[2]

    async def half_then_fail(conn, env, data):
        await count_applied(conn, env, data)
        if data.user_id == "u-boom":
            raise ValueError("rule violated")

    records = await _dead_letters(infra, scratch, kafka, half_then_fail, "u-boom", "u-fine")
    assert await applied_times(pool, "u-boom") is None  # the savepoint rolled its half-effect back
    assert dict(records[0].headers)["error.code"] == b"HANDLER_ERROR"
    assert json.loads(records[0].value)["data"]["user_id"] == "u-boom"


@pytest.mark.parametrize("error", [asyncpg.exceptions.CannotConnectNowError, asyncpg.exceptions.AdminShutdownError])
async def test_postgres_restarting_is_retried_not_blamed_on_the_record(infra, scratch, kafka, error):
    """While a restarted Postgres recovers it answers "not yet accepting connections" (57P03); one
    shutting down ends sessions (57P01). Neither is the record's fault: the batch is retried from
    the same offsets and the consumer keeps running, instead of dead-lettering the record or dying."""
    schema, topic, pool = scratch
    failures = []

    async def fails_once(conn, env, data):
        if not failures:
            failures.append(data.user_id)
            raise error("the database system is not yet accepting connections")
        await count_applied(conn, env, data)

    loop = ConsumerLoop(bootstrap=infra.kafka, group_id=f"g-{schema}", pool=pool,
                        subscriptions=[Subscription(topic, {"UserRegistered": fails_once}, SCHEMAS)])
    consumer = asyncio.create_task(loop.run())
    try:
        await kafka.send(topic, registered("u-restart"), key="k")
        await eventually(lambda: applied_times(pool, "u-restart"))
        assert not consumer.done()
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
    assert failures == ["u-restart"] and await applied_times(pool, "u-restart") == 1
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0  # no dead letter written (no relay here)


@pytest.mark.parametrize("still_running", [False, True])
async def test_a_misused_connection_dead_letters_the_record_not_retried_forever(infra, scratch, kafka, still_running):
    """asyncpg raises InterfaceError for a closed connection, and the same class for a bug in
    the calls ("another operation is in progress"): such a bug fails the record every time, so
    the record is dead-lettered and the next one applied, instead of its batch being retried
    (and its partition blocked) forever, or the consumer dying. With the handler's own query
    still running nothing more can run on the connection, not even the rollback: the batch is
    applied again on another connection, and the record dead-lettered without its handler."""
    pool = scratch[2]
    calls = []

    async def misuses_connection(conn, env, data):
        if data.user_id == "u-bug":
            calls.append(data.user_id)
            slow, quick = conn.fetchval("SELECT pg_sleep(0.3)"), conn.fetchval("SELECT 1")
            if still_running:  # the usual shape of the bug: the first query is left running
                await asyncio.gather(slow, quick)
            both = await asyncio.gather(slow, quick, return_exceptions=True)
            raise next(r for r in both if isinstance(r, Exception))
        await count_applied(conn, env, data)

    records = await _dead_letters(infra, scratch, kafka, misuses_connection, "u-bug", "u-next")
    headers = dict(records[0].headers)
    assert headers["error.code"] == b"HANDLER_ERROR" and b"another operation is in progress" in headers["error.message"]
    assert json.loads(records[0].value)["data"]["user_id"] == "u-bug"
    assert calls == ["u-bug"]  # its handler ran once: the second time it went to the dead letters directly
    assert await applied_times(pool, "u-next") == 1


# ------------------------------------------------------------ hand-off of a consumer's rows

@contextlib.asynccontextmanager
async def handing_off_process(infra, schema, pool):
    """This process hands its committed rows to a relay that is not the active one (another
    connection holds its advisory lock, so nothing is published by a relay): whatever reaches
    Kafka was handed off. Ends the hand-off on the way out."""
    lock = await asyncpg.connect(infra.database_url)
    assert await lock.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", f"outbox:{schema}")
    producer = make_producer(infra.kafka)
    await producer.start()
    relay = Relay(infra.database_url, schema, pool, producer)
    outbox.hand_off_to(relay.hand_off)
    task = asyncio.create_task(relay.run())  # its stamper
    try:
        yield
    finally:
        outbox.hand_off_to(None)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await producer.stop()
        await lock.close()


@contextlib.asynccontextmanager
async def forwarding_consumer(infra, schema, topic, pool, out: str, fail_for: str | None = None):
    """A consumer whose handler writes an outbox row to `out` per record, then raises for
    `fail_for`."""
    async def forward(conn, env, data):
        await outbox.add(conn, out, data.user_id, registered(data.user_id))
        if data.user_id == fail_for:
            raise ValueError("rule violated")

    loop = ConsumerLoop(bootstrap=infra.kafka, group_id=f"g-{schema}", pool=pool,
                        subscriptions=[Subscription(topic, {"UserRegistered": forward}, SCHEMAS)])
    task = asyncio.create_task(loop.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_consumer_hands_its_committed_rows_to_kafka_and_stamps_them(infra, scratch, kafka):
    schema, topic, pool = scratch
    out = f"{topic}.out"
    await ensure_topics(infra.kafka, [out], partitions=1)
    start = await kafka.end_offsets(out)
    async with handing_off_process(infra, schema, pool), forwarding_consumer(infra, schema, topic, pool, out):
        for i in range(3):
            await kafka.send(topic, registered(f"u-h{i}"), key=f"u-h{i}")
        records = await kafka.read(out, start, until=lambda rs: len(rs) >= 3)
        assert sorted(json.loads(r.value)["data"]["user_id"] for r in records) == ["u-h0", "u-h1", "u-h2"]
        await eventually(lambda: pool.fetchval(
            "SELECT count(*) = 3 FROM outbox WHERE handed_off AND published_at IS NOT NULL"), timeout=5)


async def test_rows_of_a_rolled_back_savepoint_are_not_handed_off(infra, scratch, kafka):
    schema, topic, pool = scratch
    out = f"{topic}.out"
    await ensure_topics(infra.kafka, [out], partitions=1)
    start = await kafka.end_offsets(out)
    async with handing_off_process(infra, schema, pool), \
            forwarding_consumer(infra, schema, topic, pool, out, fail_for="u-boom"):
        await kafka.send(topic, registered("u-boom"), key="k")  # its row is written, then the handler fails
        await kafka.send(topic, registered("u-fine"), key="k")
        records = await kafka.read(out, start, until=lambda rs: any(b"u-fine" in r.value for r in rs))
        await asyncio.sleep(1)  # a row handed off with u-fine's batch would be in Kafka by now
        records = await kafka.read(out, start, until=lambda rs: len(rs) >= len(records))
    assert [json.loads(r.value)["data"]["user_id"] for r in records] == ["u-fine"]
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE key = 'u-boom'") == 0


async def test_relay_publishes_a_handed_off_row_left_unsent_after_the_grace(infra, scratch):
    """The state a consumer leaves when it dies between its commit and its hand-off."""
    schema, topic, pool = scratch
    with outbox.collecting() as written:
        async with pool.acquire() as conn, conn.transaction():
            await outbox.add(conn, topic, "u-orphan", registered("u-orphan"))
    assert len(written) == 1
    producer = make_producer(infra.kafka)
    await producer.start()
    relay = Relay(infra.database_url, schema, pool, producer, handoff_grace_seconds=1.5)
    loop = ConsumerLoop(bootstrap=infra.kafka, group_id=f"g-{schema}", pool=pool,
                        subscriptions=[Subscription(topic, {"UserRegistered": count_applied}, SCHEMAS)])
    tasks = [asyncio.create_task(relay.run()), asyncio.create_task(loop.run())]
    try:
        assert await eventually(lambda: applied_times(pool, "u-orphan")) == 1
        waited = await eventually(lambda: pool.fetchval("SELECT extract(epoch FROM published_at - created_at) FROM outbox"))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await producer.stop()
    assert waited >= 1.5  # left to its writer for the grace period, then published by the relay


async def test_a_delayed_topic_waits_its_delay_and_then_comes_in_one_batch(infra, scratch, kafka):
    """Subscription.delay_ms: after a batch with records of the topic, its partitions pause that
    long; what arrived meanwhile is applied together afterwards, nothing lost."""
    schema, topic, pool = scratch
    applied_at: dict[str, float] = {}

    async def stamp(conn, env, data):
        await count_applied(conn, env, data)
        applied_at[data.user_id] = asyncio.get_running_loop().time()

    loop = ConsumerLoop(bootstrap=infra.kafka, group_id=f"g-{schema}", pool=pool,
                        subscriptions=[Subscription(topic, {"UserRegistered": stamp}, SCHEMAS, delay_ms=1500)])
    task = asyncio.create_task(loop.run())
    try:
        await kafka.send(topic, registered("u-d0"), key="k")
        await eventually(lambda: applied_times(pool, "u-d0"))
        for i in (1, 2, 3):
            await kafka.send(topic, registered(f"u-d{i}"), key="k")
        for i in (1, 2, 3):
            assert await eventually(lambda: applied_times(pool, f"u-d{i}")) == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert applied_at["u-d1"] - applied_at["u-d0"] >= 1.4  # the partition paused after u-d0's batch
    assert applied_at["u-d3"] - applied_at["u-d1"] < 0.5   # then the three came together


async def test_every_transaction_of_a_handing_off_process_sends_its_rows_in_commit_order(infra, scratch, kafka):
    """Not only a consumer's: a timer's or an API request's transaction hands its rows off too, so
    the process's rows of one key leave in the order their transactions committed."""
    schema, topic, pool = scratch
    start = await kafka.end_offsets(topic)
    async with handing_off_process(infra, schema, pool):
        for i in range(5):
            async with pool.acquire() as conn, conn.transaction():
                await outbox.add(conn, topic, "same-key", registered(f"u-order-{i}"))
        records = await kafka.read(topic, start, until=lambda rs: len(rs) >= 5)
    assert [json.loads(r.value)["data"]["user_id"] for r in records] == [f"u-order-{i}" for i in range(5)]
    assert await pool.fetchval("SELECT bool_and(handed_off) FROM outbox")
