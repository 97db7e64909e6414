"""Test infrastructure: the real Kafka and Postgres.

With a reachable Docker API (DOCKER_HOST, e.g. the Podman socket `./danbao containers test`
starts) the session starts them with testcontainers, as containers of KAFKA_IMAGE and
POSTGRES_IMAGE (defaults: the official apache/kafka:3.9.1 and postgres:15; `./danbao containers
test` passes the images it builds from deploy/containers/). Otherwise it uses the locally started
ones (`./danbao test` starts them: KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL, defaults as in the
README). Which one is used is printed in the test header. Nothing is skipped: if neither is
reachable, the session stops with the reason.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from urllib.parse import urlparse, urlunparse

import asyncpg
import pytest
from hypothesis import settings as hypothesis_settings

# Property tests check rules, not speed: no per-example deadline (a loaded 2-core machine
# otherwise fails them at random).
hypothesis_settings.register_profile("danbao", deadline=None)
hypothesis_settings.load_profile("danbao")

from shared.kafka import ping

# The key of the personal data hashes (shared/pii.py) for the test session: the unit tests and
# the service processes the integration tests start use the same one.
TEST_PII_KEY = "test-pii-key-0123456789abcdef0123456789"
os.environ["DANBAO_PII_KEY"] = TEST_PII_KEY

TEST_DB = "danbao_test"


@dataclass
class Infra:
    kind: str  # "testcontainers" or "local"
    kafka: str
    admin_database_url: str
    database_url: str  # a fresh database for this session


def _docker_reachable() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


def _with_database(url: str, name: str) -> str:
    parts = urlparse(url)
    return urlunparse(parts._replace(path=f"/{name}"))


_containers: list = []


KAFKA_START_FILE = "/tmp/danbao-kafka-start.env"


def _host(container) -> str:
    host = container.get_container_host_ip()
    return "127.0.0.1" if host == "localhost" else host  # the engine publishes on IPv4


def _start_kafka(image: str):
    """One Kafka node (KRaft) from an image configured like apache/kafka (KAFKA_* settings): the
    official apache/kafka:3.9.1 or deploy/containers/kafka.Containerfile.

    The service processes run outside the container, so the broker must advertise the host port
    the engine mapped to its listener, which differs from the container port and is known only
    once the container exists. So the container starts waiting for a start file; once it runs,
    the file gets the advertised listener with the mapped port, and the image's own entry point
    takes over (as testcontainers' KafkaContainer does for the Confluent image). The file is copied
    in, not written by `exec`: Podman 4.3 leaves the monitor process of an API exec session
    running."""
    import shlex

    from testcontainers.core.container import DockerContainer

    kafka = DockerContainer(image)
    config = kafka.get_docker_client().client.images
    try:
        image_config = config.get(image).attrs["Config"]
    except Exception:
        image_config = config.pull(image).attrs["Config"]
    original = [*(image_config.get("Entrypoint") or []), *(image_config.get("Cmd") or [])]
    kafka.with_kwargs(entrypoint=["sh", "-c"])
    kafka.with_command([f"until grep -qs '^# end' {KAFKA_START_FILE}; do sleep 0.1; done; . {KAFKA_START_FILE}; "
                        f"exec {shlex.join(original)}"])
    kafka.with_exposed_ports(9092)
    kafka.with_envs(
        CLUSTER_ID="ZGFuYmFvLXRlc3QtMDAwMQ", KAFKA_NODE_ID="1", KAFKA_PROCESS_ROLES="broker,controller",
        # PLAINTEXT: processes on the host, through the mapped port. BROKER: inside the container.
        KAFKA_LISTENERS="PLAINTEXT://:9092,BROKER://:9094,CONTROLLER://:9093",
        KAFKA_LISTENER_SECURITY_PROTOCOL_MAP="PLAINTEXT:PLAINTEXT,BROKER:PLAINTEXT,CONTROLLER:PLAINTEXT",
        KAFKA_INTER_BROKER_LISTENER_NAME="BROKER", KAFKA_CONTROLLER_LISTENER_NAMES="CONTROLLER",
        KAFKA_CONTROLLER_QUORUM_VOTERS="1@localhost:9093", KAFKA_LOG_DIRS="/var/lib/kafka/data",
        KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR="1", KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR="1",
        KAFKA_TRANSACTION_STATE_LOG_MIN_ISR="1", KAFKA_AUTO_CREATE_TOPICS_ENABLE="false",
        KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS="0", KAFKA_NUM_PARTITIONS="4",
        # As the local broker (deploy/kafka/server.properties.in): fewer internal partitions to create.
        KAFKA_OFFSETS_TOPIC_NUM_PARTITIONS="10", KAFKA_TRANSACTION_STATE_LOG_NUM_PARTITIONS="4",
        KAFKA_HEAP_OPTS="-Xms256m -Xmx512m")
    kafka.start()
    _containers.append(kafka)
    bootstrap = f"{_host(kafka)}:{kafka.get_exposed_port(9092)}"
    advertised = f"PLAINTEXT://{bootstrap},BROKER://localhost:9094"
    kafka.copy_into_container(f"export KAFKA_ADVERTISED_LISTENERS={advertised}\n# end\n".encode(), KAFKA_START_FILE)
    quiet = logging.getLogger("aiokafka")  # "Unable connect" errors while the broker starts
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        _wait_until(kafka, lambda: ping(bootstrap, timeout=5), 120)
    finally:
        quiet.setLevel(level)
    return bootstrap


def _wait_until(container, check, seconds: float) -> None:
    """Until the coroutine check() succeeds from this host (no `exec` into the container)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            asyncio.run(check())
            return
        except Exception as exc:
            container.get_wrapped_container().reload()
            if time.monotonic() > deadline or container.get_wrapped_container().status == "exited":
                raise RuntimeError(f"{container.image} did not start ({exc!r}): "
                                   f"{container.get_logs()[0].decode()[-2000:]}") from exc
            time.sleep(0.5)


def _start_postgres(image: str) -> str:
    """Postgres 15 from an image configured like the official one (POSTGRES_* settings): postgres:15
    or deploy/containers/postgres.Containerfile. Ready when it answers on the mapped port: during
    its first-start initialisation the server listens on its Unix socket only."""
    from testcontainers.core.container import DockerContainer

    postgres = DockerContainer(image)
    postgres.with_envs(POSTGRES_USER="danbao", POSTGRES_PASSWORD="danbao", POSTGRES_DB="danbao")
    postgres.with_exposed_ports(5432)
    # Room for five service processes and the tests; a throwaway database needs no fsync.
    postgres.with_command(["postgres", "-c", "max_connections=200", "-c", "fsync=off",
                           "-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
    postgres.start()
    _containers.append(postgres)
    url = f"postgresql://danbao:danbao@{_host(postgres)}:{postgres.get_exposed_port(5432)}/danbao"

    async def answers() -> None:
        await (await asyncpg.connect(url, timeout=5)).close()

    _wait_until(postgres, answers, 120)
    return url


def _start_containers() -> tuple[str, str]:
    # A local engine (a Unix socket): the containers are reached at their mapped ports on this
    # host, even when this host carries the /.dockerenv marker of a container.
    if os.environ.get("DOCKER_HOST", "unix://").startswith("unix://"):
        os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")
    return _start_kafka(_images()["kafka"]), _start_postgres(_images()["postgres"])


def _images() -> dict[str, str]:
    return {"kafka": os.environ.get("KAFKA_IMAGE") or "apache/kafka:3.9.1",
            "postgres": os.environ.get("POSTGRES_IMAGE") or "postgres:15"}


async def _fresh_database(admin_url: str) -> str:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {TEST_DB} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {TEST_DB}")
    finally:
        await conn.close()
    return _with_database(admin_url, TEST_DB)


def _resolve_infra() -> Infra:
    if _docker_reachable():
        kafka, db = _start_containers()
        kind = "testcontainers"
    else:
        kafka = os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or "127.0.0.1:9092"
        db = os.environ.get("DATABASE_URL") or "postgresql://danbao@127.0.0.1:5432/danbao"
        kind = "local"
    try:
        asyncio.run(ping(kafka, timeout=10))
    except Exception as exc:
        pytest.exit(f"Kafka at {kafka} is not reachable ({exc!r}): run the tests with `./danbao test`", returncode=3)
    try:
        test_url = asyncio.run(_fresh_database(db))
    except Exception as exc:
        pytest.exit(f"Postgres at {db} is not usable ({exc!r}): run the tests with `./danbao test`", returncode=3)
    return Infra(kind=kind, kafka=kafka, admin_database_url=db, database_url=test_url)


_infra: Infra | None = None


def get_infra() -> Infra:
    global _infra
    if _infra is None:
        _infra = _resolve_infra()
    return _infra


def pytest_report_header(config):
    if config.args and all("unit" in os.path.normpath(str(a)).split(os.sep) for a in config.args):
        return None  # unit tests only: no infrastructure needed
    infra = get_infra()
    how = (f"Docker API at {os.environ.get('DOCKER_HOST') or 'the default socket'}: Kafka and Postgres from "
           f"testcontainers ({_images()['kafka']}, {_images()['postgres']})" if infra.kind == "testcontainers"
           else "no Docker API reachable: using the locally started Kafka and Postgres")
    return [f"danbao infra: {how}", f"danbao infra: kafka={infra.kafka} database={infra.database_url}"]


def pytest_sessionfinish(session, exitstatus):
    for container in _containers:
        container.stop()


@pytest.fixture(scope="session")
def infra() -> Infra:
    return get_infra()
