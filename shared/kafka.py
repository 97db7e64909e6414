"""Kafka plumbing: the idempotent producer, topic creation, a readiness probe."""
from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from shared import topics


def make_producer(bootstrap: str) -> AIOKafkaProducer:
    # Idempotent + acks=all: a retried send is written once, and per-partition order holds.
    # No linger: the relay hands over whole batches anyway, and while one produce request is in
    # flight the next batch fills by itself; a linger would only add to every hop's latency.
    return AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all",
                            linger_ms=0, request_timeout_ms=30_000)


async def ensure_topics(bootstrap: str, names: list[str], partitions: int, replication: int = 1) -> None:
    """Create the topics (and their dead-letter topics) that do not exist yet."""
    wanted = set(names) | {topics.dlq(n) for n in names}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = sorted(wanted - existing)
        if missing:
            try:
                await admin.create_topics([NewTopic(n, num_partitions=partitions, replication_factor=replication) for n in missing])
            except TopicAlreadyExistsError:
                pass  # another service created it first
    finally:
        await admin.close()


async def ping(bootstrap: str, timeout: float = 5.0) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    await asyncio.wait_for(admin.start(), timeout)
    try:
        await asyncio.wait_for(admin.list_topics(), timeout)
    finally:
        await admin.close()

