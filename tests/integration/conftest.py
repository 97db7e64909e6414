"""Integration fixtures: the four service processes on the real Kafka and Postgres, clients for
their APIs, and a plain Kafka client to publish upstream records and read topics back."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import asyncpg
import httpx
import jwt
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from deploy.audit import audit_settled
from shared import settings as settings_mod
from shared.kafka import client_options

ROOT = Path(__file__).resolve().parents[2]
LOGS = ROOT / ".data" / "logs"
API_TOKEN = "test-operator-token"
JWT_SECRET = "test-jwt-secret-0123456789abcdef0123456789"
SERVICES = ("gateway", "escrow", "credit", "billing")


RISK_URL = "http://127.0.0.1:8005"
RISK_APP_ID = f"risk-engine-test-{uuid.uuid4().hex[:8]}"


def url_of(name: str) -> str:
    return RISK_URL if name == "risk" else settings_mod.DEFAULT_URLS[name]


class ServiceProcess:
    """One service as a real OS process, killable with SIGKILL and restartable."""

    def __init__(self, name: str, env: dict[str, str]):
        self.name, self.env = name, env
        self.proc: subprocess.Popen | None = None
        self.url = url_of(name)

    def start(self, **extra_env: str) -> None:
        LOGS.mkdir(parents=True, exist_ok=True)
        log = open(LOGS / f"test-{self.name}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", f"services.{self.name}"], cwd=ROOT,
                                     env={**self.env, **extra_env}, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    async def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not exit within {timeout}s")
            await asyncio.sleep(0.1)
        return self.proc.returncode

    async def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(f"{self.name} exited with {self.proc.returncode}; see {LOGS}/test-{self.name}.log")
                try:
                    if (await client.get(f"{self.url}/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        raise AssertionError(f"{self.name} not healthy within {timeout}s")

    async def restart(self, **extra_env: str) -> None:
        if self.proc and self.proc.poll() is None:
            self.kill()
        self.start(**extra_env)
        await self.wait_healthy()


def _port_free(url: str) -> bool:
    from urllib.parse import urlparse

    parsed = urlparse(url)
    with socket.socket() as s:
        return s.connect_ex((parsed.hostname, parsed.port)) != 0


@pytest.fixture(scope="session")
def service_env(infra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DANBAO_", "GATEWAY_", "ESCROW_", "CREDIT_", "BILLING_"))}
    env.update(KAFKA_BOOTSTRAP_SERVERS=infra.kafka, DATABASE_URL=infra.database_url, DANBAO_CLOCK="controllable",
               DANBAO_API_TOKEN=API_TOKEN, DANBAO_JWT_SECRET=JWT_SECRET, PYTHONUNBUFFERED="1",
               DANBAO_PII_KEY=os.environ["DANBAO_PII_KEY"],  # tests/conftest.py
               # The risk engine's windows live in Kafka, which outlives the session's fresh
               # database and test clock: each session gets its own engine (consumer group and
               # state), starting at the end of risk.requests rather than replaying old sessions.
               RISK_APP_ID=RISK_APP_ID, RISK_FAUST_CONSUMER_AUTO_OFFSET_RESET="latest")
    return env


@pytest.fixture(scope="session")
async def services(service_env) -> dict[str, ServiceProcess]:
    busy = [n for n in (*SERVICES, "risk") if not _port_free(url_of(n))]
    if busy:
        pytest.exit(f"ports of {busy} are in use: stop running services first (./danbao down)", returncode=3)
    # The four services and the risk engine (a faust worker; the payment saga asks it first).
    procs = {n: ServiceProcess(n, service_env) for n in (*SERVICES, "risk")}
    for p in procs.values():
        p.start()
    await asyncio.gather(*(p.wait_healthy(90) for p in procs.values()))
    yield procs
    for p in procs.values():
        if p.proc and p.proc.poll() is None:
            p.kill(signal.SIGTERM)


@pytest.fixture(scope="session")
async def db(infra) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(infra.database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


def user_token(user_id: str, expires_in: int = 3600) -> str:
    return jwt.encode({"sub": user_id, "exp": datetime.now(timezone.utc) + timedelta(seconds=expires_in)},
                      JWT_SECRET, algorithm="HS256")


@pytest.fixture(scope="session")
async def api(services) -> Callable[[str], httpx.AsyncClient]:
    """api("gateway") -> an HTTP client for that service with the operator token."""
    # Longer than the longest wait a service may take on purpose (billing waits up to 12 s for a
    # user its projection does not know yet, then answers 404): a slow answer fails its own
    # assertion, not the HTTP client.
    clients = {n: httpx.AsyncClient(base_url=url_of(n), timeout=30, headers={"Authorization": f"Bearer {API_TOKEN}"})
               for n in SERVICES}
    yield clients.__getitem__
    for c in clients.values():
        await c.aclose()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def envelope(type_: str, data: dict[str, Any], **over: Any) -> dict[str, Any]:
    return {"event_id": str(uuid.uuid4()), "type": type_, "version": 1, "occurred_at": "2026-11-25T10:00:00Z",
            "source": "shop-orders", "correlation_id": data.get("order_id"), "causation_id": None, "data": data, **over}


class Kafka:
    """A plain, independent Kafka client for tests: publish raw records, read topics back."""

    def __init__(self, bootstrap: str):
        self.bootstrap = bootstrap
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", **client_options())

    async def send(self, topic: str, value: bytes | dict, key: str | None = None):
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        return await self.producer.send_and_wait(topic, raw, key=key.encode() if key else None)

    async def end_offsets(self, topic: str) -> dict[TopicPartition, int]:
        tps = [TopicPartition(topic, p) for p in await self.producer.partitions_for(topic)]
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, **client_options())
        await consumer.start()
        try:
            return await consumer.end_offsets(tps)
        finally:
            await consumer.stop()

    async def read(self, topic: str, since: dict[TopicPartition, int], until: Callable[[list], bool],
                   timeout: float = 30) -> list:
        """Records written after `since` until `until(records)` holds (or the timeout)."""
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False, **client_options())
        await consumer.start()
        records: list = []
        try:
            consumer.assign(list(since))
            for tp, offset in since.items():
                consumer.seek(tp, offset)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not until(records):
                batch = await consumer.getmany(timeout_ms=300)
                for recs in batch.values():
                    records.extend(recs)
            return records
        finally:
            await consumer.stop()


@pytest.fixture(scope="session")
async def kafka(infra) -> Kafka:
    client = Kafka(infra.kafka)
    await client.producer.start()
    yield client
    await client.producer.stop()


async def eventually(check: Callable[[], Any], timeout: float = 30, interval: float = 0.2):
    """Poll an async `check` until it returns something truthy; its last value otherwise fails."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            assert result, f"condition not met within {timeout}s: last value {result!r}"
            return result
        await asyncio.sleep(interval)


