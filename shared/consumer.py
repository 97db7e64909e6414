"""The consumer loop every service uses.

One batch from Kafka is applied in one Postgres transaction: each record is decoded and
validated; a record that can never be accepted goes, byte for byte, to `<topic>.dlq` with
error headers (through the outbox, so it is written exactly once); a valid record is applied
once (inbox): runs of the hot event types as a set by their batch handler (a few statements for
hundreds of records, which is where the throughput comes from), everything else by its handler
inside a savepoint. Offsets are committed only after the transaction commits, so a crash
anywhere replays the batch and the inbox makes that a no-op.
A failure that is not the record's fault (Postgres or Kafka away) rolls the batch back and
retries it from the same offsets.
"""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import asyncpg
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from shared import db, events, inbox, kafka, metrics, outbox, topics, tracing
from shared.events import DecodeError, Envelope, Strict

log = structlog.get_logger("consumer")

# handler(conn, envelope, data): apply one event inside the caller's transaction.
Handler = Callable[[asyncpg.Connection, Envelope, Strict], Awaitable[None]]
# batch handler(conn, [(envelope, data), ...]): apply many events of one type as a set inside the
# caller's transaction; returns those it left to the one-by-one handler (unusual cases).
BatchHandler = Callable[[asyncpg.Connection, list[tuple[Envelope, Strict]]],
                        Awaitable[list[tuple[Envelope, Strict]]]]

_UNTRACED = contextlib.nullcontext({})  # tracing off: no span, no extra log fields

_RETRIED = (asyncio.TimeoutError, asyncpg.exceptions.SerializationError, asyncpg.exceptions.DeadlockDetectedError,
            # A lock or statement timeout, or an operator's pg_cancel_backend: the next try is
            # another moment. A migration by another instance changed a table under asyncpg's
            # prepared statements: asyncpg drops them, and the next try prepares them afresh.
            asyncpg.exceptions.LockNotAvailableError, asyncpg.exceptions.QueryCanceledError,
            asyncpg.exceptions.OutdatedSchemaCacheError, asyncpg.exceptions.InvalidCachedStatementError)


class _ConnectionLeftBusy(Exception):
    """A handler left a query of its own running on the batch's connection (a bug: e.g. two
    queries at once on it), so nothing more can run there, not even the rollback. The connection
    is closed and the batch applied again; the record goes to the dead letters then, without
    its handler (ConsumerLoop._poisoned)."""


def transient(exc: BaseException) -> bool:
    """A failure that is not the record's fault: Postgres away, a timeout, a serialization
    failure, a deadlock, a cancelled statement or a schema changed under asyncpg's cache. The
    batch is rolled back and applied again; anything else a handler raises is the record's fault
    and dead-letters it."""
    return db.connection_lost(exc) or isinstance(exc, (*_RETRIED, _ConnectionLeftBusy))


def _left_busy(exc: BaseException) -> bool:
    """asyncpg refuses a statement while another runs on the same connection."""
    return isinstance(exc, asyncpg.InterfaceError) and "another operation is in progress" in str(exc)


