"""Transactional outbox and its relay.

Handlers call `add` / `add_raw` / `add_many` / `write_with` on the connection of their
transaction, so an event is stored exactly when the state change that emits it commits. The
relay publishes stored rows in id order with an idempotent producer (acks=all) and only then
stamps them published: a crash between commit and publish means the row is published after the
restart, never lost. A crash after publish and before the stamp republishes it; consumers
deduplicate on event_id.

In a service process every transaction hands its rows to the producer itself, right after its
commit (`hand_off_to`, `collecting`, `Relay.hand_off`; shared/db.py wraps the pool connections'
`transaction()`): the rows are kept in memory as they are written, so a saga's hop needs neither
the relay's wake-up (a NOTIFY) nor its read of the rows (a round trip), and the process sends
its rows in the order its transactions commit. Such rows are marked `handed_off`; the relay
leaves them alone for `HANDOFF_GRACE_SECONDS` and publishes them only if they are still
unpublished then (the process died before sending them, or Kafka refused them).
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterator

import asyncpg
import structlog
from aiokafka import AIOKafkaProducer

from shared import events, metrics, tracing

log = structlog.get_logger("outbox")


# How long published rows may wait for their stamp, to go with the next run's read. A crash in
# that window publishes them again (consumers deduplicate on event_id), as after any crash
# between publish and stamp.
STAMP_WAIT_SECONDS = 0.5
# How long the relay leaves a handed-off row to the process that wrote it (its send and stamp
# take well under a second); after that the row counts as missed and the relay publishes it.
HANDOFF_GRACE_SECONDS = 5.0


def channel(schema: str) -> str:
    return f"outbox_{schema}"


@dataclass(frozen=True)
class Written:
    """A row a collecting transaction wrote: what `Relay.hand_off` sends after the commit."""
    id: int
    topic: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]


# The rows written so far by the current top-level transaction (None: not collecting; rows are
# then published by the relay, woken by a NOTIFY at commit).
_written: contextvars.ContextVar[list[Written] | None] = contextvars.ContextVar("outbox_written", default=None)


# Where this process's committed rows go (Relay.hand_off; None: nowhere, the relay publishes them).
_target: Callable[[list[Written]], Awaitable[None]] | None = None


def hand_off_to(target: Callable[[list[Written]], Awaitable[None]] | None) -> None:
    """From now on every transaction on a pool connection (shared/db.py) collects its rows and hands
    them to `target` after its commit (None: stop)."""
    global _target
    _target = target


def handing_off() -> Callable[[list[Written]], Awaitable[None]] | None:
    return _target


@contextlib.contextmanager
def collecting() -> Iterator[list[Written]]:
    """Within: rows written are marked handed off and listed (no NOTIFY); the caller hands the list
    to `Relay.hand_off` once the transaction has committed, and drops it if it did not."""
    rows: list[Written] = []
    token = _written.set(rows)
    try:
        yield rows
    finally:
        _written.reset(token)


def mark() -> int | None:
    """Where the list of written rows stands (None: not collecting); see `roll_back_to`."""
    rows = _written.get()
    return None if rows is None else len(rows)


def roll_back_to(position: int | None) -> None:
    """A savepoint (or the transaction) rolled back: forget the rows written since `mark()`, which
    no longer exist. shared/db.py's connections call it for every `transaction()` that fails."""
    rows = _written.get()
    if rows is not None and position is not None:
        del rows[position:]


async def add(conn: asyncpg.Connection, topic: str, key: str | None, envelope: dict[str, Any]) -> None:
    # Tracing on: the row carries the traceparent of the span it is written in (shared/tracing.py).
    await add_raw(conn, topic, key.encode() if key is not None else None, events.encode(envelope),
                  tracing.outbox_headers(envelope) if tracing.ENABLED else ())


async def add_raw(conn: asyncpg.Connection, topic: str, key: bytes | None, value: bytes | None,
                  headers: list[tuple[str, bytes]] = ()) -> None:
    header_keys, header_values = [k for k, _ in headers], [v for _, v in headers]
    written = _written.get()
    if written is None:
        # One round trip: the row and the relay's wake-up call (delivered at commit, deduplicated
        # by Postgres within the transaction).
        await conn.execute(
            """WITH row AS (INSERT INTO outbox (topic, key, value, header_keys, header_values)
                            VALUES ($1, $2, $3, $4, $5) RETURNING 1)
               SELECT pg_notify('outbox_' || current_schema(), '') FROM row""",
            topic, key, value, header_keys, header_values)
        return
    id_ = await conn.fetchval(
        """INSERT INTO outbox (topic, key, value, header_keys, header_values, handed_off, created_at)
           VALUES ($1, $2, $3, $4, $5, true, clock_timestamp()) RETURNING id""", topic, key, value, header_keys, header_values)
    written.append(Written(id_, topic, key, value, tuple(headers)))


