"""Benchmark of the payment saga against the running platform (`./danbao bench`), with a
monolith reference on the same Postgres.

What is measured
----------------
Every order is a wallet-funded OrderPlaced of 1 000 fen (10 yuan) published to orders.events
with a plain Kafka client. Its saga crosses gateway -> risk engine -> gateway -> escrow ->
gateway, with the outbox, inbox and ledger writes of each step, and ends with one outcome on
payments.events. The benchmark reads payments.events from its end as it stood before the first
order, and notes, on its own monotonic clock, when each order's outcome arrives.

* Max-rate mode (the default, `--orders N`): all N orders are published at once, so the
  platform always has work queued; the maximum sustained rate is N divided by the time from the
  first send to the last outcome. Each order's latency is the time from its own send to the
  arrival of its outcome: with everything queued at once it is mostly waiting in line, so the
  percentiles describe the backlog drain, not an idle platform. The time to the first outcome
  (the pipeline filling) is printed too: it weighs less the more orders there are, so use a few
  thousand for the rate. `--runs K` repeats the measurement K times (fresh buyers each time) and
  prints the range.
* Fixed-rate mode (`--rate R --duration S`, or `--rate R --orders N`): orders are published at R
  per second on a monotonic schedule (order i is due at t0 + i/R; a late wake-up does not shift
  later orders). Latency is measured from an order's *scheduled* send time, so a publisher that
  falls behind cannot hide the delay (no coordinated omission); the publisher's worst lag is
  printed. Reports the achieved publish rate, p50/p95/p99/max latency and the throughput.
* `--baseline`: after the Danbao measurement, the same number of orders and buyers through a
  monolith on the same Postgres (DATABASE_URL), in its own schema `bench_monolith` (created and
  dropped here). Per order, ONE transaction: record the event in an inbox (INSERT ... ON CONFLICT
  DO NOTHING: a redelivery changes nothing), debit the buyer's wallet with no overdraft (a
  conditional UPDATE ... WHERE balance >= amount), insert the payment row and the hold row, and
  two journal rows (debit the buyer's wallet, credit escrow). It runs with 4 concurrent
  connections (the reference), then with 1, and checks its own books afterwards. No Kafka and no
  risk checks: it is the floor cost of the same money movement in one database transaction.
  The ratio printed is Danbao's maximum rate over the monolith's with 4 connections.
  `--baseline-only` runs just the monolith.

Where the time went: after each run the benchmark reads the run's records on the saga's topics
and prints, per step (gateway, risk engine, gateway, escrow, gateway), p50 and p99 of the
difference between the Kafka timestamps of the record a step consumed and the one it produced:
the wait for the step's consumer, its work and its outbox relay together. The slowest step is
the one to look at first. (Read after the CPU is sampled: it does not weigh on the figures.)

Correctness is checked, not assumed: the run fails (exit status 1) when an outcome is missing,
when an outcome is anything but PaymentSucceeded for the right buyer and amount (the buyers are
funded), or when an order gets two outcomes (two different event ids; the same event id seen
twice is an at-least-once redelivery that consumers deduplicate, and is only reported). After the
last outcome the benchmark keeps listening for `--grace` seconds to catch late duplicates.

The buyers are registered and topped up over HTTP before the clock starts. The risk engine
rejects a buyer's 21st order within 60 s (RISK_BUYER_VELOCITY_MAX), so each buyer places at
most `--per-buyer` (15) orders, and orders go to the buyers in turn. Money is integer fen.
The goal is 1 000 sagas/s on a 2-core machine; the benchmark itself (a Python process on the
same cores) is part of the load.

    ./danbao bench                            max rate, 2 000 orders
    ./danbao bench --orders 3000 --runs 3     three max-rate runs and their range
    ./danbao bench --rate 200 --duration 30   latency at 200 orders/s
    ./danbao bench --baseline                 max rate, then the monolith, and the ratio
    ./danbao bench --baseline-only            the monolith only
    ./danbao bench --json out.json            the results as JSON too
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from deploy.demo import KAFKA, URLS, envelope
from shared import topics
from shared.kafka import client_options

AMOUNT = 1_000                # fen per order
ORDERS_TOPIC = topics.ORDERS
PAYMENTS_TOPIC = topics.PAYMENTS
# A wallet payment's way, topic to topic, and who takes each step. A step's time is the
# difference of the two records' Kafka timestamps (set when each was produced): the wait for
# the consumer, the step's work and its outbox relay together.
STAGES = [(topics.ORDERS, topics.RISK_REQUESTS, "gateway"), (topics.RISK_REQUESTS, topics.RISK_DECISIONS, "risk engine"),
          (topics.RISK_DECISIONS, topics.ESCROW_COMMANDS, "gateway"), (topics.ESCROW_COMMANDS, topics.ESCROW_EVENTS, "escrow"),
          (topics.ESCROW_EVENTS, topics.PAYMENTS, "gateway")]
STAGE_TOPICS = [STAGES[0][0]] + [to for _, to, _ in STAGES]
MONOLITH_SCHEMA = "bench_monolith"
MONOLITH_CONNECTIONS = (4, 1)  # the first is the reference for the ratio
DEFAULT_DSN = "postgresql://danbao@127.0.0.1:5432/danbao"


# ---------------------------------------------------------------- workload and statistics
@dataclass(frozen=True)
class Workload:
    """N orders of AMOUNT fen from ceil(N / per_buyer) buyers, dealt to the buyers in turn."""
    run_id: str
    seller: str
    buyers: list[str]
    orders: list[tuple[str, str, str]]  # (order_id, buyer_id, event_id)

    @classmethod
    def make(cls, orders: int, per_buyer: int) -> Workload:
        run_id = uuid.uuid4().hex[:6]
        buyers = [f"bench-{run_id}-b{i}" for i in range(max(1, math.ceil(orders / per_buyer)))]
        return cls(run_id, f"bench-{run_id}-seller", buyers,
                   [(f"bench-{run_id}-o{i}", buyers[i % len(buyers)], str(uuid.uuid4())) for i in range(orders)])

    def funding(self) -> dict[str, int]:
        """Each buyer's wallet: exactly what their orders cost."""
        owed = Counter(buyer for _, buyer, _ in self.orders)
        return {buyer: owed[buyer] * AMOUNT for buyer in self.buyers}


def percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list: the smallest value with at least p % of
    the values at or below it."""
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def latency_ms(latencies: list[float]) -> dict[str, float] | None:
    if not latencies:
        return None
    ordered = sorted(latencies)
    stats = {f"p{p}": percentile(ordered, p) for p in (50, 95, 99)}
    stats |= {"max": ordered[-1], "mean": statistics.fmean(ordered)}
    return {k: round(v * 1000, 1) for k, v in stats.items()}


def ms(value: float) -> str:
    return f"{value:.0f} ms" if value >= 100 else f"{value:.1f} ms"


def latency_line(lat: dict[str, float] | None) -> str:
    if lat is None:
        return "no outcomes"
    return f"p50 {ms(lat['p50'])}, p95 {ms(lat['p95'])}, p99 {ms(lat['p99'])}, max {ms(lat['max'])}"


# ---------------------------------------------------------------- CPU per saga
CPU_GROUPS = (  # (label, what its command line contains), in the order printed
    ("gateway", "services.gateway"), ("risk", "services.risk"), ("escrow", "services.escrow"),
    ("credit", "services.credit"), ("billing", "services.billing"), ("console", "deploy.ops.console"),
    ("postgres", "postgres"), ("kafka", "kafka.Kafka"))


class CpuMeter:
    """User + system CPU time of the platform's local processes (from /proc), per group, and of
    this benchmark itself: CPU per saga does not depend on what else the machine is doing, as
    the rate does. Processes of another machine or container are not seen (then: no figures)."""

    TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @classmethod
    def sample(cls) -> dict[int, tuple[str, int]]:
        """pid -> (group, CPU ticks so far)."""
        seen: dict[int, tuple[str, int]] = {}
        for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            group = "bench" if pid == os.getpid() else next(
                (label for label, marker in CPU_GROUPS if marker in cmdline), None)
            if group:
                seen[pid] = (group, int(fields[11]) + int(fields[12]))  # utime + stime
        return seen

    @classmethod
    def per_saga_ms(cls, before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]],
                    sagas: int) -> dict[str, float] | None:
        """CPU milliseconds per saga by group, and in total, between two samples."""
        if not sagas or not any(group != "bench" for group, _ in after.values()):
            return None
        ticks: Counter = Counter()
        for pid, (group, now) in after.items():
            ticks[group] += now - before.get(pid, (group, 0))[1]
        order = [label for label, _ in CPU_GROUPS] + ["bench"]
        out = {g: round(ticks[g] * 1000 / cls.TICK / sagas, 2) for g in order if ticks[g]}
        out["total"] = round(sum(ticks.values()) * 1000 / cls.TICK / sagas, 2)
        return out


def cpu_line(cpu: dict[str, float] | None) -> str:
    if not cpu:
        return "not measured (the platform's processes are not on this machine)"
    parts = ", ".join(f"{g} {v:.2f}" for g, v in cpu.items() if g != "total")
    ceiling = (os.cpu_count() or 1) * 1000 / cpu["total"] if cpu["total"] else 0
    return f"{cpu['total']:.2f} ms ({parts}); {os.cpu_count()} cores allow at most ~{ceiling:.0f} sagas/s"


# ---------------------------------------------------------------- the platform
async def register_buyers(token: str, work: Workload) -> None:
    """Registers the seller and the buyers at the gateway and tops up the buyers' wallets."""
    sem = asyncio.Semaphore(20)
    async with httpx.AsyncClient(base_url=URLS["gateway"], headers={"Authorization": f"Bearer {token}"},
                                 timeout=30) as gateway:
        async def setup(user: str, top_up: int) -> None:
            async with sem:
                body = {"user_id": user, "full_name": "Bench", "birth_date": "1990-01-01", "real_name_verified": False}
                (await gateway.post("/v1/users", json=body)).raise_for_status()
                if top_up:
                    (await gateway.post(f"/v1/wallets/{user}/top-ups", json={
                        "amount": top_up, "card_token": "tok_bench",
                        "idempotency_key": uuid.uuid4().hex})).raise_for_status()
        await asyncio.gather(setup(work.seller, 0), *(setup(b, amount) for b, amount in work.funding().items()))


