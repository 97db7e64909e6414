"""Test infrastructure: the real Kafka and Postgres.

With a reachable Docker engine the session starts them with testcontainers; otherwise it uses
the locally started ones (`./danbao test` starts them: KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL,
defaults as in CONTRACT.md §1). Which one is used is printed in the test header. Nothing is
skipped: if neither is reachable, the session stops with the reason.
"""
from __future__ import annotations

import asyncio
import os
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


def _start_containers() -> tuple[str, str]:
    from testcontainers.kafka import KafkaContainer
    from testcontainers.postgres import PostgresContainer

    kafka = KafkaContainer("confluentinc/cp-kafka:7.7.1").with_kraft()
    postgres = PostgresContainer("postgres:15", username="danbao", password="danbao", dbname="danbao", driver=None)
    kafka.start()
    postgres.start()
    _containers.extend([kafka, postgres])
    return kafka.get_bootstrap_server(), postgres.get_connection_url()


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
    how = ("Docker engine found: Kafka and Postgres from testcontainers" if infra.kind == "testcontainers"
           else "no Docker engine: using the locally started Kafka and Postgres")
    return [f"danbao infra: {how}", f"danbao infra: kafka={infra.kafka} database={infra.database_url}"]


def pytest_sessionfinish(session, exitstatus):
    for container in _containers:
        container.stop()


@pytest.fixture(scope="session")
def infra() -> Infra:
    return get_infra()
