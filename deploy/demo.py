"""The main job (`./danbao demo`): a realistic stream of upstream orders through the running
platform, then a summary and the audit.

It registers buyers and sellers at the gateway (and checks that their UserRegistered events
reach the credit service), tops up wallets through the simulated bank channel, then publishes
to orders.events, with a plain Kafka client, a mix of orders: paid from the wallet or by card,
declined, short of balance, with a silent card, confirmed, cancelled, partially refunded,
refunded after release, shipped and auto-confirmed by moving the test clock, plus a malformed
record for the dead-letter topic. It waits for every outcome on payments.events, prints counts
by outcome and the money held, released, refunded and earned, and runs the audit.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import uuid
from collections import Counter

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from deploy.audit import audit_settled
from shared.kafka import client_options
from shared.settings import DEFAULT_URLS

KAFKA = os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or "127.0.0.1:9092"
URLS = {n: (os.environ.get(f"{n.upper()}_URL") or u).rstrip("/") for n, u in DEFAULT_URLS.items()}


def envelope(type_: str, data: dict) -> bytes:
    return json.dumps({"event_id": str(uuid.uuid4()), "type": type_, "version": 1,
                       "occurred_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source": "demo-shop",
                       "correlation_id": data.get("order_id"), "data": data}).encode()


async def register_user(gateway: httpx.AsyncClient, user_id: str) -> None:
    """Registers a Huabei-eligible user (adult, real name verified, a phone and an id number of its own)."""
    body = {"user_id": user_id, "full_name": f"Demo {user_id}", "birth_date": "1990-03-14",
            "phone": f"139{uuid.uuid4().int % 10**8:08d}", "id_number": f"ID{uuid.uuid4().hex[:16]}",
            "real_name_verified": True}
    response = await gateway.post("/v1/users", json=body)
    response.raise_for_status()


async def top_up(gateway: httpx.AsyncClient, user_id: str, amount: int, card_token: str = "tok_demo_visa") -> None:
    response = await gateway.post(f"/v1/wallets/{user_id}/top-ups", json={
        "amount": amount, "card_token": card_token, "idempotency_key": uuid.uuid4().hex})
    response.raise_for_status()


class Outcomes:
    """payments.events from now on, by order."""

    def __init__(self):
        self.by_order: dict[str, list[dict]] = {}
        self.consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA, enable_auto_commit=False, **client_options())

    async def start(self, producer: AIOKafkaProducer) -> None:
        await self.consumer.start()
        tps = [TopicPartition("payments.events", p) for p in await producer.partitions_for("payments.events")]
        self.consumer.assign(tps)
        for tp, offset in (await self.consumer.end_offsets(tps)).items():
            self.consumer.seek(tp, offset)
        self.task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        while True:
            for records in (await self.consumer.getmany(timeout_ms=200)).values():
                for r in records:
                    event = json.loads(r.value)
                    self.by_order.setdefault(event["data"]["order_id"], []).append(event)

    async def wait_for(self, expected: dict[str, int], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(len(self.by_order.get(o, [])) >= n for o, n in expected.items()):
                return True
            await asyncio.sleep(0.2)
        return False

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.consumer.stop()


class Demo:
    def __init__(self, token: str, orders: int, seed: int):
        headers = {"Authorization": f"Bearer {token}"}
        self.http = {n: httpx.AsyncClient(base_url=u, headers=headers, timeout=15) for n, u in URLS.items()}
        self.producer = AIOKafkaProducer(bootstrap_servers=KAFKA, acks="all", linger_ms=5, **client_options())
        self.outcomes = Outcomes()
        self.rng = random.Random(seed)
        self.run = uuid.uuid4().hex[:6]
        self.orders = orders
        self.expected: dict[str, int] = {}  # order -> number of payments.events outcomes
        self.kind: dict[str, str] = {}

    async def close(self) -> None:
        await self.outcomes.stop()
        await self.producer.stop()
        for client in self.http.values():
            await client.aclose()

    async def register(self, user_id: str) -> None:
        await register_user(self.http["gateway"], user_id)

    async def top_up(self, user_id: str, amount: int) -> None:
        await top_up(self.http["gateway"], user_id, amount)

    async def send(self, type_: str, data: dict) -> None:
        await self.producer.send("orders.events", envelope(type_, data), key=data["order_id"].encode())

    async def place(self, kind: str, buyer: str, seller: str, amount: int, method: str, outcomes: int, **extra) -> str:
        order_id = f"o-{self.run}-{len(self.kind):04d}"
        self.kind[order_id] = kind
        self.expected[order_id] = outcomes
        await self.send("OrderPlaced", {"order_id": order_id, "buyer_id": buyer, "seller_id": seller, "amount": amount,
                                        "currency": "CNY", "payment_method": method, **extra})
        return order_id

    async def main(self) -> int:
        await self.producer.start()
        await self.outcomes.start(self.producer)
        clock = await self.http["gateway"].get("/admin/clock")
        controllable = clock.status_code == 200

        # Enough buyers that none trips the risk engine's velocity rule (20 orders a minute).
        buyers = [f"buyer-{self.run}-{i}" for i in range(max(12, self.orders // 8))]
        sellers = [f"seller-{self.run}-{i}" for i in range(4)]
        poor = f"poor-{self.run}"
        print(f"== run {self.run}: registering {len(buyers)} buyers, {len(sellers)} sellers and one buyer with 1 yuan")
        started = time.monotonic()
        await asyncio.gather(*(self.register(u) for u in buyers + sellers + [poor]))
        for u in buyers + sellers:
            while (await self.http["credit"].get(f"/v1/credit-profiles/{u}")).status_code != 200:
                if time.monotonic() - started > 30:
                    print(f"   {u} never reached the credit service", file=sys.stderr)
                    return 1
                await asyncio.sleep(0.05)
        print(f"   all profiles reached the credit service through Kafka in {time.monotonic() - started:.2f}s")
        await asyncio.gather(*(self.top_up(u, 5_000_000) for u in buyers), self.top_up(poor, 100))
        for u in buyers:
            response = await self.http["credit"].post(f"/v1/huabei/{u}/activation")
            response.raise_for_status()
        print("   topped up the buyers' wallets and activated Huabei for them")

        print(f"== publishing {self.orders} orders and their follow-ups to orders.events")
        follow_ups: list[tuple[str, dict]] = []
        auto_confirm: list[str] = []
        kinds = ["confirmed", "huabei_confirmed", "card_confirmed", "shipped_auto", "cancelled", "partial_refund",
                 "refund_after_release", "declined", "insufficient", "silent_card", "held", "huabei_refunded"]
        for i in range(self.orders):
            kind = kinds[i % len(kinds)]
            buyer, seller = self.rng.choice(buyers), self.rng.choice(sellers)
            amount = self.rng.randrange(100, 200_000)
            if kind == "confirmed":
                o = await self.place(kind, buyer, seller, amount, "balance", 2)
                follow_ups.append(("OrderConfirmed", {"order_id": o}))
            elif kind == "huabei_confirmed":
                o = await self.place(kind, buyer, seller, amount // 10, "huabei", 2,
                                     installments=self.rng.choice([1, 3, 6]))
                follow_ups.append(("OrderConfirmed", {"order_id": o}))
            elif kind == "huabei_refunded":
                o = await self.place(kind, buyer, seller, amount // 10, "huabei", 2)
                follow_ups.append(("OrderCancelled", {"order_id": o, "reason": "out of stock"}))
            elif kind == "card_confirmed":
                o = await self.place(kind, buyer, seller, amount, "bank_card", 2, card_token="tok_demo_visa")
                follow_ups.append(("OrderConfirmed", {"order_id": o}))
            elif kind == "shipped_auto":
                o = await self.place(kind, buyer, seller, amount, "balance", 2 if controllable else 1,
                                     auto_confirm_days=self.rng.randint(1, 10))
                follow_ups.append(("OrderShipped", {"order_id": o}))
                auto_confirm.append(o)
            elif kind == "cancelled":
                o = await self.place(kind, buyer, seller, amount, "balance", 2)
                follow_ups.append(("OrderCancelled", {"order_id": o, "reason": "buyer changed their mind"}))
            elif kind == "partial_refund":
                o = await self.place(kind, buyer, seller, amount, "bank_card", 3, card_token="tok_demo_mc")
                follow_ups += [("RefundRequested", {"order_id": o, "refund_id": "r-1", "amount": amount // 3,
                                                    "reason": "one item missing"}),
                               ("OrderConfirmed", {"order_id": o})]
            elif kind == "refund_after_release":
                o = await self.place(kind, buyer, seller, amount, "balance", 3)
                follow_ups += [("OrderConfirmed", {"order_id": o}),
                               ("RefundRequested", {"order_id": o, "refund_id": "r-1", "amount": amount // 10,
                                                    "reason": "damaged on arrival"})]
            elif kind == "declined":
                await self.place(kind, buyer, seller, amount, "bank_card", 1, card_token="tok_decline")
            elif kind == "insufficient":
                await self.place(kind, poor, seller, amount + 1_000, "balance", 1)
            elif kind == "silent_card":
                await self.place(kind, buyer, seller, amount, "bank_card", 1 if controllable else 0,
                                 card_token="tok_timeout")
            else:
                await self.place(kind, buyer, seller, amount, "balance", 1)
        await self.producer.send_and_wait("orders.events", b'{"this is": "not an order"', key=b"garbage")
        # A shop ships, confirms, cancels and refunds once it has heard that the payment went
        # through (the platform would also keep early follow-ups, or let an early cancel stop the
        # payment, but then the outcomes differ from the ones counted here).
        paid = {o: 1 for o, n in self.expected.items() if n and self.kind[o] != "silent_card"}
        if not await self.outcomes.wait_for(paid, timeout=60):
            print("   not every payment had its outcome within 60 s", file=sys.stderr)
        print(f"   every payment has its outcome after {time.monotonic() - started:.1f}s; sending the shops' follow-ups")
        for type_, data in follow_ups:
            await self.send(type_, data)
        await self.producer.flush()

        if controllable:
            await asyncio.sleep(1)
            now = (await self.http["gateway"].post("/admin/clock", json={"advance_seconds": 11 * 86_400})).json()["now"]
            print(f"   moved the test clock 11 days ahead to {now}: silent cards time out, shipped orders auto-confirm")
        else:
            print("   services run on the system clock: no auto-confirm or channel timeout in this run "
                  "(start them with DANBAO_CLOCK=controllable)")
        settled = await self.outcomes.wait_for(self.expected, timeout=90)
        elapsed = time.monotonic() - started
        return await self.summary(settled, elapsed)

    async def summary(self, settled: bool, elapsed: float) -> int:
        counts: Counter = Counter()
        released = fees = refunded = 0
        for order in self.expected:
            for e in self.outcomes.by_order.get(order, []):
                d = e["data"]
                label = e["type"] + (f" {d['reason_code']}" if d.get("reason_code") else "")
                label += f" ({d['trigger']})" if e["type"] == "FundsReleased" else ""
                counts[label] += 1
                if e["type"] == "FundsReleased":
                    released += d["gross_amount"]
                    fees += d["fee_amount"]
                elif e["type"] == "RefundCompleted":
                    refunded += d["amount"]
        report = await audit_settled(15)
        print(f"\n== summary: {len(self.expected)} orders in {elapsed:.1f}s"
              f"{'' if settled else ' (NOT all outcomes arrived in time)'}")
        print(f"   {'outcome on payments.events':<44}{'count':>8}")
        for label, n in sorted(counts.items()):
            print(f"   {label:<44}{n:>8}")
        figures = report.figures
        print(f"\n   {'money':<44}{'fen':>14}")
        for label, value in (("held in escrow now", figures["escrow holds"]), ("released to sellers (gross)", released),
                             ("refunded to buyers", refunded), ("merchant fees (this run)", fees),
                             ("merchant fee revenue (all time)", figures["merchant fee revenue"]),
                             ("withdrawal fee revenue (all time)", figures["withdrawal fee revenue"])):
            print(f"   {label:<44}{value:>14,}".replace(",", " "))
        print("\n== audit")
        print(report.render())
        return 0 if settled and report.ok else 1


async def run(orders: int, seed: int) -> int:
    token = os.environ.get("DANBAO_API_TOKEN", "").split(",")[0].strip()  # the current token first
    if not token:
        print("DANBAO_API_TOKEN is not set (./danbao demo sets it from .data/secrets.env)", file=sys.stderr)
        return 2
    demo = Demo(token, orders, seed)
    try:
        return await demo.main()
    finally:
        await demo.close()


def main() -> int:
    parser = argparse.ArgumentParser(description="Danbao's main job: a stream of orders, a summary, the audit")
    parser.add_argument("--orders", type=int, default=110)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    return asyncio.run(run(args.orders, args.seed))


if __name__ == "__main__":
    sys.exit(main())