class Outcomes:
    """payments.events from its current end: the first outcome of each expected order with its
    local arrival time, later outcomes of the same order (duplicates) and redeliveries."""

    def __init__(self, expected: set[str]):
        self.expected = expected
        self.first: dict[str, tuple[float, dict]] = {}   # order -> (arrival, event)
        self.duplicates: list[dict] = []                 # second and later outcomes (new event ids)
        self.redelivered = 0                             # the same event id again
        self.event_ids: dict[str, set[str]] = {}
        self.complete = asyncio.Event()
        self.consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA, enable_auto_commit=False, fetch_max_wait_ms=50,
                                         **client_options())

    async def start(self, partitions: set[int]) -> None:
        await self.consumer.start()
        tps = [TopicPartition(PAYMENTS_TOPIC, p) for p in partitions]
        self.consumer.assign(tps)
        for tp, offset in (await self.consumer.end_offsets(tps)).items():
            self.consumer.seek(tp, offset)
        self.task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=100)
            arrived = time.monotonic()
            for records in batches.values():
                for r in records:
                    try:
                        event = json.loads(r.value)
                        order = event["data"]["order_id"]
                    except (ValueError, TypeError, KeyError):
                        continue
                    if order not in self.expected:
                        continue
                    seen = self.event_ids.setdefault(order, set())
                    if event.get("event_id") in seen:
                        self.redelivered += 1
                        continue
                    seen.add(event.get("event_id"))
                    if order in self.first:
                        self.duplicates.append(event)
                    else:
                        self.first[order] = (arrived, event)
            if len(self.first) == len(self.expected):
                self.complete.set()

    async def wait(self, timeout: float) -> None:
        """Until every expected order has an outcome, or `timeout` seconds; re-raises a failure
        of the consumer instead of waiting it out."""
        complete = asyncio.create_task(self.complete.wait())
        await asyncio.wait({complete, self.task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        complete.cancel()
        if self.task.done():
            self.task.result()

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.consumer.stop()


def outcome_label(event: dict, buyer: str) -> str:
    data = event["data"]
    if event["type"] == "PaymentSucceeded":
        return "PaymentSucceeded" if (data.get("amount"), data.get("buyer_id")) == (AMOUNT, buyer) \
            else "PaymentSucceeded with a wrong amount or buyer"
    return event["type"] + (f" {data['reason_code']}" if data.get("reason_code") else "")


def stage_latencies(stamps: dict[str, dict[str, int]]) -> list[dict] | None:
    """Per step of STAGES, p50 and p99 in ms over the orders seen on every topic; `stamps` is
    topic -> order -> the Kafka timestamp (ms) of the order's first record there."""
    orders = set.intersection(*(set(stamps.get(t, {})) for t in STAGE_TOPICS))
    if not orders:
        return None
    out = []
    for source, target, step in STAGES:
        took = sorted(stamps[target][o] - stamps[source][o] for o in orders)
        out.append({"step": step, "from": source, "to": target,
                    "p50": float(percentile(took, 50)), "p99": float(percentile(took, 99))})
    return out


def stages_line(stages: list[dict] | None) -> str:
    if not stages:
        return "n/a"
    return " -> ".join(f"{s['step']} {s['p50']:.0f}/{s['p99']:.0f}" for s in stages) + " ms (p50/p99)"


async def read_stamps(since: dict[TopicPartition, int], orders: set[str]) -> dict[str, dict[str, int]]:
    """For each of the run's orders, the timestamp of its first record on each stage topic from
    `since` (the topics' ends before the run) up to their ends now."""
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA, enable_auto_commit=False, **client_options())
    await consumer.start()
    try:
        consumer.assign(list(since))
        end = await consumer.end_offsets(list(since))
        todo = {tp for tp in since if end[tp] > since[tp]}
        for tp in since:
            consumer.seek(tp, since[tp])
        stamps: dict[str, dict[str, int]] = {t: {} for t in STAGE_TOPICS}
        while todo:
            batches = await consumer.getmany(timeout_ms=1000)
            if not batches:
                break  # nothing more comes: count what was read
            for tp, records in batches.items():
                for r in records:
                    try:
                        order = json.loads(r.value)["data"]["order_id"]
                    except (ValueError, TypeError, KeyError):
                        continue
                    if order in orders:
                        stamps[tp.topic].setdefault(order, r.timestamp)
                if records and records[-1].offset + 1 >= end[tp]:
                    todo.discard(tp)
        return stamps
    finally:
        await consumer.stop()


async def stage_ends(producer: AIOKafkaProducer) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA, enable_auto_commit=False, **client_options())
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in STAGE_TOPICS for p in await producer.partitions_for(t)]
        return await consumer.end_offsets(tps)
    finally:
        await consumer.stop()


