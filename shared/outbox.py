"""Transactional outbox and its relay.

Handlers call `add` / `add_raw` on the connection of their transaction, so an event is stored
exactly when the state change that emits it commits. The relay publishes stored rows in id
order with an idempotent producer (acks=all) and only then stamps them published: a crash
between commit and publish means the row is published after the restart, never lost. A crash
after publish and before the stamp republishes it; consumers deduplicate on event_id.
"""
from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import structlog
from aiokafka import AIOKafkaProducer

from shared import events, metrics, tracing

log = structlog.get_logger("outbox")


# How long published rows may wait for their stamp, to go with the next run's read. A crash in
# that window publishes them again (consumers deduplicate on event_id), as after any crash
# between publish and stamp.
STAMP_WAIT_SECONDS = 0.5


def channel(schema: str) -> str:
    return f"outbox_{schema}"


async def add(conn: asyncpg.Connection, topic: str, key: str | None, envelope: dict[str, Any]) -> None:
    # Tracing on: the row carries the traceparent of the span it is written in (shared/tracing.py).
    await add_raw(conn, topic, key.encode() if key is not None else None, events.encode(envelope),
                  tracing.outbox_headers(envelope) if tracing.ENABLED else ())


async def add_raw(conn: asyncpg.Connection, topic: str, key: bytes | None, value: bytes | None,
                  headers: list[tuple[str, bytes]] = ()) -> None:
    # One round trip: the row and the relay's wake-up call (delivered at commit, deduplicated
    # by Postgres within the transaction).
    await conn.execute(
        """WITH row AS (INSERT INTO outbox (topic, key, value, header_keys, header_values)
                        VALUES ($1, $2, $3, $4, $5) RETURNING 1)
           SELECT pg_notify('outbox_' || current_schema(), '') FROM row""",
        topic, key, value, [k for k, _ in headers], [v for _, v in headers],
    )


Row = tuple[str, str | None, dict[str, Any]]  # (topic, key, envelope)

# The relay's wake-up call, once for any number of rows (delivered at commit, deduplicated by
# Postgres within the transaction); `emitted` is the rows' data-modifying CTE.
NOTIFY_EMITTED = "SELECT pg_notify('outbox_' || current_schema(), '') FROM (SELECT 1 FROM emitted LIMIT 1) AS any_row"


def emitting(rows: list[Row], first: int) -> tuple[str, list]:
    """`add_many`'s insert as the CTE `emitted` of a caller's statement, its parameters numbered
    from `$first`: (the CTE, its arguments). End the statement with `NOTIFY_EMITTED`."""
    n = [f"${first + i}" for i in range(5)]
    topics_, keys, values = ([t for t, _, _ in rows], [k.encode() if k is not None else None for _, k, _ in rows],
                             [events.encode(e) for _, _, e in rows])
    if not tracing.ENABLED:
        return (f"""emitted AS (INSERT INTO outbox (topic, key, value)
                         SELECT t, k, v FROM unnest({n[0]}::text[], {n[1]}::bytea[], {n[2]}::bytea[])
                              WITH ORDINALITY AS u(t, k, v, n)
                         ORDER BY n RETURNING 1)""", [topics_, keys, values])
    # Tracing on: each row's traceparent / tracestate headers (NULL: none).
    parents, states = [], []
    for _, _, e in rows:
        headers = dict(tracing.outbox_headers(e))
        parents.append(headers.get("traceparent"))
        states.append(headers.get("tracestate"))
    return (f"""emitted AS (INSERT INTO outbox (topic, key, value, header_keys, header_values)
                     SELECT t, k, v,
                            CASE WHEN tp IS NULL THEN '{{}}'::text[] WHEN ts IS NULL THEN ARRAY['traceparent']
                                 ELSE ARRAY['traceparent', 'tracestate'] END,
                            CASE WHEN tp IS NULL THEN '{{}}'::bytea[] WHEN ts IS NULL THEN ARRAY[tp]
                                 ELSE ARRAY[tp, ts] END
                     FROM unnest({n[0]}::text[], {n[1]}::bytea[], {n[2]}::bytea[], {n[3]}::bytea[], {n[4]}::bytea[])
                          WITH ORDINALITY AS u(t, k, v, tp, ts, n)
                     ORDER BY n RETURNING 1)""", [topics_, keys, values, parents, states])


async def add_many(conn: asyncpg.Connection, rows: list[Row]) -> None:
    """`add` for many (topic, key, envelope) rows in one statement; ids follow the list order."""
    if not rows:
        return
    cte, args = emitting(rows, 1)
    await conn.execute(f"WITH {cte} {NOTIFY_EMITTED}", *args)


class Relay:
    """Publishes one schema's outbox. One relay per schema is active at a time (advisory lock),
    which keeps per-key order when several copies of a service run."""

    def __init__(self, dsn: str, schema: str, pool: asyncpg.Pool, producer: AIOKafkaProducer,
                 batch_size: int = 500, retention_hours: int = 24):
        self.dsn, self.schema, self.pool, self.producer = dsn, schema, pool, producer
        self.batch_size = batch_size
        self.retention_hours = retention_hours
        self._wake = asyncio.Event()
        # Fault injection for the restart-safety test: die after reading rows, before publishing.

    async def run(self) -> None:
        while True:
            try:
                await self._run_locked()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Kafka or Postgres away: keep the rows, try again
                log.warning("outbox relay error, retrying", error=repr(exc))
                await asyncio.sleep(1)

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

    async def _stamp_and_fetch(self, published: list[int]) -> list[asyncpg.Record]:
        """Stamp the rows of the last run (if any) and read the next ones, in one round trip while more
        rows keep coming (the read's snapshot does not see the stamp, hence the id filter)."""
        return await self.pool.fetch(
            """WITH stamped AS (UPDATE outbox SET published_at = now() WHERE id = ANY($2::bigint[]))
               SELECT id, topic, key, value, header_keys, header_values FROM outbox
               WHERE published_at IS NULL AND id <> ALL($2::bigint[]) ORDER BY id LIMIT $1""",
            self.batch_size, published)

    async def _stamp(self, published: list[int]) -> None:
        if published:
            await self.pool.execute("UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])", published)

    async def _publish(self, rows: list[asyncpg.Record]) -> list[int]:
        """Send the rows in id order and wait until Kafka has them all; their ids."""
        if not rows:
            return []
        futures, spans = [], []
        try:
            for r in rows:
                headers = list(zip(r["header_keys"], r["header_values"]))
                if tracing.ENABLED and headers:  # a `send` span per traced row; its traceparent goes out
                    headers, span = tracing.publishing(r["topic"], headers, r["key"])
                    if span is not None:
                        spans.append(span)
                futures.append(await self.producer.send(r["topic"], value=r["value"], key=r["key"], headers=headers))
            await asyncio.gather(*futures)
        except BaseException as exc:
            tracing.end_all(spans, exc)
            raise
        tracing.end_all(spans)
        for r in rows:
            metrics.OUTBOX_PUBLISHED.labels(topic=r["topic"]).inc()
        return [r["id"] for r in rows]

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