async def committed_through(kafka_bootstrap: str, group: str, ends: dict, before: dict | None = None,
                            timeout: float = 30) -> None:
    """Until `group` has committed every partition that moved since `before` (all of them with
    records, without it) up to its end in `ends`."""
    from aiokafka.admin import AIOKafkaAdminClient

    moved = {tp: end for tp, end in ends.items() if end > (before or {}).get(tp, 0)}
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap, **client_options())
    await admin.start()
    try:
        async def done() -> bool:
            offsets = await admin.list_consumer_group_offsets(group)
            return all(tp in offsets and offsets[tp].offset >= end for tp, end in moved.items())
        await eventually(done, timeout=timeout)
    finally:
        await admin.close()


def payments_of(records: list, order_id: str) -> list[dict]:
    out = []
    for r in records:
        value = json.loads(r.value)
        if value["data"].get("order_id") == order_id:
            out.append(value)
    return out


class Outcomes:
    """Collects payments.events from the session's start, by order_id, in arrival order."""

    def __init__(self, bootstrap: str):
        self.bootstrap = bootstrap
        self.by_order: dict[str, list[dict]] = {}
        self._seen: set[str] = set()
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()

    async def start(self, since: dict[TopicPartition, int]) -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False, **client_options())
        await consumer.start()
        consumer.assign(list(since))
        for tp, offset in since.items():
            consumer.seek(tp, offset)
        self._task = asyncio.create_task(self._collect(consumer))

    async def _collect(self, consumer: AIOKafkaConsumer) -> None:
        try:
            while True:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    for r in records:
                        event = json.loads(r.value)
                        if event["event_id"] in self._seen:
                            continue
                        self._seen.add(event["event_id"])
                        self.by_order.setdefault(event["data"]["order_id"], []).append(event)
                        self._changed.set()
        finally:
            await consumer.stop()

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def wait(self, order_id: str, count: int, timeout: float = 30, settle: float = 1.0) -> list[dict]:
        """The order's events once there are `count` of them, after `settle` seconds more (to
        catch an unexpected extra one)."""
        deadline = time.monotonic() + timeout
        while len(self.by_order.get(order_id, [])) < count and time.monotonic() < deadline:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=0.2)
            except asyncio.TimeoutError:
                pass
        await asyncio.sleep(settle)
        return list(self.by_order.get(order_id, []))

    async def types(self, order_id: str, count: int, **kw) -> list[str]:
        return [e["type"] for e in await self.wait(order_id, count, **kw)]