async def measure_platform(producer: AIOKafkaProducer, token: str, orders: int, per_buyer: int,
                           rate: float | None, timeout: float, grace: float) -> dict:
    """One measurement: max rate (rate None) or fixed rate. Returns the result as a JSON-ready dict."""
    work = Workload.make(orders, per_buyer)
    await register_buyers(token, work)
    buyer_of = {order: buyer for order, buyer, _ in work.orders}
    outcomes = Outcomes(set(buyer_of))
    await outcomes.start(await producer.partitions_for(PAYMENTS_TOPIC))
    since = await stage_ends(producer)
    print(f"   {len(work.funding())} buyers registered and funded; publishing", flush=True)
    try:
        sent: dict[str, float] = {}
        worst_lag = 0.0
        cpu_before = CpuMeter.sample()
        started = time.monotonic()
        for i, (order, buyer, _) in enumerate(work.orders):
            if rate is None:
                sent[order] = time.monotonic()
            else:
                due = started + i / rate
                if due > time.monotonic():
                    await asyncio.sleep(due - time.monotonic())
                worst_lag = max(worst_lag, time.monotonic() - due)
                sent[order] = due
            await producer.send(ORDERS_TOPIC, envelope("OrderPlaced", {
                "order_id": order, "buyer_id": buyer, "seller_id": work.seller, "amount": AMOUNT,
                "currency": "CNY", "payment_method": "balance"}), key=order.encode())
        await producer.flush()
        publish_seconds = time.monotonic() - started
        await outcomes.wait(timeout)
        cpu_after = CpuMeter.sample()
        await asyncio.sleep(grace)  # late duplicates
    finally:
        await outcomes.stop()

    arrivals = [arrived for arrived, _ in outcomes.first.values()]
    elapsed = (max(arrivals) - started) if arrivals else None
    counts = Counter(outcome_label(event, buyer_of[order]) for order, (_, event) in outcomes.first.items())
    succeeded = counts.get("PaymentSucceeded", 0)
    result = {
        "mode": "max_rate" if rate is None else "fixed_rate",
        "orders": orders, "buyers": len(work.buyers), "per_buyer": per_buyer, "target_rate": rate,
        "publish_seconds": round(publish_seconds, 3), "publish_rate": round(orders / publish_seconds, 1),
        "publisher_worst_lag_ms": round(worst_lag * 1000, 1) if rate is not None else None,
        "outcomes": len(outcomes.first), "missing": orders - len(outcomes.first),
        "outcome_counts": dict(sorted(counts.items())),
        "duplicates": len(outcomes.duplicates),
        "duplicate_orders": sorted({e["data"]["order_id"] for e in outcomes.duplicates})[:20],
        "redelivered": outcomes.redelivered,
        "seconds": round(elapsed, 3) if elapsed else None,
        "throughput": round(len(arrivals) / elapsed, 1) if elapsed else 0.0,
        "first_outcome_seconds": round(min(arrivals) - started, 3) if arrivals else None,
        "waited_seconds": timeout,
        "latency_ms": latency_ms([arrived - sent[order] for order, (arrived, _) in outcomes.first.items()]),
        "cpu_ms_per_saga": CpuMeter.per_saga_ms(cpu_before, cpu_after, len(arrivals)),
        "stages_ms": stage_latencies(await read_stamps(since, set(outcomes.first))),
    }
    result["ok"] = result["missing"] == 0 and succeeded == orders and result["duplicates"] == 0
    return result


