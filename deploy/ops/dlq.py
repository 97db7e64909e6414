"""Dead letters (`./danbao dlq list|show|replay`).

A dead letter is the original record, byte for byte, on `<topic>.dlq`, with the record's own
headers and then `error.code`, `error.message`, `original.topic|partition|offset`. It is named
here by its position on the dead-letter topic: `orders.events.dlq:0:12`.

Replay publishes the record (or an edited copy) to its original topic with its original key,
where the consumer validates and applies it as it does every record: replay never goes around
validation, and the same check runs here first so that an operator hears at once that the copy
is still invalid. Each dead letter is replayed at most once: the replay is recorded in the
`danbao_ops.dlq_replays` table before it is published, and a second replay of the same dead
letter is refused with the first one's details. Even a replay that was published but not
recorded (a crash in between) has its effect once, because the copy keeps its `event_id` and
the consumers' inbox applies an event id once.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from deploy.ops.common import dsn, kafka_kwargs
from shared import events
from shared.events import DecodeError

ERROR_HEADERS = ("error.code", "error.message", "original.topic", "original.partition", "original.offset")
REPLAY_HEADER = "danbao.replay.of"

_SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS danbao_ops;
CREATE TABLE IF NOT EXISTS danbao_ops.dlq_replays (
    dead_letter   text PRIMARY KEY,     -- <dlq topic>:<partition>:<offset>
    topic         text        NOT NULL,  -- where the copy went
    event_id      text,
    edited        boolean     NOT NULL,
    operator      text        NOT NULL,
    replayed_at   timestamptz NOT NULL DEFAULT now(),
    published     boolean     NOT NULL DEFAULT false
);
"""


class ReplayError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class DeadLetter:
    topic: str
    partition: int
    offset: int
    timestamp: datetime
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    @property
    def position(self) -> str:
        return f"{self.topic}:{self.partition}:{self.offset}"

    def header(self, name: str) -> str | None:
        for k, v in reversed(self.headers):  # the error headers come last
            if k == name:
                return v.decode("utf-8", "replace")
        return None

    @property
    def own_headers(self) -> list[tuple[str, bytes]]:
        """The original record's headers, without the error headers the dead-lettering added."""
        return [(k, v) for k, v in self.headers if k not in ERROR_HEADERS and k != REPLAY_HEADER]

    @property
    def original_topic(self) -> str:
        return self.header("original.topic") or self.topic.removesuffix(".dlq")

    def summary(self) -> dict[str, Any]:
        env = decoded(self.value)
        return {"position": self.position, "at": self.timestamp, "code": self.header("error.code"),
                "message": self.header("error.message"), "original_topic": self.original_topic,
                "original_partition": self.header("original.partition"),
                "original_offset": self.header("original.offset"),
                "key": self.key.decode("utf-8", "replace") if self.key is not None else None,
                "type": env.get("type") if isinstance(env, dict) else None,
                "event_id": env.get("event_id") if isinstance(env, dict) else None,
                "replay_of": self.header(REPLAY_HEADER)}

    def detail(self) -> dict[str, Any]:
        out = self.summary()
        out["headers"] = {k: v.decode("utf-8", "replace") for k, v in self.headers}
        env = decoded(self.value)
        out["value"] = env if env is not None else (self.value.decode("utf-8", "replace") if self.value else None)
        out["value_is_json"] = env is not None
        return out


def decoded(value: bytes | None) -> Any:
    try:
        return json.loads(value.decode("utf-8")) if value is not None else None
    except (ValueError, UnicodeDecodeError):
        return None


def parse_position(position: str) -> tuple[str, int, int]:
    topic, _, rest = position.rpartition(":")
    topic, _, partition = topic.rpartition(":")
    try:
        if not topic.endswith(".dlq"):
            raise ValueError
        return topic, int(partition), int(rest)
    except ValueError:
        raise ReplayError("INVALID_POSITION", f"{position!r} is not <topic>.dlq:<partition>:<offset>") from None


async def dlq_topics() -> list[str]:
    admin = AIOKafkaAdminClient(**kafka_kwargs())
    await admin.start()
    try:
        return sorted(t for t in await admin.list_topics() if t.endswith(".dlq"))
    finally:
        await admin.close()