@pytest.fixture(scope="session")
async def outcomes(kafka, services) -> Outcomes:
    collector = Outcomes(kafka.bootstrap)
    await collector.start(await kafka.end_offsets("payments.events"))
    yield collector
    await collector.stop()


# ---------------------------------------------------------------- a shop driving the platform
@pytest.fixture
async def shop(services, api, kafka, outcomes, infra):
    return Shop(api, kafka, outcomes, infra)


class Shop:
    def __init__(self, api, kafka, outcomes, infra):
        self.api, self.kafka, self.outcomes, self.infra = api, kafka, outcomes, infra

    async def user(self, prefix: str = "u", balance: int = 0, **over) -> str:
        user_id = new_id(prefix)
        body = {"user_id": user_id, "full_name": "Test User", "birth_date": "1990-01-01",
                "phone": f"139{uuid.uuid4().int % 10**8:08d}", "id_number": new_id("id").replace("-", ""),
                "real_name_verified": True, **over}
        assert (await self.api("gateway").post("/v1/users", json=body)).status_code == 201
        if balance:
            await self.top_up(user_id, balance)
        return user_id

    async def top_up(self, user_id: str, amount: int, token: str = "tok_visa", key: str | None = None):
        response = await self.api("gateway").post(f"/v1/wallets/{user_id}/top-ups", json={
            "amount": amount, "card_token": token, "idempotency_key": key or new_id("k")})
        assert response.status_code == 201, response.text
        return response.json()

    async def huabei(self, user_id: str) -> dict:
        response = await self.api("credit").get(f"/v1/huabei/{user_id}")
        assert response.status_code == 200, response.text
        return response.json()

    async def activate(self, user_id: str) -> dict:
        async def profile_arrived():
            return (await self.api("credit").get(f"/v1/credit-profiles/{user_id}")).status_code == 200
        await eventually(profile_arrived)
        response = await self.api("credit").post(f"/v1/huabei/{user_id}/activation")
        assert response.status_code == 201, response.text
        return response.json()

    async def wallet(self, user_id: str) -> int:
        response = await self.api("gateway").get(f"/v1/wallets/{user_id}")
        assert response.status_code == 200, response.text
        return response.json()["available"]

    async def send(self, type_: str, data: dict, *, times: int = 1) -> dict:
        event = envelope(type_, data)
        for _ in range(times):
            await self.kafka.send("orders.events", event, key=data["order_id"])
        return event

    async def place(self, buyer: str, seller: str, amount: int, method: str = "balance", times: int = 1,
                    **extra) -> str:
        order_id = new_id("o")
        data = {"order_id": order_id, "buyer_id": buyer, "seller_id": seller, "amount": amount, "currency": "CNY",
                "payment_method": method, **extra}
        await self.send("OrderPlaced", data, times=times)
        return order_id

    async def payment(self, order_id: str) -> dict:
        return (await self.api("gateway").get(f"/v1/payments/{order_id}")).json()

    async def awaiting_card(self, order_id: str) -> bool:
        """Approved by the risk engine, the card channel asked and no outcome yet: its deadline
        runs from the approval, so a clock move must come after this."""
        payment = await self.payment(order_id)
        return (payment.get("status") == "PENDING" and payment.get("risk_decision") == "approve"
                and order_id not in self.outcomes.by_order)

    async def escrow(self, order_id: str) -> dict:
        return (await self.api("escrow").get(f"/v1/escrows/{order_id}")).json()

    async def events(self, order_id: str, count: int, **kw) -> list[dict]:
        return await self.outcomes.wait(order_id, count, **kw)

    async def advance_clock(self, seconds: int) -> None:
        assert (await self.api("gateway").post("/admin/clock", json={"advance_seconds": seconds})).status_code == 200

    async def audit(self):
        dsns = {s: self.infra.database_url for s in ("gateway", "escrow", "credit", "billing")}
        report = await audit_settled(15, dsns)
        assert report.ok, report.render()


def types(events: list[dict]) -> list[str]:
    return [e["type"] for e in events]


@pytest.fixture
def ops_env(infra, monkeypatch):
    """The ops tools (deploy/ops) read where everything is from the environment, as `./danbao` gives it;
    returns that environment for subprocesses."""
    env = {"DATABASE_URL": infra.database_url, "KAFKA_BOOTSTRAP_SERVERS": infra.kafka, "DANBAO_API_TOKEN": API_TOKEN}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("GATEWAY_DATABASE_URL", "ESCROW_DATABASE_URL", "CREDIT_DATABASE_URL", "BILLING_DATABASE_URL"):
        monkeypatch.delenv(k, raising=False)
    return {**os.environ, **env}