def print_platform_run(n: int | None, r: dict) -> None:
    head = f"   run {n}: " if n is not None else "   "
    pad = " " * len(head)
    if r["mode"] == "max_rate":
        print(f"{head}published {r['orders']} orders in {r['publish_seconds']:.2f} s; "
              f"{r['outcomes']}/{r['orders']} outcomes in {r['seconds'] or 0:.2f} s "
              f"-> {r['throughput']:.0f} sagas/s (first outcome after {r['first_outcome_seconds'] or 0:.2f} s)")
    else:
        print(f"{head}published {r['orders']} orders at {r['publish_rate']:.1f}/s (target {r['target_rate']:g}/s, "
              f"publisher's worst lag {ms(r['publisher_worst_lag_ms'])}); "
              f"{r['outcomes']}/{r['orders']} outcomes in {r['seconds'] or 0:.2f} s -> {r['throughput']:.1f} sagas/s")
    print(f"{pad}latency (send -> outcome): {latency_line(r['latency_ms'])}")
    print(f"{pad}CPU per saga: {cpu_line(r['cpu_ms_per_saga'])}")
    print(f"{pad}steps (Kafka timestamps): {stages_line(r['stages_ms'])}")
    counts = ", ".join(f"{label} {count}" for label, count in r["outcome_counts"].items()) or "none"
    missing = f"{r['missing']} (waited {r['waited_seconds']:g} s after publishing)" if r["missing"] else "0"
    print(f"{pad}outcomes: {counts}; missing {missing}; duplicates {r['duplicates']}"
          f"{', redelivered ' + str(r['redelivered']) if r['redelivered'] else ''}"
          f"{'' if r['ok'] else '  <- FAILED'}")
    if r["duplicates"]:
        print(f"{pad}orders with two outcomes: {', '.join(r['duplicate_orders'])}")


async def run_platform(args: argparse.Namespace, token: str) -> list[dict]:
    producer = AIOKafkaProducer(bootstrap_servers=KAFKA, acks="all", linger_ms=20 if args.rate is None else 1,
                                **client_options())
    await producer.start()
    try:
        results = []
        for n in range(1, args.runs + 1):
            if n > 1:
                await asyncio.sleep(1)  # let the services finish their follow-up work
            results.append(await measure_platform(producer, token, args.orders, args.per_buyer, args.rate,
                                                  args.timeout, args.grace))
            print_platform_run(n if args.runs > 1 else None, results[-1])
        return results
    finally:
        await producer.stop()