async def read(topics: list[str] | None = None, *, only: tuple[str, int, int] | None = None) -> list[DeadLetter]:
    """Every record on the dead-letter topics (or just the one at `only`)."""
    names = [only[0]] if only else (topics or await dlq_topics())
    consumer = AIOKafkaConsumer(**kafka_kwargs(), enable_auto_commit=False, group_id=None)
    await consumer.start()
    found: list[DeadLetter] = []
    try:
        tps = []
        for t in names:
            parts = consumer.partitions_for_topic(t)
            if parts is None:
                await consumer._client.force_metadata_update()  # noqa: SLF001 - a fresh client may not know it yet
                parts = consumer.partitions_for_topic(t) or set()
            tps += [TopicPartition(t, p) for p in sorted(parts) if not only or p == only[1]]
        if not tps:
            return []
        consumer.assign(tps)
        begin, end = await consumer.beginning_offsets(tps), await consumer.end_offsets(tps)
        todo = {}
        for tp in tps:
            start = begin[tp]
            if only:
                if not (begin[tp] <= only[2] < end[tp]):
                    return []
                start, end[tp] = only[2], only[2] + 1
            if start < end[tp]:
                consumer.seek(tp, start)
                todo[tp] = end[tp]
            else:
                consumer.pause(tp)
        while todo:
            batch = await consumer.getmany(*todo.keys(), timeout_ms=2000)
            if not batch:
                break
            for tp, records in batch.items():
                for r in records:
                    if tp in todo and r.offset < todo[tp]:
                        found.append(DeadLetter(r.topic, r.partition, r.offset,
                                                datetime.fromtimestamp(r.timestamp / 1000, timezone.utc), r.key, r.value,
                                                [(k, bytes(v or b"")) for k, v in (r.headers or ())]))
                    if r.offset + 1 >= todo.get(tp, 0):
                        todo.pop(tp, None)
                        consumer.pause(tp)
    finally:
        await consumer.stop()
    return sorted(found, key=lambda d: (d.timestamp, d.topic, d.partition, d.offset))


async def show(position: str) -> DeadLetter:
    topic, partition, offset = parse_position(position)
    found = await read(only=(topic, partition, offset))
    if not found:
        raise ReplayError("NOT_FOUND", f"no dead letter at {position}")
    return found[0]


def validate(topic: str, value: bytes) -> dict[str, Any]:
    """The consumer's own check for `topic`; ReplayError with its error code when it fails."""
    schemas = events.SCHEMAS.get(topic)
    if schemas is None:
        raise ReplayError("UNKNOWN_TOPIC", f"no schema known for topic {topic}")
    try:
        env, _ = events.decode(value, schemas, topic)
    except DecodeError as exc:
        raise ReplayError(exc.code, f"the copy would be dead-lettered again: {exc.message}") from None
    return {"event_id": env.event_id, "type": env.type}


async def history(limit: int = 100) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn("gateway"))
    try:
        await conn.execute(_SCHEMA_SQL)
        return [dict(r) for r in await conn.fetch(
            "SELECT * FROM danbao_ops.dlq_replays ORDER BY replayed_at DESC LIMIT $1", limit)]
    finally:
        await conn.close()


async def replay(position: str, *, value: bytes | None = None, operator: str = "operator") -> dict[str, Any]:
    """Send the dead letter at `position` (or `value`, an edited copy of it) back to its topic, once."""
    letter = await show(position)
    target = letter.original_topic
    new_value = value if value is not None else letter.value
    if new_value is None:
        raise ReplayError("INVALID_JSON", "the dead letter has no value to replay")
    checked = validate(target, new_value)
    conn = await asyncpg.connect(dsn("gateway"))
    try:
        await conn.execute(_SCHEMA_SQL)
        async with conn.transaction():
            row = await conn.fetchrow(
                """INSERT INTO danbao_ops.dlq_replays (dead_letter, topic, event_id, edited, operator)
                   VALUES ($1, $2, $3, $4, $5) ON CONFLICT (dead_letter) DO NOTHING RETURNING *""",
                letter.position, target, checked["event_id"], value is not None and value != letter.value, operator)
            if row is None:
                first = await conn.fetchrow("SELECT * FROM danbao_ops.dlq_replays WHERE dead_letter = $1", letter.position)
                raise ReplayError("ALREADY_REPLAYED", f"{letter.position} was already replayed to {first['topic']} at "
                                  f"{first['replayed_at'].isoformat()} by {first['operator']} (event {first['event_id']})")
            producer = AIOKafkaProducer(**kafka_kwargs(), enable_idempotence=True, acks="all")
            await producer.start()
            try:
                meta = await producer.send_and_wait(target, new_value, key=letter.key,
                                                    headers=letter.own_headers + [(REPLAY_HEADER, letter.position.encode())])
            finally:
                await producer.stop()
            await conn.execute("UPDATE danbao_ops.dlq_replays SET published = true WHERE dead_letter = $1", letter.position)
    finally:
        await conn.close()
    return {"dead_letter": letter.position, "topic": target, "partition": meta.partition, "offset": meta.offset,
            **checked, "edited": dict(row)["edited"]}
