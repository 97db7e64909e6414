"""Runs one service process: settings, Postgres pool and migrations, topics, consumers, the
outbox relay, background loops (timers) and the HTTP API, until SIGTERM/SIGINT."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import asyncpg
import structlog
import uvicorn
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError
from fastapi import APIRouter

from shared import db, http, kafka, logs, outbox, settings as settings_mod, topics, tracing
from shared.clock import ControllableClock, SystemClock, make_clock
from shared.consumer import ConsumerLoop, Subscription
from shared.outbox import Relay

log = structlog.get_logger("runtime")


@dataclass
class Context:
    """What handlers, API routes and loops of one service process share."""
    settings: settings_mod.Settings
    pool: asyncpg.Pool
    producer: AIOKafkaProducer
    clock: SystemClock | ControllableClock
    clock_moved: asyncio.Event = field(default_factory=asyncio.Event)
    deps: Any = None  # the service's own collaborators (ServiceSpec.deps), e.g. the bank channel


@dataclass
class ServiceSpec:
    name: str
    migrations: Path
    routers: list[APIRouter]
    subscriptions: Callable[[Context], list[Subscription]] = lambda ctx: []
    loops: list[Callable[[Context], Awaitable[None]]] = field(default_factory=list)  # timers, schedulers
    deps: Callable[[settings_mod.Settings], Any] = lambda settings: None


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the runtime owns signals
        yield


async def run(spec: ServiceSpec) -> None:
    settings = settings_mod.load(spec.name)
    security = kafka.Security.from_env()
    logs.configure(spec.name)
    traces = tracing.configure(spec.name)  # DANBAO_TRACING; off by default
    log.info("starting", kafka=settings.kafka_bootstrap_servers, kafka_security=security.describe(),
             clock=settings.clock_mode, tracing=traces.describe())
    # Wrong credentials end the process here, with the broker's reason, instead of clients
    # retrying "Unable to bootstrap" forever.
    await kafka.check_access(settings.kafka_bootstrap_servers, security)

    pool = await db.create_pool(settings.database_url, settings.schema)
    applied = await db.migrate(pool, settings.schema, [db.RUNTIME_MIGRATIONS, spec.migrations])
    if applied:
        log.info("migrations applied", migrations=applied)
    clock = make_clock(settings.clock_mode)
    await clock.start(pool)
    await kafka.ensure_topics(settings.kafka_bootstrap_servers, topics.ALL, settings.topic_partitions, security=security)
    producer = kafka.make_producer(settings.kafka_bootstrap_servers, security)
    await producer.start()
    ctx = Context(settings=settings, pool=pool, producer=producer, clock=clock, deps=spec.deps(settings))

    app = http.create_app(spec.name, spec.routers)
    tracing.instrument_app(app)
    app.state.ctx = ctx
    server = _Server(uvicorn.Config(app, host=settings.http_host, port=settings.http_port, log_config=None,
                                   access_log=False, lifespan="off"))

    relay = Relay(settings.database_url, settings.schema, pool, producer)
    # Every transaction of this process sends its outbox rows itself once committed (shared/db.py);
    # the relay publishes only what was missed, and other writers' rows.
    if settings.outbox_handoff:
        outbox.hand_off_to(relay.hand_off)
    tasks = [asyncio.create_task(relay.run(), name="relay")]
    subscriptions = spec.subscriptions(ctx)
    if subscriptions:
        loop_ = ConsumerLoop(bootstrap=settings.kafka_bootstrap_servers, group_id=spec.name, pool=pool,
                             subscriptions=subscriptions, security=security,
                             gather_ms=settings.consumer_gather_ms, gather_records=settings.consumer_gather_records,
                             commit_ms=settings.consumer_commit_ms,
                             before_batch=clock.refresh if clock.controllable else None)
        tasks.append(asyncio.create_task(loop_.run(), name="consumer"))
    tasks += [asyncio.create_task(f(ctx), name=f.__name__) for f in spec.loops]
    tasks.append(asyncio.create_task(server.serve(), name="http"))

    # What start-up built (modules, the app, clients, pools) lives as long as the process: out of
    # the cyclic collector's full walks, which otherwise stop the process 50-130 ms every few
    # seconds under load (docs/performance.md). Later garbage is collected as before; the
    # garbage start-up left is collected first, or it would stay frozen for good.
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    stopper = asyncio.create_task(stop.wait(), name="stop")
    done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    failed = [t for t in done if t is not stopper and not t.cancelled() and t.exception()]
    for t in failed:
        log.error("task failed; shutting down", task=t.get_name(), error=repr(t.exception()))
    log.info("stopping")
    server.should_exit = True
    for t in tasks:
        if t.get_name() != "http":
            t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    outbox.hand_off_to(None)
    await producer.stop()
    await clock.stop()
    await pool.close()
    tracing.shutdown()  # flushes the spans still buffered
    if failed:
        raise SystemExit(1)


def main(spec: ServiceSpec) -> None:
    try:
        asyncio.run(run(spec))
    except (settings_mod.SettingsError, kafka.KafkaAccessError) as exc:
        raise SystemExit(f"danbao-{spec.name}: {exc}") from None
    except KafkaConnectionError as exc:  # at start-up: no broker answered
        raise SystemExit(f"danbao-{spec.name}: {exc} (KAFKA_BOOTSTRAP_SERVERS, KAFKA_SECURITY_PROTOCOL)") from None
