"""The consumer loop every service uses.

One batch from Kafka is applied in one Postgres transaction: each record is decoded and
validated; a record that can never be accepted goes, byte for byte, to `<topic>.dlq` with
error headers (through the outbox, so it is written exactly once); a valid record is applied
once (inbox) by its handler inside a savepoint. Offsets are committed only after the
transaction commits, so a crash anywhere replays the batch and the inbox makes that a no-op.
A failure that is not the record's fault (Postgres or Kafka away) rolls the batch back and
retries it from the same offsets.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import asyncpg
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from shared import events, inbox, metrics, outbox, topics
from shared.events import DecodeError, Envelope, Strict

log = structlog.get_logger("consumer")

# handler(conn, envelope, data): apply one event inside the caller's transaction.
Handler = Callable[[asyncpg.Connection, Envelope, Strict], Awaitable[None]]

TRANSIENT = (OSError, asyncio.TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
             asyncpg.exceptions.SerializationError, asyncpg.exceptions.DeadlockDetectedError)


def dead_letter_headers(record: Any, code: str, message: str) -> list[tuple[str, bytes]]:
    return [
        ("error.code", code.encode()),
        ("error.message", message[:2000].encode()),
        ("original.topic", record.topic.encode()),
        ("original.partition", str(record.partition).encode()),
        ("original.offset", str(record.offset).encode()),
    ]


@dataclass
class Subscription:
    topic: str
    handlers: dict[str, Handler]  # event type -> handler; types without one are accepted and ignored
    schemas: dict[str, type[Strict]] | None = None  # event type -> model; default: events.SCHEMAS[topic]

    def __post_init__(self) -> None:
        if self.schemas is None:
            self.schemas = events.SCHEMAS[self.topic]


class ConsumerLoop:
    def __init__(self, *, bootstrap: str, group_id: str, pool: asyncpg.Pool,
                 subscriptions: list[Subscription], max_records: int = 500,
                 before_batch: Callable[[], Awaitable[Any]] | None = None):
        self.pool = pool
        # E.g. re-read the test clock, so a batch never runs on a clock older than a move
        # that happened before its records were published.
        self.before_batch = before_batch
        self.by_topic = {s.topic: s for s in subscriptions}
        self.max_records = max_records
        self.consumer = AIOKafkaConsumer(
            *self.by_topic, bootstrap_servers=bootstrap, group_id=group_id,
            enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=10_000, heartbeat_interval_ms=1_000, max_poll_records=max_records,
            # Only committed data, if anyone ever writes these topics transactionally.
            isolation_level="read_committed",
        )
        self.ready = asyncio.Event()

    async def run(self) -> None:
        await self.consumer.start()
        try:
            while True:
                batch = await self.consumer.getmany(timeout_ms=500, max_records=self.max_records)
                self.ready.set()
                if not batch:
                    continue
                try:
                    if self.before_batch:
                        await self.before_batch()
                    await self.apply(batch)
                except TRANSIENT as exc:
                    log.warning("batch failed, will retry from the same offsets", error=repr(exc))
                    for tp, records in batch.items():
                        self.consumer.seek(tp, records[0].offset)
                    await asyncio.sleep(1)
                    continue
                try:
                    await self.consumer.commit({tp: records[-1].offset + 1 for tp, records in batch.items()})
                except (CommitFailedError, KafkaError) as exc:
                    # A rebalance took the partition; its new owner replays, the inbox dedupes.
                    log.info("offset commit failed after apply", error=repr(exc))
        finally:
            await self.consumer.stop()

    async def apply(self, batch: dict[TopicPartition, list[Any]]) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            for tp, records in batch.items():
                with metrics.HANDLER_SECONDS.labels(topic=tp.topic).time():
                    for record in records:
                        await self._apply_one(conn, record)

    async def _apply_one(self, conn: asyncpg.Connection, record: Any) -> None:
        topic = record.topic
        try:
            env, data = events.decode(record.value, self.by_topic[topic].schemas, topic)
        except DecodeError as exc:
            await self._dead_letter(conn, record, exc.code, exc.message)
            return
        with structlog.contextvars.bound_contextvars(event_id=env.event_id, correlation_id=env.correlation_id,
                                                     event_type=env.type):
            if not await inbox.first_delivery(conn, env.event_id, topic):
                metrics.CONSUMED.labels(topic=topic, outcome="duplicate").inc()
                log.info("duplicate delivery ignored")
                return
            handler = self.by_topic[topic].handlers.get(env.type)
            if handler is None:
                metrics.CONSUMED.labels(topic=topic, outcome="ignored").inc()
                return
            try:
                async with conn.transaction():  # savepoint: a failing handler leaves no trace
                    await handler(conn, env, data)
            except TRANSIENT:
                raise
            except Exception as exc:
                # A bug or a rule violation this record triggers every time: park it, move on.
                log.exception("handler failed; record dead-lettered")
                await self._dead_letter(conn, record, "HANDLER_ERROR", f"{type(exc).__name__}: {exc}")
                return
            metrics.CONSUMED.labels(topic=topic, outcome="applied").inc()

    async def _dead_letter(self, conn: asyncpg.Connection, record: Any, code: str, message: str) -> None:
        position = f"dlq:{record.topic}:{record.partition}:{record.offset}"
        if await inbox.first_delivery(conn, position, record.topic):
            await outbox.add_raw(conn, topics.dlq(record.topic), record.key, record.value,
                                 dead_letter_headers(record, code, message))
        metrics.CONSUMED.labels(topic=record.topic, outcome="dead_letter").inc()
        log.warning("record dead-lettered", topic=record.topic, partition=record.partition,
                    offset=record.offset, error_code=code, error_message=message)
