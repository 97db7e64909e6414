"""The main job, for now a smoke run across the backbone (`./danbao demo`):

registers users at the gateway, watches their UserRegistered events reach the credit service,
publishes upstream order events (good, duplicated, malformed) to orders.events with a plain
Kafka client, and prints what happened: payments, dead letters and payments.events outcomes.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from shared.settings import DEFAULT_URLS

KAFKA = os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or "127.0.0.1:9092"
URLS = {n: (os.environ.get(f"{n.upper()}_URL") or u).rstrip("/") for n, u in DEFAULT_URLS.items()}


def envelope(type_: str, data: dict) -> bytes:
    return json.dumps({"event_id": str(uuid.uuid4()), "type": type_, "version": 1,
                       "occurred_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source": "demo-shop",
                       "correlation_id": data.get("order_id"), "data": data}).encode()


async def end_offsets(producer: AIOKafkaProducer, topic: str) -> dict[TopicPartition, int]:
    tps = [TopicPartition(topic, p) for p in await producer.partitions_for(topic)]
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA)
    await consumer.start()
    try:
        return await consumer.end_offsets(tps)
    finally:
        await consumer.stop()


async def read_new(topic: str, since: dict[TopicPartition, int], want: int, timeout: float = 20) -> list:
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA, enable_auto_commit=False)
    await consumer.start()
    records: list = []
    try:
        consumer.assign(list(since))
        for tp, offset in since.items():
            consumer.seek(tp, offset)
        deadline = time.monotonic() + timeout
        while len(records) < want and time.monotonic() < deadline:
            for recs in (await consumer.getmany(timeout_ms=300)).values():
                records.extend(recs)
        return records
    finally:
        await consumer.stop()


async def main() -> int:
    token = os.environ.get("DANBAO_API_TOKEN")
    if not token:
        print("DANBAO_API_TOKEN is not set (./danbao demo sets it from .data/secrets.env)", file=sys.stderr)
        return 2
    headers = {"Authorization": f"Bearer {token}"}
    run = uuid.uuid4().hex[:6]
    gateway = httpx.AsyncClient(base_url=URLS["gateway"], headers=headers, timeout=10)
    credit = httpx.AsyncClient(base_url=URLS["credit"], headers=headers, timeout=10)
    producer = AIOKafkaProducer(bootstrap_servers=KAFKA, acks="all")
    await producer.start()
    try:
        print(f"== demo run {run}: registering users at the gateway ({URLS['gateway']})")
        users = [f"buyer-{run}", f"seller-{run}", f"student-{run}"]
        births = ["1990-03-14", "1985-07-01", "2010-09-09"]
        for user_id, birth in zip(users, births):
            body = {"user_id": user_id, "full_name": f"Demo {user_id}", "birth_date": birth,
                    "phone": f"139{uuid.uuid4().int % 10**8:08d}", "id_number": f"ID{uuid.uuid4().hex[:16]}",
                    "real_name_verified": True}
            r = await gateway.post("/v1/users", json=body)
            print(f"   POST /v1/users {user_id:<22} -> {r.status_code}")

        print(f"== waiting for UserRegistered to cross Kafka into the credit service ({URLS['credit']})")
        started = time.monotonic()
        for user_id in users:
            while (await credit.get(f"/v1/credit-profiles/{user_id}")).status_code != 200:
                if time.monotonic() - started > 30:
                    print(f"   {user_id} never reached credit", file=sys.stderr)
                    return 1
                await asyncio.sleep(0.1)
            print(f"   credit profile {user_id:<22} present after {time.monotonic() - started:.2f}s")

        dlq_start = await end_offsets(producer, "orders.events.dlq")
        pay_start = await end_offsets(producer, "payments.events")
        order_ok, order_dup = f"o-{run}-1", f"o-{run}-2"
        placed = {"order_id": order_ok, "buyer_id": users[0], "seller_id": users[1], "amount": 19_900,
                  "currency": "CNY", "payment_method": "balance"}
        print("== publishing upstream records to orders.events")
        records = [
            ("OrderPlaced (good)", envelope("OrderPlaced", placed), order_ok),
            ("OrderPlaced (same order, new event)", envelope("OrderPlaced", {**placed, "amount": 1}), order_ok),
            ("not JSON", b"{oops", order_dup),
            ("negative amount", envelope("OrderPlaced", {**placed, "order_id": order_dup, "amount": -100}), order_dup),
            ("unknown type", envelope("OrderVanished", {"order_id": order_dup}), order_dup),
        ]
        for label, raw, key in records:
            await producer.send_and_wait("orders.events", raw, key=key.encode())
            print(f"   sent {label}")

        dead = await read_new("orders.events.dlq", dlq_start, want=3)
        outcomes = await read_new("payments.events", pay_start, want=1)
        payment = (await gateway.get(f"/v1/payments/{order_ok}")).json()

        print("\n== summary")
        print(f"   {'what':<34}{'result'}")
        print(f"   {'users registered':<34}{len(users)}")
        print(f"   {'profiles in credit':<34}{len(users)}")
        print(f"   {'payment ' + order_ok:<34}{payment.get('status')} {payment.get('amount')} fen")
        for r in outcomes:
            v = json.loads(r.value)
            print(f"   {'payments.events':<34}{v['type']} {v['data'].get('reason_code', '')} ({v['data']['order_id']})")
        for r in dead:
            h = {k: v.decode() for k, v in r.headers}
            print(f"   {'orders.events.dlq':<34}{h['error.code']} (offset {h['original.offset']})")
        ok = payment.get("status") == "PENDING" and len(dead) >= 3 and len(outcomes) >= 1
        print(f"\n   result: {'OK' if ok else 'UNEXPECTED'}")
        return 0 if ok else 1
    finally:
        await producer.stop()
        await gateway.aclose()
        await credit.aclose()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