# ---------------------------------------------------------------- the monolith
MONOLITH_DDL = f"""
DROP SCHEMA IF EXISTS {MONOLITH_SCHEMA} CASCADE;
CREATE SCHEMA {MONOLITH_SCHEMA};
SET search_path TO {MONOLITH_SCHEMA};
CREATE TABLE inbox (
    event_id     text PRIMARY KEY,
    received_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE wallets (
    user_id  text PRIMARY KEY,
    balance  bigint NOT NULL CHECK (balance >= 0)
);
CREATE TABLE payments (
    order_id     text PRIMARY KEY,
    payment_id   text        NOT NULL UNIQUE,
    buyer_id     text        NOT NULL,
    seller_id    text        NOT NULL,
    amount       bigint      NOT NULL CHECK (amount > 0),
    status       text        NOT NULL CHECK (status IN ('SUCCEEDED', 'FAILED')),
    reason_code  text,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE holds (
    order_id    text PRIMARY KEY REFERENCES payments (order_id),
    payment_id  text        NOT NULL,
    seller_id   text        NOT NULL,
    amount      bigint      NOT NULL CHECK (amount > 0),
    status      text        NOT NULL DEFAULT 'HELD',
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE journal (
    id          bigserial PRIMARY KEY,
    order_id    text        NOT NULL,
    account     text        NOT NULL,
    side        text        NOT NULL CHECK (side IN ('debit', 'credit')),
    amount      bigint      NOT NULL CHECK (amount > 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX journal_by_order ON journal (order_id);
"""


async def monolith_pay(conn: asyncpg.Connection, order: str, buyer: str, seller: str, event_id: str) -> str:
    """One OrderPlaced, one transaction. Returns succeeded, insufficient_balance or duplicate."""
    async with conn.transaction():
        if not await conn.fetchval(
                "INSERT INTO inbox (event_id) VALUES ($1) ON CONFLICT DO NOTHING RETURNING true", event_id):
            return "duplicate"
        payment_id = f"pay-{order}"
        if await conn.fetchval("UPDATE wallets SET balance = balance - $2 WHERE user_id = $1 AND balance >= $2 "
                               "RETURNING balance", buyer, AMOUNT) is None:
            await conn.execute("INSERT INTO payments (order_id, payment_id, buyer_id, seller_id, amount, status, "
                               "reason_code) VALUES ($1, $2, $3, $4, $5, 'FAILED', 'INSUFFICIENT_BALANCE')",
                               order, payment_id, buyer, seller, AMOUNT)
            return "insufficient_balance"
        await conn.execute("INSERT INTO payments (order_id, payment_id, buyer_id, seller_id, amount, status) "
                           "VALUES ($1, $2, $3, $4, $5, 'SUCCEEDED')", order, payment_id, buyer, seller, AMOUNT)
        await conn.execute("INSERT INTO holds (order_id, payment_id, seller_id, amount) VALUES ($1, $2, $3, $4)",
                           order, payment_id, seller, AMOUNT)
        await conn.execute("INSERT INTO journal (order_id, account, side, amount) "
                           "VALUES ($1, $2, 'debit', $4), ($1, $3, 'credit', $4)",
                           order, f"wallet:{buyer}", f"escrow:{order}", AMOUNT)
        return "succeeded"


