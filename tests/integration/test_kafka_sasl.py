"""Kafka with credentials: a second broker of our own (the jars of deploy/kafka/target/lib, as
`./danbao` runs them) with SCRAM-SHA-256 listeners, SASL_PLAINTEXT and SASL_SSL (a throwaway
certificate as CA file), and a SCRAM user created when the storage is formatted. It runs on free
ports of its own, so it never meets the shared broker.

Checked: clients built by shared/kafka.py round-trip records with the right credentials; a real
service process and the faust risk engine start against it and become healthy; a wrong password
ends them at start-up with the broker's reason, within seconds."""
from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaConsumer

from shared.kafka import (KafkaAccessError, Security, check_access, client_kwargs, ensure_topics, make_producer,
                          ping)
from tests.conftest import _with_database

ROOT = Path(__file__).resolve().parents[2]
LIB = ROOT / "deploy" / "kafka" / "target" / "lib"
LOGS = ROOT / ".data" / "logs"
USER, PASSWORD = "danbao", "scram-pw-" + uuid.uuid4().hex[:8]
MECHANISM = "SCRAM-SHA-256"
DATABASE = "danbao_sasl_test"

PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller}
# Clients: SASL_PLAINTEXT and SASL_SSL (SCRAM). The controller and the broker's own link stay plain.
listeners=SASL_PLAINTEXT://127.0.0.1:{sasl},SASL_SSL://127.0.0.1:{sasl_ssl},INTERNAL://127.0.0.1:{internal},CONTROLLER://127.0.0.1:{controller}
advertised.listeners=SASL_PLAINTEXT://127.0.0.1:{sasl},SASL_SSL://127.0.0.1:{sasl_ssl},INTERNAL://127.0.0.1:{internal}
listener.security.protocol.map=SASL_PLAINTEXT:SASL_PLAINTEXT,SASL_SSL:SASL_SSL,INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=INTERNAL
sasl.enabled.mechanisms={mechanism}
listener.name.sasl_plaintext.{mech_lower}.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.{mech_lower}.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PEM
ssl.keystore.location={keystore}
log.dirs={data}
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=2
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
num.network.threads=2
num.io.threads=2
"""


@dataclass
class Broker:
    sasl: str      # SASL_PLAINTEXT bootstrap
    sasl_ssl: str  # SASL_SSL bootstrap
    cafile: str

    def security(self, password: str = PASSWORD, tls: bool = False) -> Security:
        return Security.create("SASL_SSL" if tls else "SASL_PLAINTEXT", MECHANISM, USER, password,
                               self.cafile if tls else None)

    def env(self, password: str = PASSWORD) -> dict[str, str]:
        return {"KAFKA_BOOTSTRAP_SERVERS": self.sasl, "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "KAFKA_SASL_MECHANISM": MECHANISM, "KAFKA_SASL_USERNAME": USER, "KAFKA_SASL_PASSWORD": password}


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _java(log_dir: Path, *args: str) -> list[str]:
    return ["java", "-Xms128m", "-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={log_dir}", f"-Dlog4j.configuration=file:{ROOT}/deploy/kafka/log4j.properties",
            "-cp", f"{LIB}/*", *args]


@pytest.fixture(scope="module")
async def broker(tmp_path_factory) -> Broker:
    missing = [what for what, ok in (("java", shutil.which("java")), ("openssl", shutil.which("openssl")),
                                     (f"Kafka jars in {LIB}", list(LIB.glob("kafka_2.13-*.jar")))) if not ok]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (./danbao test installs them)")
    tmp = tmp_path_factory.mktemp("sasl-kafka")
    # A throwaway certificate for 127.0.0.1: the broker's PEM key store, and the clients' CA file.
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "ca.pem"), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    (tmp / "keystore.pem").write_text((tmp / "key.pem").read_text() + (tmp / "ca.pem").read_text())
    sasl, sasl_ssl, internal, controller = _free_ports(4)
    (tmp / "server.properties").write_text(PROPERTIES.format(
        sasl=sasl, sasl_ssl=sasl_ssl, internal=internal, controller=controller, mechanism=MECHANISM,
        mech_lower=MECHANISM.lower(), keystore=tmp / "keystore.pem", data=tmp / "data"))
    # The SCRAM user is created with the storage (KRaft keeps credentials in its metadata log).
    subprocess.run(_java(tmp, "kafka.tools.StorageTool", "format", "-t", "ZGFuYmFvLXNhc2wtdGVzdA", "-c",
                         str(tmp / "server.properties"), "--add-scram",
                         f"{MECHANISM}=[name={USER},password={PASSWORD}]"), check=True, capture_output=True, timeout=60)
    out = open(tmp / "kafka.out", "wb")
    proc = subprocess.Popen(_java(tmp, "kafka.Kafka", str(tmp / "server.properties")), stdout=out,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    b = Broker(sasl=f"127.0.0.1:{sasl}", sasl_ssl=f"127.0.0.1:{sasl_ssl}", cafile=str(tmp / "ca.pem"))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                await ping(b.sasl, timeout=3, security=b.security())
                break
            except Exception as exc:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the SASL broker did not start ({exc!r}): "
                                         f"{(tmp / 'kafka.out').read_text()[-2000:]}") from exc
                await asyncio.sleep(0.5)
        yield b
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.close()


@pytest.mark.parametrize("tls", [False, True], ids=["SASL_PLAINTEXT", "SASL_SSL"])
async def test_records_round_trip_with_the_right_credentials(broker, tls):
    security = broker.security(tls=tls)
    bootstrap = broker.sasl_ssl if tls else broker.sasl
    topic = f"sasl.check.{uuid.uuid4().hex[:8]}"
    await ensure_topics(bootstrap, [topic], 1, security=security)
    producer = make_producer(bootstrap, security)
    await producer.start()
    try:
        sent = await producer.send_and_wait(topic, b"hello", key=b"k")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, **client_kwargs(bootstrap, security), auto_offset_reset="earliest",
                                group_id=f"g-{topic}")
    await consumer.start()
    try:
        batch = await consumer.getmany(timeout_ms=10_000)
        records = [r for rs in batch.values() for r in rs]
    finally:
        await consumer.stop()
    assert [(r.key, r.value, r.offset) for r in records] == [(b"k", b"hello", sent.offset)]


async def test_a_wrong_password_or_protocol_fails_at_once_with_the_reason(broker):
    started = time.monotonic()
    with pytest.raises(KafkaAccessError, match="SaslAuthenticationFailed.*invalid credentials") as caught:
        await check_access(broker.sasl, broker.security(password="wrong-password"))
    assert "wrong-password" not in str(caught.value) and f"as '{USER}'" in str(caught.value)
    with pytest.raises(KafkaAccessError, match="CERTIFICATE_VERIFY_FAILED"):  # TLS without our CA: refused
        await check_access(broker.sasl_ssl, Security.create("SASL_SSL", MECHANISM, USER, PASSWORD))
    with pytest.raises(Exception):  # PLAINTEXT against a SASL listener: the broker hangs up, no hang here
        await ping(broker.sasl, timeout=5, security=Security())
    assert time.monotonic() - started < 15


def _run(module: str, env: dict[str, str], log_name: str) -> subprocess.Popen:
    LOGS.mkdir(parents=True, exist_ok=True)
    log = open(LOGS / f"test-sasl-{log_name}.log", "wb")
    return subprocess.Popen([sys.executable, "-m", module], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)


def _log(log_name: str) -> str:
    return (LOGS / f"test-sasl-{log_name}.log").read_text(errors="replace")[-3000:]


async def _wait_healthy(proc: subprocess.Popen, url: str, log_name: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"{log_name} exited with {proc.returncode}: {_log(log_name)}"
            try:
                if (await client.get(f"{url}/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.3)
    raise AssertionError(f"{log_name} not healthy within {timeout}s: {_log(log_name)}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
async def own_database(infra) -> str:
    """A database of its own: the service's outbox must not meet the shared test database's."""
    conn = await asyncpg.connect(infra.admin_database_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        await conn.close()
    yield _with_database(infra.admin_database_url, DATABASE)
    conn = await asyncpg.connect(infra.admin_database_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    finally:
        await conn.close()


async def test_a_service_and_the_risk_engine_start_with_credentials(broker, service_env, own_database, tmp_path):
    escrow_port, risk_port = _free_ports(2)
    env = {**service_env, **broker.env(), "ESCROW_DATABASE_URL": own_database,
           "ESCROW_URL": f"http://127.0.0.1:{escrow_port}", "RISK_WEB_PORT": str(risk_port),
           "RISK_APP_ID": f"risk-sasl-{uuid.uuid4().hex[:8]}", "RISK_DATA_DIR": str(tmp_path / "risk")}
    escrow = _run("services.escrow", env, "escrow")
    risk = _run("services.risk", env, "risk")
    try:
        await asyncio.gather(_wait_healthy(escrow, f"http://127.0.0.1:{escrow_port}", "escrow"),
                             # healthy = faust's consumer joined its group and recovered its tables
                             _wait_healthy(risk, f"http://127.0.0.1:{risk_port}", "risk"))
        # The engine's producer too: a request in, its decision out.
        decision = await _risk_round_trip(broker.security(), broker.sasl)
        assert decision["type"] == "RiskDecided" and decision["data"]["decision"] == "approve", decision
    finally:
        _stop(escrow)
        _stop(risk)
    # Both created their topics on the SASL broker, through the authenticated admin client.
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**client_kwargs(broker.sasl, broker.security()))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
    finally:
        await admin.close()
    assert {"escrow.commands", "escrow.commands.dlq", "risk.requests", f"{env['RISK_APP_ID']}-by-buyer"} <= existing
    assert any(t.endswith("-buyers-changelog") and t.startswith(env["RISK_APP_ID"]) for t in existing)


async def _risk_round_trip(security: Security, bootstrap: str) -> dict:
    from datetime import datetime, timezone

    from shared import events
    from shared.events import RiskCheckRequested

    now = datetime.now(timezone.utc)
    data = RiskCheckRequested(order_id=f"o-{uuid.uuid4().hex[:12]}", buyer_id=f"b-{uuid.uuid4().hex[:8]}",
                              seller_id="s-sasl", amount=1_000, payment_method="balance", card_token=None,
                              accepted_at=now, buyer_registered_at=None)
    request = events.new_event(data, source="payment-gateway", occurred_at=now, correlation_id=data.order_id)
    consumer = AIOKafkaConsumer("risk.decisions", **client_kwargs(bootstrap, security), auto_offset_reset="latest",
                                group_id=f"g-sasl-{uuid.uuid4().hex[:8]}")
    await consumer.start()
    producer = make_producer(bootstrap, security)
    await producer.start()
    try:
        while not consumer.assignment():  # positioned at the end before the request goes out
            await consumer.getmany(timeout_ms=200)
        for tp in consumer.assignment():
            await consumer.position(tp)
        await producer.send_and_wait("risk.requests", json.dumps(request).encode(), key=data.buyer_id.encode())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for r in records:
                    value = json.loads(r.value)
                    if value["data"]["order_id"] == data.order_id:
                        return value
        raise AssertionError("no decision from the risk engine within 30 s")
    finally:
        await producer.stop()
        await consumer.stop()


async def test_a_wrong_password_ends_services_at_start_up(broker, service_env, own_database, tmp_path):
    env = {**service_env, **broker.env(password="not-the-password"), "ESCROW_DATABASE_URL": own_database,
           "ESCROW_URL": f"http://127.0.0.1:{_free_ports(1)[0]}", "RISK_WEB_PORT": str(_free_ports(1)[0]),
           "RISK_DATA_DIR": str(tmp_path / "risk")}
    started = time.monotonic()
    procs = {name: _run(module, env, f"{name}-refused")
             for name, module in (("escrow", "services.escrow"), ("risk", "services.risk"),
                                  ("ready", "shared.kafka_ready"))}
    try:
        codes = {name: await asyncio.to_thread(p.wait, 30) for name, p in procs.items()}
    finally:
        for p in procs.values():
            _stop(p)
    assert time.monotonic() - started < 30
    assert codes == {"escrow": 1, "risk": 1, "ready": 2}
    for name in procs:
        log = _log(f"{name}-refused")
        assert "SaslAuthenticationFailed" in log and "invalid credentials" in log, log
        assert "not-the-password" not in log
    assert "danbao-escrow: cannot connect to Kafka at" in _log("escrow-refused")
    assert "danbao-risk: cannot connect to Kafka at" in _log("risk-refused")