Row = tuple[str, str | None, dict[str, Any]]  # (topic, key, envelope)


NOTIFY_EMITTED = ("SELECT pg_notify('outbox_' || current_schema(), '') "
                  "FROM (SELECT 1 FROM emitted LIMIT 1) AS any_row")


@dataclass
class Emitting:
    """Outbox rows written by a caller's own statement: `cte` (named `emitted`, returning each row's
    id) goes in its WITH list, `args` after its own parameters. Not collecting: the statement must
    also run `NOTIFY_EMITTED` (the relay's wake-up call). Collecting: it must return the ids
    (`SELECT id FROM emitted`), which the caller passes to `written` after the statement."""
    cte: str
    args: list
    encoded: list[tuple]  # (topic, key, value, headers) per row, in order
    collecting: bool

    def written(self, ids: list[int], kept: list[int] | None = None) -> None:
        """The ids the statement returned; `kept`: the indexes of the rows a guard let through, in
        order (default: all of them)."""
        rows = _written.get()
        if rows is None:
            return
        encoded = self.encoded if kept is None else [self.encoded[i] for i in kept]
        if len(ids) != len(encoded):
            raise RuntimeError(f"{len(ids)} outbox ids for {len(encoded)} rows")
        rows.extend(Written(id_, *row) for id_, row in zip(sorted(ids), encoded))


def emitting(rows: list[Row], first: int, *, guard: tuple[str, list[str]] | None = None) -> Emitting:
    """The rows' insert as the CTE `emitted`, its parameters numbered from `$first`. `guard`: (a
    set the statement computes, e.g. `SELECT order_id FROM inserted`; one key per row): only the
    rows whose key is in that set are written."""
    collecting = _written.get() is not None
    n = [f"${first + i}" for i in range(6)]
    topics_, keys, values = ([t for t, _, _ in rows], [k.encode() if k is not None else None for _, k, _ in rows],
                             [events.encode(e) for _, _, e in rows])
    # Handed-off rows: created_at is the insert's time (not the transaction's start), which the
    # relay's grace period counts from.
    flag_column, flag = (", handed_off, created_at", ", true, clock_timestamp()") if collecting else ("", "")
    if tracing.ENABLED:  # each row's traceparent / tracestate headers (NULL: none)
        headers = [tuple(tracing.outbox_headers(e)) for _, _, e in rows]
        parents = [dict(h).get("traceparent") for h in headers]
        states = [dict(h).get("tracestate") for h in headers]
    else:
        headers, parents, states = [()] * len(rows), [None] * len(rows), [None] * len(rows)
    guard_keys = guard[1] if guard else [None] * len(rows)
    if len(guard_keys) != len(rows):
        raise ValueError("one guard key per row")
    where = f"WHERE g IN ({guard[0]})" if guard else ""
    cte = f"""emitted AS (INSERT INTO outbox (topic, key, value, header_keys, header_values{flag_column})
                  SELECT t, k, v,
                         CASE WHEN tp IS NULL THEN '{{}}'::text[] WHEN ts IS NULL THEN ARRAY['traceparent']
                              ELSE ARRAY['traceparent', 'tracestate'] END,
                         CASE WHEN tp IS NULL THEN '{{}}'::bytea[] WHEN ts IS NULL THEN ARRAY[tp]
                              ELSE ARRAY[tp, ts] END{flag}
                  FROM unnest({n[0]}::text[], {n[1]}::bytea[], {n[2]}::bytea[], {n[3]}::bytea[], {n[4]}::bytea[],
                              {n[5]}::text[]) WITH ORDINALITY AS u(t, k, v, tp, ts, g, n)
                  {where} ORDER BY n RETURNING id)"""
    return Emitting(cte, [topics_, keys, values, parents, states, guard_keys],
                    [(t, k, v, h) for t, k, v, h in zip(topics_, keys, values, headers)], collecting)


