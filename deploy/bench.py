"""Throughput benchmark of the payment saga (`./danbao bench [--orders N]`), against the running
platform: N wallet-funded orders published to orders.events at once, timed until every
PaymentSucceeded is on payments.events. Each saga crosses gateway -> risk engine -> gateway ->
escrow -> gateway, with the outbox, inbox and ledger writes of each step. The goal is 1 000
sagas/s on a 2-core machine; this prints what this machine does, it asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from deploy.demo import KAFKA, URLS, envelope


async def run(orders: int, per_buyer: int) -> int:
    token = os.environ.get("DANBAO_API_TOKEN")
    if not token:
        print("DANBAO_API_TOKEN is not set (./danbao bench sets it)", file=sys.stderr)
        return 2
    run_id = uuid.uuid4().hex[:6]
    gateway = httpx.AsyncClient(base_url=URLS["gateway"], headers={"Authorization": f"Bearer {token}"}, timeout=30)
    buyers = [f"bench-{run_id}-b{i}" for i in range(max(1, -(-orders // per_buyer)))]
    seller = f"bench-{run_id}-seller"
    sem = asyncio.Semaphore(20)

    async def setup(user: str, top_up: int) -> None:
        async with sem:
            body = {"user_id": user, "full_name": "Bench", "birth_date": "1990-01-01", "real_name_verified": False}
            (await gateway.post("/v1/users", json=body)).raise_for_status()
            if top_up:
                (await gateway.post(f"/v1/wallets/{user}/top-ups", json={
                    "amount": top_up, "card_token": "tok_bench", "idempotency_key": uuid.uuid4().hex})).raise_for_status()
    print(f"setting up {len(buyers)} buyers ({per_buyer} orders each, under the risk engine's velocity limit)")
    await asyncio.gather(setup(seller, 0), *(setup(b, per_buyer * 1_000) for b in buyers))
    await gateway.aclose()

    producer = AIOKafkaProducer(bootstrap_servers=KAFKA, acks="all", linger_ms=20)
    await producer.start()
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA, enable_auto_commit=False)
    await consumer.start()
    tps = [TopicPartition("payments.events", p) for p in await producer.partitions_for("payments.events")]
    consumer.assign(tps)
    for tp, offset in (await consumer.end_offsets(tps)).items():
        consumer.seek(tp, offset)
    prefix = f"bench-{run_id}-o"
    started = time.monotonic()
    for i in range(orders):
        order_id = f"{prefix}{i}"
        await producer.send("orders.events", envelope("OrderPlaced", {
            "order_id": order_id, "buyer_id": buyers[i // per_buyer], "seller_id": seller, "amount": 1_000,
            "currency": "CNY", "payment_method": "balance"}), key=order_id.encode())
    await producer.flush()
    published = time.monotonic() - started
    outcomes: dict[str, int] = {}
    done = 0
    while done < orders and time.monotonic() - started < 600:
        for records in (await consumer.getmany(timeout_ms=500)).values():
            for r in records:
                event = json.loads(r.value)
                if event["data"]["order_id"].startswith(prefix):
                    outcomes[event["type"]] = outcomes.get(event["type"], 0) + 1
                    done += 1
    elapsed = time.monotonic() - started
    await consumer.stop()
    await producer.stop()
    print(f"published {orders} orders in {published:.2f}s; {done} outcomes in {elapsed:.2f}s: {outcomes}")
    print(f"throughput: {done / elapsed:.0f} payment sagas/s end to end")
    return 0 if done == orders else 1


def main() -> int:
    parser = argparse.ArgumentParser(description="Payment saga throughput against the running platform")
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--per-buyer", type=int, default=15)
    args = parser.parse_args()
    return asyncio.run(run(args.orders, args.per_buyer))


if __name__ == "__main__":
    sys.exit(main())