async def measure_monolith(dsn: str, orders: int, per_buyer: int, connections: int) -> dict:
    work = Workload.make(orders, per_buyer)
    funding = work.funding()
    settings = {"search_path": MONOLITH_SCHEMA, "application_name": "danbao-bench-monolith"}
    admin = await asyncpg.connect(dsn, server_settings={"application_name": "danbao-bench-monolith"})
    try:
        await admin.execute(MONOLITH_DDL)
        await admin.copy_records_to_table("wallets", records=list(funding.items()), schema_name=MONOLITH_SCHEMA)
        await admin.execute(f"ANALYZE {MONOLITH_SCHEMA}.wallets")
        conns = [await asyncpg.connect(dsn, server_settings=settings) for _ in range(connections)]
        try:
            pending = iter(work.orders)  # shared by the workers: each takes the next order

            async def worker(conn: asyncpg.Connection) -> Counter:
                done: Counter = Counter()
                for order, buyer, event_id in pending:
                    done[await monolith_pay(conn, order, buyer, work.seller, event_id)] += 1
                return done

            started = time.monotonic()
            counts = sum(await asyncio.gather(*(worker(c) for c in conns)), Counter())
            seconds = time.monotonic() - started
            # Not timed: a redelivered event must change nothing.
            replays = Counter([await monolith_pay(conns[0], o, b, work.seller, e) for o, b, e in work.orders[:10]])
        finally:
            for c in conns:
                await c.close()
        books = await admin.fetchrow(f"""
            SELECT (SELECT count(*) FROM {MONOLITH_SCHEMA}.payments WHERE status = 'SUCCEEDED') AS paid,
                   (SELECT count(*) FROM {MONOLITH_SCHEMA}.holds) AS holds,
                   (SELECT coalesce(sum(amount), 0) FROM {MONOLITH_SCHEMA}.journal WHERE side = 'debit') AS debits,
                   (SELECT coalesce(sum(amount), 0) FROM {MONOLITH_SCHEMA}.journal WHERE side = 'credit') AS credits,
                   (SELECT coalesce(sum(balance), 0) FROM {MONOLITH_SCHEMA}.wallets) AS wallets""")
    finally:
        await admin.close()
    moved = orders * AMOUNT
    checks = {
        "every order paid once": counts["succeeded"] == orders and books["paid"] == orders and books["holds"] == orders,
        "journal balances": books["debits"] == books["credits"] == moved,
        "wallets conserved": books["wallets"] == sum(funding.values()) - moved,
        "redelivery changes nothing": replays == Counter(duplicate=min(10, orders)),
    }
    return {"connections": connections, "orders": orders, "buyers": len(work.buyers), "seconds": round(seconds, 3),
            "throughput": round(orders / seconds, 1), "outcome_counts": dict(counts), "checks": checks,
            "ok": all(checks.values())}


async def run_monolith(dsn: str, orders: int, per_buyer: int) -> list[dict]:
    print(f"== monolith reference: {orders} orders from {math.ceil(orders / per_buyer)} buyers, one transaction "
          f"each, schema {MONOLITH_SCHEMA} on {redact(dsn)}")
    results = []
    try:
        for connections in MONOLITH_CONNECTIONS:
            r = await measure_monolith(dsn, orders, per_buyer, connections)
            failed = [name for name, ok in r["checks"].items() if not ok]
            print(f"   {connections} connection{'s' if connections > 1 else ' '}: {orders} orders in "
                  f"{r['seconds']:.2f} s -> {r['throughput']:.0f} orders/s"
                  f"{'; checks passed' if r['ok'] else '  <- FAILED: ' + ', '.join(failed)}")
            results.append(r)
    finally:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {MONOLITH_SCHEMA} CASCADE")
        finally:
            await conn.close()
    return results


def redact(dsn: str) -> str:
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", dsn)


# ---------------------------------------------------------------- command line
def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