async def write_with(conn: asyncpg.Connection, ctes: str | None, args: list, rows: list[Row]) -> None:
    """Run the caller's data-modifying `ctes` (parameters `$1`..`$len(args)`) and insert the outbox
    `rows` in the same statement: a round trip for both. Ids follow the list order."""
    if not rows:
        if ctes:
            raise ValueError("write_with needs rows to emit")
        return
    e = emitting(rows, len(args) + 1)
    head = f"WITH {ctes}, {e.cte}" if ctes else f"WITH {e.cte}"
    if not e.collecting:
        await conn.execute(f"{head} {NOTIFY_EMITTED}", *args, *e.args)
        return
    e.written([r[0] for r in await conn.fetch(f"{head} SELECT id FROM emitted", *args, *e.args)])


async def add_many(conn: asyncpg.Connection, rows: list[Row]) -> None:
    """`add` for many (topic, key, envelope) rows in one statement; ids follow the list order."""
    await write_with(conn, None, [], rows)


class Relay:
    """Publishes one schema's outbox rows that nobody handed off (or that a hand-off missed). One
    relay per schema is active at a time (advisory lock), so those go out in id order. Every
    copy of a service sends and stamps the rows its own transactions hand off (`hand_off`)."""

    def __init__(self, dsn: str, schema: str, pool: asyncpg.Pool, producer: AIOKafkaProducer,
                 batch_size: int = 500, retention_hours: int = 24,
                 handoff_grace_seconds: float = HANDOFF_GRACE_SECONDS):
        self.dsn, self.schema, self.pool, self.producer = dsn, schema, pool, producer
        self.batch_size = batch_size
        self.retention_hours = retention_hours
        self.handoff_grace_seconds = handoff_grace_seconds
        self._wake = asyncio.Event()
        self._handed: set[int] = set()  # handed off and not stamped yet: the sweep leaves them alone
        self._sent: list[int] = []      # handed off, in Kafka, to stamp
        self._sending: set[asyncio.Task] = set()

    async def run(self) -> None:
        stamper = asyncio.create_task(self._stamp_handed_off(), name="outbox-stamper")
        try:
            while True:
                try:
                    await self._run_locked()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # Kafka or Postgres away: keep the rows, try again
                    log.warning("outbox relay error, retrying", error=repr(exc))
                    await asyncio.sleep(1)
        finally:
            stamper.cancel()
            await asyncio.gather(stamper, return_exceptions=True)

    async def hand_off(self, rows: list[Written]) -> None:
        """Send the rows a transaction wrote (`collecting`) right after its commit, in their order;
        they are stamped once Kafka has them all. Never raises and never waits for the broker: a
        row that is not sent stays unpublished, and the active relay sends it after
        `handoff_grace_seconds`."""
        if not rows:
            return
        ids = [r.id for r in rows]
        self._handed.update(ids)
        try:
            futures, spans = await self._send(rows)
        except Exception as exc:
            log.warning("outbox hand-off failed; the relay will publish the rows", rows=len(rows), error=repr(exc))
            self._handed.difference_update(ids)
            return
        task = asyncio.create_task(self._await_sent(rows, futures, spans))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _await_sent(self, rows: list[Written], futures: list, spans: list) -> None:
        try:
            await self._delivered(rows, futures, spans)
        except BaseException as exc:
            self._handed.difference_update(r.id for r in rows)
            if not isinstance(exc, asyncio.CancelledError):
                log.warning("outbox hand-off not acknowledged; the relay will publish the rows",
                            rows=len(rows), error=repr(exc))
            return
        self._sent.extend(r.id for r in rows)

    async def _stamp_handed_off(self) -> None:
        """Stamp the handed-off rows Kafka has, every `STAMP_WAIT_SECONDS`, in one statement; at
        shutdown once more (a row left unstamped is published again after the restart)."""
        try:
            while True:
                await asyncio.sleep(STAMP_WAIT_SECONDS)
                await self._stamp_sent()
        finally:
            with contextlib.suppress(BaseException):
                if self._sending:
                    await asyncio.wait(set(self._sending), timeout=1.0)
                await asyncio.wait_for(self._stamp_sent(), timeout=2.0)

    async def _stamp_sent(self) -> None:
        ids, self._sent = self._sent, []
        if not ids:
            return
        try:
            await self._stamp(ids)
        except Exception as exc:  # Postgres away: try again with the next ones
            self._sent = ids + self._sent
            log.warning("stamping handed-off outbox rows failed, retrying", error=repr(exc))
            return
        self._handed.difference_update(ids)

    async def _run_locked(self) -> None:
        lock_conn = await asyncpg.connect(self.dsn, server_settings={"application_name": f"danbao-{self.schema}-relay"})
        try:
            while not await lock_conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", f"outbox:{self.schema}"):
                await asyncio.sleep(1)
            await lock_conn.add_listener(channel(self.schema), lambda *_: self._wake.set())
            log.info("outbox relay active", schema=self.schema)
            last_purge = 0.0
            loop = asyncio.get_running_loop()
            published: list[int] = []  # ids published and not stamped yet
            while True:
                self._wake.clear()
                rows = await self._stamp_and_fetch(published)
                published = await self._publish(rows)
                if loop.time() - last_purge > 60:
                    await self._purge()
                    last_purge = loop.time()
                if len(rows) < self.batch_size and not await self._woken(STAMP_WAIT_SECONDS if published else 1.0):
                    # Nothing more came soon: the stamp goes alone (else with the next run's read).
                    await self._stamp(published)
                    published = []
                    await self._woken(1.0)
                if lock_conn.is_closed():
                    raise ConnectionError("relay lock connection lost")
        finally:
            await lock_conn.close()

    async def _woken(self, timeout: float) -> bool:
        """Wait up to `timeout` s for a commit's notification; whether one came."""
        if not self._wake.is_set():
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=timeout)
            except asyncio.TimeoutError:
                return False
        return True

    async def _stamp_and_fetch(self, published: list[int]) -> list[Written]:
        """Stamp the rows of the last run (if any) and read the next ones, in one round trip while more
        rows keep coming (the read's snapshot does not see the stamp, hence the id filter). Rows
        handed off by the process that wrote them are left to it for `handoff_grace_seconds`, and
        for good while this process has them in hand."""
        rows = await self.pool.fetch(
            """WITH stamped AS (UPDATE outbox SET published_at = now() WHERE id = ANY($2::bigint[]))
               SELECT id, topic, key, value, header_keys, header_values FROM outbox
               WHERE published_at IS NULL AND id <> ALL($2::bigint[]) AND id <> ALL($3::bigint[])
                 AND (NOT handed_off OR created_at < now() - make_interval(secs => $4))
               ORDER BY id LIMIT $1""",
            self.batch_size, published, list(self._handed), self.handoff_grace_seconds)
        return [Written(r["id"], r["topic"], r["key"], r["value"], tuple(zip(r["header_keys"], r["header_values"])))
                for r in rows]

    async def _stamp(self, published: list[int]) -> None:
        if published:
            await self.pool.execute("UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])", published)

    async def _send(self, rows: list[Written]) -> tuple[list, list]:
        """Hand the rows to the producer in order: (their delivery futures, their `send` spans)."""
        futures, spans = [], []
        try:
            for r in rows:
                headers = list(r.headers)
                if tracing.ENABLED and headers:  # a `send` span per traced row; its traceparent goes out
                    headers, span = tracing.publishing(r.topic, headers, r.key)
                    if span is not None:
                        spans.append(span)
                futures.append(await self.producer.send(r.topic, value=r.value, key=r.key, headers=headers))
        except BaseException as exc:
            tracing.end_all(spans, exc)
            raise
        return futures, spans

    async def _publish(self, rows: list[Written]) -> list[int]:
        """Send the rows in id order and wait until Kafka has them all; their ids."""
        if not rows:
            return []
        await self._delivered(rows, *await self._send(rows))
        return [r.id for r in rows]

    @staticmethod
    async def _delivered(rows: list[Written], futures: list, spans: list) -> None:
        """Wait until Kafka has every row `_send` handed over; end their spans, count them."""
        try:
            await asyncio.gather(*futures)
        except BaseException as exc:
            tracing.end_all(spans, exc)
            raise
        tracing.end_all(spans)
        for r in rows:
            metrics.OUTBOX_PUBLISHED.labels(topic=r.topic).inc()

    async def _purge(self) -> None:
        """Delete rows published more than `retention_hours` ago, from the oldest id up to the
        first row not yet published or published since: an id range (the primary key) instead
        of a scan of the whole outbox, which holds a day of events at full rate. A row behind
        that first one waits for the next purge that passes it."""
        await self.pool.execute(
            """DELETE FROM outbox WHERE published_at < now() - make_interval(hours => $1)
                   AND id < coalesce((SELECT id FROM outbox
                                      WHERE published_at IS NULL OR published_at >= now() - make_interval(hours => $1)
                                      ORDER BY id LIMIT 1), 9223372036854775807)""", self.retention_hours)
        backlog = await self.pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        metrics.OUTBOX_BACKLOG.set(backlog)