def dead_letter_headers(record: Any, code: str, message: str) -> list[tuple[str, bytes]]:
    """The record's own headers, then the error headers (docs/contract.md §2)."""
    headers = getattr(record, "headers", None) or ()
    own = [(k, v if isinstance(v, bytes) else bytes(v or b""))
           for k, v in (headers.items() if hasattr(headers, "items") else headers)]
    return own + [
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
    # event type -> set-based handler for the hot path; its leftovers (and everything, if it
    # raises) go to `handlers` one by one. Records of one set have distinct Kafka keys.
    batch_handlers: dict[str, BatchHandler] = field(default_factory=dict)
    # For topics off a saga's path (e.g. statistics): after a batch with records of this topic,
    # its partitions are paused for this long, so that at light load their records are applied
    # many at a time instead of one batch (a transaction, a fetch) each. 0: never paused.
    delay_ms: int = 0

    def __post_init__(self) -> None:
        if self.schemas is None:
            self.schemas = events.SCHEMAS[self.topic]


class _SetPathFailed(Exception):
    """A batch handler raised: the batch's transaction is gone, apply it again one by one."""


@dataclass
class _Decoded:
    record: Any
    env: Envelope
    data: Strict


class Committer:
    """Commits offsets in the background, one commit at a time and in order, at most one per
    `interval` seconds: offsets offered in between are merged and go in the next commit.
    Nobody waits for the broker, and each commit (a broker round trip, and CPU on both sides)
    covers every batch applied since the last one. A record applied but not committed yet is
    only delivered again (after a crash or a rebalance), and the inbox ignores it then."""

    def __init__(self, commit: Callable[[dict[TopicPartition, int]], Awaitable[None]], interval: float = 0.0):
        self._commit = commit
        self._interval = interval
        self._pending: dict[TopicPartition, int] = {}
        self._task: asyncio.Task | None = None

    def offer(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            self._pending[tp] = max(offset, self._pending.get(tp, offset))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while self._pending:
            offsets, self._pending = self._pending, {}
            await self._commit(offsets)
            if self._interval:
                await asyncio.sleep(self._interval)

    def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()


class ConsumerLoop:
    def __init__(self, *, bootstrap: str, group_id: str, pool: asyncpg.Pool,
                 subscriptions: list[Subscription], max_records: int = 500,
                 before_batch: Callable[[], Awaitable[Any]] | None = None,
                 security: kafka.Security | None = None, gather_ms: int = 0, gather_records: int = 64,
                 commit_ms: int = 0):
        self.pool = pool
        self.commit_seconds = commit_ms / 1000
        # Under load, a pause before the next fetch lets records gather, so that each batch's
        # fixed cost (a transaction, a dozen statements, a fetch) is shared by more of
        # them: the pause grows with the batch just applied, up to `gather_ms` for a batch of
        # `gather_records` or more, and a single record (light load) gets none.
        self.gather_seconds = gather_ms / 1000
        self.gather_records = max(gather_records, 1)
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
            **kafka.client_options(security),
        )
        self.ready = asyncio.Event()
        # (topic, partition, offset) -> error: records whose handler left the connection busy;
        # dead-lettered without their handler when the batch is applied again.
        self._poisoned: dict[tuple[str, int, int], str] = {}
        self._next_one_by_one = False  # a batch handler left it busy: the next try goes one by one

    async def run(self) -> None:
        await self.consumer.start()
        # Offsets are committed in the background (`Committer`): a commit is a broker round trip,
        # and waiting for it after every batch put it on every hop of a saga.
        committer = Committer(self._commit, self.commit_seconds)
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
                except Exception as exc:
                    if not transient(exc):
                        raise
                    log.warning("batch failed, will retry from the same offsets", error=repr(exc))
                    for tp, records in batch.items():
                        self.consumer.seek(tp, records[0].offset)
                    await asyncio.sleep(1)
                    continue
                committer.offer({tp: records[-1].offset + 1 for tp, records in batch.items()})
                self._delay([tp for tp in batch if self.by_topic[tp.topic].delay_ms])
                pause = self.gather_pause(sum(len(records) for records in batch.values()))
                if pause:
                    await asyncio.sleep(pause)
        finally:
            # Never wait for the broker here: the consumer must stop and leave the group whatever
            # happens (a member that does not leave holds its partitions until its session times
            # out, and a shutdown in the middle of a rebalance must not hang on a commit). The
            # partitions' next owner replays what was not committed; the inbox makes that a no-op.
            committer.cancel()
            await self.consumer.stop()

    def _delay(self, tps: list[TopicPartition]) -> None:
        """Pause these partitions for their topic's `delay_ms` (see Subscription)."""
        assigned = self.consumer.assignment()
        for tp in tps:
            if tp not in assigned:  # a rebalance took it while the batch was applied
                continue
            try:
                self.consumer.pause(tp)
            except Exception as exc:  # in the middle of a rebalance: no pause this time
                log.debug("partition not paused", partition=str(tp), error=repr(exc))
                continue
            asyncio.get_running_loop().call_later(self.by_topic[tp.topic].delay_ms / 1000, self._resume, tp)

    def _resume(self, tp: TopicPartition) -> None:
        try:
            if tp in self.consumer.assignment():  # a rebalance may have taken it meanwhile
                self.consumer.resume(tp)
        except Exception as exc:  # the consumer stopped meanwhile
            log.debug("partition not resumed", partition=str(tp), error=repr(exc))

    def gather_pause(self, applied: int) -> float:
        """Seconds to wait before the next fetch after a batch of `applied` records."""
        if applied <= 1 or not self.gather_seconds:
            return 0.0
        return self.gather_seconds * min(1.0, applied / self.gather_records)

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        # Only the partitions still assigned: one a rebalance took would fail the whole commit.
        assigned = self.consumer.assignment()
        offsets = {tp: o for tp, o in offsets.items() if tp in assigned}
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # A rebalance took the partition; its new owner replays, the inbox dedupes.
            log.info("offset commit failed after apply", error=repr(exc))
        except Exception as exc:  # anything else: the records are replayed at worst, never lost
            log.warning("offset commit failed", error=repr(exc))

    async def apply(self, batch: dict[TopicPartition, list[Any]]) -> None:
        """The whole batch in one transaction. Should a set path fail (a case it did not
        foresee), the transaction is rolled back and the batch applied again one by one: that
        way the set paths need no savepoints, which would cost two round trips per run."""
        sets, self._next_one_by_one = not self._next_one_by_one, False
        try:
            await self._apply(batch, sets=sets)
        except _SetPathFailed as exc:
            log.warning("set path failed; the batch is applied again one by one", error=repr(exc.__cause__))
            await self._apply(batch, sets=False)

    async def _apply(self, batch: dict[TopicPartition, list[Any]], *, sets: bool) -> None:
        """Decode; one inbox statement for every record of the batch; then, topic by topic (its
        partitions together: each order lives in one partition), runs of same-type records as
        sets where the type has a batch handler, the rest one by one in a savepoint each."""
        by_topic: dict[str, list[Any]] = {}
        for tp, records in batch.items():
            by_topic.setdefault(tp.topic, []).extend(records)
        # In a service the transaction hands its outbox rows to the producer as it commits
        # (shared/db.py, outbox.hand_off_to): the next hop does not wait for the relay.
        async with self.pool.acquire() as conn, conn.transaction():
            decoded: dict[str, list[_Decoded]] = {}
            for topic, records in by_topic.items():
                decoded[topic] = []
                for record in records:
                    try:
                        env, data = events.decode(record.value, self.by_topic[topic].schemas, topic)
                    except DecodeError as exc:
                        await self._dead_letter(conn, record, exc.code, exc.message)
                        continue
                    decoded[topic].append(_Decoded(record, env, data))
            all_ = [(d.env.event_id, topic) for topic, ds in decoded.items() for d in ds]
            fresh = await inbox.first_deliveries(conn, [k for k, _ in all_], [t for _, t in all_]) if all_ else set()
            for topic, ds in decoded.items():
                todo: list[_Decoded] = []
                for d in ds:
                    if d.env.event_id in fresh:
                        fresh.discard(d.env.event_id)  # the same event twice in one batch: the first counts
                        todo.append(d)
                if len(todo) < len(ds):
                    metrics.CONSUMED.labels(topic=topic, outcome="duplicate").inc(len(ds) - len(todo))
                    log.info("duplicate deliveries ignored", topic=topic, count=len(ds) - len(todo))
                with metrics.HANDLER_SECONDS.labels(topic=topic).time():
                    await self._apply_topic(conn, self.by_topic[topic], todo, sets)

    async def _apply_topic(self, conn: asyncpg.Connection, sub: Subscription, todo: list[_Decoded],
                           sets: bool) -> None:
        for run in _runs(todo, sub) if sets else ([d] for d in todo):
            # A run of one takes the set path too: no savepoint, fewer round trips (at low load
            # most runs are single records).
            if run[0].env.type in sub.batch_handlers:
                run = await self._apply_set(conn, sub, run)
            for d in run:
                await self._apply_one(conn, sub, d)

    async def _apply_set(self, conn: asyncpg.Connection, sub: Subscription, run: list[_Decoded]) -> list[_Decoded]:
        """Apply a run with its batch handler; returns the records it left for one-by-one handling."""
        handler = sub.batch_handlers[run[0].env.type]
        by_id = {d.env.event_id: d for d in run}
        try:
            # Log lines naming one of the run's orders get its correlation_id; tracing on: one
            # span linked to every record's context (shared/tracing.py).
            with tracing.set_run(sub.topic, run[0].env.type, run):
                left = await handler(conn, [(d.env, d.data) for d in run])
        except Exception as exc:
            if _left_busy(exc):
                self._next_one_by_one = True  # to find the record, with its handler alone
                conn.terminate()
                raise _ConnectionLeftBusy(run[0].env.type) from exc
            if transient(exc):
                raise
            raise _SetPathFailed() from exc
        left_ids = {env.event_id for env, _ in left}
        applied = len(run) - len(left_ids)
        if applied:
            metrics.CONSUMED.labels(topic=sub.topic, outcome="applied").inc(applied)
            metrics.SET_PATH.labels(topic=sub.topic, type=run[0].env.type, path="set").inc(applied)
        return [by_id[i] for i in (d.env.event_id for d in run) if i in left_ids]

    async def _apply_one(self, conn: asyncpg.Connection, sub: Subscription, d: _Decoded) -> None:
        topic, env = sub.topic, d.env
        handler = sub.handlers.get(env.type)
        if env.type in sub.batch_handlers:
            metrics.SET_PATH.labels(topic=topic, type=env.type, path="one_by_one").inc()
        if handler is None:
            metrics.CONSUMED.labels(topic=topic, outcome="ignored").inc()
            return
        position = (d.record.topic, d.record.partition, d.record.offset)
        if position in self._poisoned:  # its handler left the connection busy last time: not again
            await self._dead_letter(conn, d.record, "HANDLER_ERROR", self._poisoned.pop(position))
            return
        # Tracing on: a consumer span per record, child of its traceparent; its ids go in the logs.
        with (tracing.consuming(topic, d.record, env) if tracing.ENABLED else _UNTRACED) as trace_ids, \
                structlog.contextvars.bound_contextvars(
                    event_id=env.event_id, correlation_id=env.correlation_id or getattr(d.data, "order_id", None),
                    event_type=env.type, **trace_ids):
            try:
                async with conn.transaction():  # savepoint: a failing handler leaves no trace
                    await handler(conn, env, d.data)
            except Exception as exc:
                if _left_busy(exc):  # nothing more runs on this connection, not even the rollback
                    log.error("handler left the connection busy; the batch is applied again and the record "
                              "dead-lettered", exc_info=True)
                    cause = exc.__context__ if isinstance(exc.__context__, Exception) else exc
                    self._poisoned[position] = f"{type(cause).__name__}: {cause}"
                    conn.terminate()
                    raise _ConnectionLeftBusy(env.type) from exc
                if transient(exc):
                    raise
                # A bug or a rule violation this record triggers every time: park it, move on.
                log.exception("handler failed; record dead-lettered")
                if tracing.ENABLED:
                    tracing.failed(exc)
                await self._dead_letter(conn, d.record, "HANDLER_ERROR", f"{type(exc).__name__}: {exc}")
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


def _runs(todo: list[_Decoded], sub: Subscription):
    """Split records, in order, into runs: a maximal stretch of one type that has a batch
    handler and no order twice (so one order's events keep their order; the Kafka key stands in
    for events without an order_id), or a single record."""
    run: list[_Decoded] = []
    keys: set = set()
    for d in todo:
        batchable = d.env.type in sub.batch_handlers
        key = getattr(d.data, "order_id", d.record.key)
        if run and (not batchable or d.env.type != run[0].env.type or key in keys):
            yield run
            run, keys = [], set()
        if not batchable:
            yield [d]
            continue
        run.append(d)
        keys.add(key)
    if run:
        yield run