async def run(args: argparse.Namespace) -> int:
    report: dict = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                    "amount_fen": AMOUNT}
    ok = True
    platform_runs: list[dict] = []
    if not args.baseline_only:
        token = os.environ.get("DANBAO_API_TOKEN", "").split(",")[0].strip()  # the current token first
        if not token:
            print("DANBAO_API_TOKEN is not set (./danbao bench sets it from .data/secrets.env)", file=sys.stderr)
            return 2
        buyers = math.ceil(args.orders / args.per_buyer)
        if args.rate is None:
            print(f"== Danbao, maximum rate: {args.orders} orders from {buyers} buyers ({args.per_buyer} each, "
                  f"under the risk engine's velocity limit), published at once{f', {args.runs} runs' if args.runs > 1 else ''}")
        else:
            print(f"== Danbao, fixed rate: {args.orders} orders at {args.rate:g}/s "
                  f"({args.orders / args.rate:.1f} s) from {buyers} buyers{f', {args.runs} runs' if args.runs > 1 else ''}")
        platform_runs = await run_platform(args, token)
        report["danbao"] = {"mode": platform_runs[0]["mode"], "runs": platform_runs}
        ok = all(r["ok"] for r in platform_runs)
        if args.runs > 1:
            throughput = spread([r["throughput"] for r in platform_runs])
            p99 = spread([r["latency_ms"]["p99"] for r in platform_runs if r["latency_ms"]] or [0.0])
            report["danbao"] |= {"throughput": throughput, "p99_ms": p99}
            print(f"   range over {args.runs} runs: {throughput['min']:.0f}–{throughput['max']:.0f} sagas/s "
                  f"(median {throughput['median']:.0f}); p99 {ms(p99['min'])}–{ms(p99['max'])}")

    if args.baseline or args.baseline_only:
        if platform_runs:
            await asyncio.sleep(2)  # let the services settle before the monolith shares Postgres with them
        monolith = await run_monolith(args.dsn, args.orders, args.per_buyer)
        report["monolith"] = monolith
        ok = ok and all(r["ok"] for r in monolith)
        if platform_runs:
            danbao = statistics.median(r["throughput"] for r in platform_runs)
            ratio = danbao / monolith[0]["throughput"]
            report["ratio"] = {"danbao_per_s": danbao, "monolith_per_s": monolith[0]["throughput"],
                               "monolith_connections": monolith[0]["connections"], "danbao_over_monolith": round(ratio, 3)}
            print(f"== Danbao / monolith ({monolith[0]['connections']} connections): {danbao:.0f} / "
                  f"{monolith[0]['throughput']:.0f} = {ratio:.2f}")

    report["ok"] = ok
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(f"results written to {args.json}")
    if not ok:
        print("FAILED: see the lines marked above", file=sys.stderr)
    return 0 if ok else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="./danbao bench", description="Payment saga benchmark against the running platform: maximum rate, "
        "latency at a fixed rate, and a monolith reference on the same Postgres.")
    parser.add_argument("--orders", type=int, help="orders per run (default 2000; with --rate, rate x duration)")
    parser.add_argument("--rate", type=float, help="publish at this many orders/s instead of all at once")
    parser.add_argument("--duration", type=float, help="seconds of publishing at --rate (default 30)")
    parser.add_argument("--runs", type=int, default=1, help="repeat the measurement this many times (default 1)")
    parser.add_argument("--per-buyer", type=int, default=15,
                        help="orders per buyer, default 15 (the risk engine rejects a buyer's 21st order within 60 s)")
    parser.add_argument("--baseline", action="store_true", help="then the monolith reference and the ratio")
    parser.add_argument("--baseline-only", action="store_true", help="only the monolith reference")
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL") or DEFAULT_DSN,
                        help=f"Postgres of the monolith (default: DATABASE_URL, else {DEFAULT_DSN})")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for outcomes after publishing (default 120)")
    parser.add_argument("--grace", type=float, default=2, help="seconds to keep listening for duplicate outcomes after the last one (default 2)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")
    args = parser.parse_args(argv)
    if args.rate is not None:
        if args.rate <= 0:
            parser.error("--rate must be positive")
        if args.baseline or args.baseline_only:
            parser.error("--baseline compares maximum rates: use it without --rate")
        if args.orders is not None and args.duration is not None:
            parser.error("give --orders or --duration with --rate, not both")
        if args.orders is None:
            args.orders = max(1, round(args.rate * (args.duration or 30)))
    elif args.duration is not None:
        parser.error("--duration needs --rate")
    if args.orders is None:
        args.orders = 2000
    if args.orders < 1 or args.runs < 1 or args.per_buyer < 1:
        parser.error("--orders, --runs and --per-buyer must be at least 1")
    if args.baseline_only and args.runs > 1:
        parser.error("--runs repeats the Danbao measurement: not with --baseline-only")
    if args.per_buyer > 20:
        print(f"warning: {args.per_buyer} orders per buyer exceeds the risk engine's default velocity limit (20 a "
              "minute): expect RISK_REJECTED", file=sys.stderr)
    return args


def main() -> int:
    return asyncio.run(run(parse_args()))


if __name__ == "__main__":
    sys.exit(main())
