"""The risk engine as a faust-streaming application: agents, tables, the web server.

Pipeline (see README.md in this package for the why):

    risk.requests (key buyer_id, public to the gateway)
      └─ agent `route`: decode (bad records -> risk.requests.dlq), repartition
           ├─ CardDeclined, and RiskCheckRequested with a card ─▶ <app>-by-card   (key card_token)
           └─ RiskCheckRequested without a card ───────────────▶ <app>-by-buyer  (key buyer_id)
    <app>-by-card  └─ agent `card_stage`: table `cards` (declines, attempts); annotate the request
                      with the card's decline count ─▶ <app>-by-buyer (key buyer_id)
    <app>-by-buyer └─ agent `buyer_stage`: table `buyers` (velocity + amount windows, decided
                      event ids), table `pairs` (first-seen of buyer–seller); decide ─▶
                      risk.decisions (key order_id), and ─▶ <app>-by-seller (key seller_id)
    <app>-by-seller└─ agent `seller_stage`: table `sellers` (count/amount windows), logged

Every table is a plain faust Table (memory store) backed by a compacted changelog topic
`<app>-<table>-changelog`; each is written only by the agent whose input topic is keyed by
the table's key, so a key's changelog records all land in one partition and a restart (or
another worker taking the partition over) rebuilds exactly that state.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import time
import weakref
from datetime import datetime
from dataclasses import dataclass, field
from typing import Any

import faust
import orjson
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from shared import events, topics
from shared.tracing import trace_headers
from shared.kafka import PRODUCER_MAX_BATCH_BYTES, KafkaAccessError, Security
from shared.settings import SettingsError, env, env_choice, env_int
from shared.consumer import dead_letter_headers
from shared.events import CardDeclined, DecodeError, PaymentAbandoned, RiskDecided
from services.risk import domain, handover

log = structlog.get_logger("risk")

SOURCE = "risk-engine"

DECISIONS = Counter("danbao_risk_decisions_total", "Risk decisions published", ["decision"])
RULES_FIRED = Counter("danbao_risk_rules_fired_total", "Risk rules that fired", ["rule"])
RECORDS = Counter("danbao_risk_records_total", "risk.requests records, by outcome",
                  ["outcome"])  # routed | dead_letter | duplicate


@dataclass(frozen=True)
class EngineSettings:
    kafka_bootstrap_servers: str
    partitions: int
    app_id: str
    web_host: str
    web_port: int
    log_level: str
    data_dir: str
    instance_id: str | None  # Kafka static membership: a restarted worker rejoins at once
    rules: domain.RiskSettings
    kafka_security: Security = Security()  # KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_*, KAFKA_SSL_CAFILE

    @classmethod
    def from_env(cls) -> "EngineSettings":
        return cls(
            kafka_bootstrap_servers=env("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
            partitions=env_int("KAFKA_TOPIC_PARTITIONS", 4, minimum=1),
            app_id=env("RISK_APP_ID", "risk-engine"),
            web_host=env("RISK_WEB_HOST", env("HTTP_HOST", "127.0.0.1")),
            web_port=env_int("RISK_WEB_PORT", 8005, minimum=1, maximum=65_535),
            log_level=env_choice("RISK_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
            data_dir=env("RISK_DATA_DIR", "/tmp/danbao-risk"),
            instance_id=env("RISK_INSTANCE_ID", "") or None,
            rules=domain.RiskSettings.from_env(),
            kafka_security=Security.from_env(),
        )

    @property
    def broker(self) -> str:
        return ";".join(f"kafka://{h.strip()}" for h in self.kafka_bootstrap_servers.split(",") if h.strip())

    def internal_topic(self, suffix: str) -> str:
        return f"{self.app_id}-{suffix}"


# A drain ends after this many records, or once its queue is empty and it is DRAIN_SECONDS old:
# its table writes and seller records leave then, and only then are its records acknowledged.
# At light load a drain thereby covers many requests: their sellers' items go as one record a
# seller (instead of a record, a fetch and a changelog write on the seller stage per request)
# and a buyer seen twice is written once. Decisions never wait for it.
DRAIN_MAX = 500
DRAIN_SECONDS = 0.2


@dataclass
class Drain:
    """What a run of consecutive requests in the route agent changes, kept in memory until the
    run ends: each buyer's state and each buyer-seller pair written to its changelog once per
    run instead of once per request, each seller's items sent as one record. A decision is
    never held back: it leaves as soon as it is made. With the event that last changed each
    key, so its changelog record goes to that event's partition (the key's partition)."""
    events: list = field(default_factory=list)
    started: float = 0.0  # time.monotonic() of its first request
    buyers: dict = field(default_factory=dict)   # key -> (BuyerState, event)
    pairs: dict = field(default_factory=dict)    # key -> (first time in ms, event)
    sellers: dict = field(default_factory=dict)  # seller_id -> [items]


def _as_current(event) -> None:
    """Make `event` faust's current event, as iterating the stream does when it yields it: a
    table write sends its changelog record to the current event's partition."""
    from faust.streams import _current_event

    _current_event.set(weakref.ref(event))


TABLES = ("cards", "buyers", "pairs", "sellers")

# Changelog topics are compacted, but Kafka compacts only closed segments, and with its default
# 1 GiB segments a partition never closed one: after a day of benchmarks the buyers' changelog
# held 100 MB a partition of superseded states, and a restart replayed them all (93 s). With
# 16 MiB segments (or 10 min, whichever comes first) the cleaner keeps a key's latest state and a
# restart reads little more than one state per key plus the open segments.
CHANGELOG_TOPIC_CONFIGS = {"cleanup.policy": "compact", "segment.bytes": str(16 * 2**20),
                           "segment.ms": str(10 * 60 * 1000)}


def packed(state) -> bytes:
    """A state as a table keeps it: its JSON bytes. Tables of dicts and lists were some ten
    objects per key for the cyclic garbage collector to walk on every full collection: with a few
    ten thousand buyers, 0.3-0.5 s pauses of the whole engine every few seconds under load
    (docs/performance.md). Bytes are not tracked by it; the changelog records are the same JSON."""
    return orjson.dumps(state.to_json())


def unpacked(cls, value: bytes | None):
    return cls.from_json(orjson.loads(value) if value is not None else None)


def _decode(raw: str) -> tuple[events.Envelope, Any]:
    return events.decode(raw.encode(), events.SCHEMAS[topics.RISK_REQUESTS], topics.RISK_REQUESTS)


def build(settings: EngineSettings) -> faust.App:
    rules = settings.rules
    n = settings.partitions
    app = faust.App(
        settings.app_id,
        # faust reads its settings from the environment too, and the environment would win over
        # the values given here (WEB_PORT, BROKER_URL, TOPIC_PARTITIONS …): only RISK_FAUST_<NAME>
        # variables can override faust settings (an escape hatch, e.g. RISK_FAUST_STREAM_BUFFER_MAXSIZE).
        env_prefix="RISK_FAUST_",
        broker=settings.broker,
        broker_credentials=settings.kafka_security.faust_credentials(),  # None: PLAINTEXT
        store="memory://",  # state is rebuilt from the changelog topics on start
        datadir=settings.data_dir,
        topic_partitions=n,
        topic_replication_factor=1,
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
        # Small group timeouts: a (re)started worker is ready in seconds, a crashed one is
        # replaced after ~10 s instead of a minute.
        broker_session_timeout=10,
        broker_heartbeat_interval=3,
        broker_rebalance_timeout=10,
        broker_commit_interval=1.0,
        consumer_group_instance_id=settings.instance_id,
        producer_acks=-1,
        # No linger, as the services' producers: a decision waited 5 ms for nothing at light load
        # (100 orders/s: p50 21-23 -> 12-14 ms), and under load the next batch fills by itself
        # while a produce request is in flight (docs/performance.md, step 16).
        producer_linger=0.0,
        producer_max_batch_size=PRODUCER_MAX_BATCH_BYTES,
        processing_guarantee="at_least_once",  # + event_id dedupe, see README.md
        web_enabled=True,
        web_host=settings.web_host,
        web_bind=settings.web_host,
        web_port=settings.web_port,
        web_in_thread=False,
        autodiscover=False,
    )

    # Table writes wait in faust's producer buffer (send_soon). While it holds more than its
    # `max_messages` (100), faust stops handing records to the agents until 100 have left, one
    # wake-up each, and logs a warning: at 500 orders/s every drain did (~4 times a second). A
    # drain writes at most one buyer state and one pair per request of its DRAIN_MAX at once: room
    # for those (card and seller states, written a few at a time, share the buffer).
    app.producer.buffer.max_messages = 2 * DRAIN_MAX
    requests_topic = app.topic(topics.RISK_REQUESTS, key_serializer="raw", value_serializer="raw")
    dlq_topic = app.topic(topics.dlq(topics.RISK_REQUESTS), key_serializer="raw", value_serializer="raw")

    def internal(suffix: str) -> faust.TopicT:
        return app.topic(settings.internal_topic(suffix), internal=True, partitions=n,
                         key_serializer="raw", value_serializer="json")

    by_card, by_buyer, by_seller = internal("by-card"), internal("by-buyer"), internal("by-seller")

    def table(name: str, help_: str, **options) -> faust.Table:
        # keys are bytes (raw, hashed like the topic keys); values JSON, kept as their bytes
        # (`packed`) where they are states
        return app.Table(name, default=None, partitions=n, key_type=bytes, help=help_,
                         extra_topic_configs=CHANGELOG_TOPIC_CONFIGS, **options)

    cards = table("cards", "card_token -> CardState: declines within the window, payment attempts", value_type=bytes)
    buyers = table("buyers", "buyer_id -> BuyerState: velocity window, accepted amounts, decided event ids",
                   value_type=bytes)
    pairs = table("pairs", "buyer_id/seller_id -> first time (ms) the buyer ordered from the seller")
    # Keyed like <app>-by-seller and written from batches that mix partitions: the producer's
    # partitioner puts each key's changelog record in the partition its by-seller records use.
    sellers = table("sellers", "seller_id -> SellerState: orders and accepted amounts in 1 min / 1 h / 24 h",
                    value_type=bytes, use_partitioner=True)

    # ------------------------------------------------------------ agents' queues and flow control
    kept_queues: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # queue -> agent name
    resume_flow = app.flow_control.resume

    def keep_on_resume(stream, name: str) -> None:
        """Keep the records in an agent's queue when faust resumes flow control.

        faust clears every channel queue in `app.flow_control.resume()`, and calls it at the end
        of table recovery (Recovery.on_recovery_completed) *after* `consumer.resume_partitions()`
        and `await consumer.perform_seek()`: while that seek waits on the consumer thread, the
        fetcher already hands records of the resumed partitions to the agents' queues and the
        agents already take them. The clear dropped whatever an agent had not taken yet: never
        processed, never acknowledged, never fetched again (the fetch position is past it); and
        perform_seek resets faust's read offset to the committed one, so the next record opens a
        "gap" that covers the dropped offsets and the commit moves past them: lost for good.
        After a SIGKILL restart this lost the decision of the last request read before the
        engine was ready (test_restart_keeps_the_window_state, 1 run in 5-6).

        Not clearing on resume is safe: a record fetched in an older generation is skipped by
        the stream (faust compares generation ids, see Stream._c_aiter / _py_aiter) and read again
        after the seek to the committed offset, and a revocation still empties the queues
        (flow_control.clear() in App._on_partitions_revoked)."""
        kept_queues[stream.channel.queue] = name

    def resume_keeping_agent_queues() -> None:
        # Out of the managed queues for the length of resume() only: clear() still empties them.
        managed = app.flow_control._queues
        kept = [q for q in list(kept_queues) if q in managed]
        held = {kept_queues.get(q): q.qsize() for q in kept if q.qsize()}
        if held:
            log.info("flow control resumed; records kept in the agents' queues", records=held)
        for q in kept:
            managed.discard(q)
        try:
            resume_flow()
        finally:
            for q in kept:
                managed.add(q)

    app.flow_control.resume = resume_keeping_agent_queues

    # ------------------------------------------------------------ stage 1: decode + route
    # The route agent's open drain, its stream (to acknowledge with) and a lock: the agent and the
    # timer below both end drains, and a request is applied to a drain as a whole.
    route_state: dict[str, Any] = {"drain": Drain(), "stream": None}
    drain_lock = asyncio.Lock()

    @app.agent(requests_topic, name="route")
    async def route(stream):
        # Acknowledged by hand, after the drain's writes are handed to the producer: a crash
        # before that redelivers the records, and the event-id dedupe in the buyer's state
        # sends the same decisions again.
        manual = stream.noack()
        keep_on_resume(manual, "route")
        route_state["stream"] = manual
        async for event in manual.events():
            async with drain_lock:
                drain = route_state["drain"]
                if not drain.events:
                    drain.started = time.monotonic()
                drain.events.append(event)
                await on_request(event, drain)
                ended = len(drain.events) >= DRAIN_MAX or (
                    manual.channel.empty() and time.monotonic() - drain.started >= DRAIN_SECONDS)
                if ended:
                    end_drain()
            if ended:
                await send_and_ack(manual, drain)

    @app.timer(interval=DRAIN_SECONDS / 2)
    async def end_idle_drain():
        """A drain whose queue went quiet ends here once it is DRAIN_SECONDS old."""
        async with drain_lock:
            drain = route_state["drain"]
            if not drain.events or time.monotonic() - drain.started < DRAIN_SECONDS:
                return
            ended = end_drain()
        await send_and_ack(route_state["stream"], ended)

    def end_drain() -> Drain:
        """Open the next drain and write the ended one's tables (no await in between, under the
        lock: a request of the next drain reads what this one wrote); the ended drain, whose
        seller records and acks `send_and_ack` does after the lock."""
        drain, route_state["drain"] = route_state["drain"], Drain()
        try:
            for key, (state, event) in drain.buyers.items():
                _as_current(event)
                buyers[key] = packed(state)
            for key, (at, event) in drain.pairs.items():
                _as_current(event)
                pairs[key] = at
        except Exception:  # a bug: logged; the records are still acknowledged, or a
            # rebalance or a shutdown would wait for them forever (their decisions are out)
            log.exception("risk drain's state writes failed", records=len(drain.events))
        return drain

    async def send_and_ack(stream, drain: Drain) -> None:
        try:
            for seller_id, items in drain.sellers.items():
                await by_seller.send(key=seller_id.encode(), value={"seller_id": seller_id, "items": items})
        except Exception:  # as above
            log.exception("risk drain's seller records failed", records=len(drain.events))
        finally:
            for event in drain.events:
                await stream.ack(event)

    async def on_request(event, drain: Drain) -> None:
        msg = event.message
        try:
            env, data = events.decode(msg.value, events.SCHEMAS[topics.RISK_REQUESTS], msg.topic)
        except DecodeError as exc:
            RECORDS.labels(outcome="dead_letter").inc()
            log.warning("record dead-lettered", topic=msg.topic, partition=msg.partition, offset=msg.offset,
                        error_code=exc.code, error_message=exc.message)
            await dlq_topic.send(key=msg.key, value=msg.value, headers=dead_letter_headers(msg, exc.code, exc.message))
            return
        try:
            payload = {"raw": msg.value.decode()}
            # W3C trace context: the request's traceparent / tracestate go on to its decision
            # (through the card stage inside the payload), so the order's trace continues.
            trace = trace_headers(msg.headers)
            if trace:
                payload["trace"] = [[k, v.decode("latin-1")] for k, v in trace]
            if isinstance(data, CardDeclined) or data.card_token is not None:
                await by_card.send(key=data.card_token.encode(), value=payload)
            elif isinstance(data, PaymentAbandoned):
                forget(env, data, (drain, event))
            else:
                # risk.requests is keyed by buyer_id like <app>-by-buyer, so this partition
                # is the buyer's partition there too: decide here, one hop less.
                await decide(env, data, None, trace, (drain, event))
        except Exception as exc:  # a bug: park the record, keep the stream moving
            RECORDS.labels(outcome="dead_letter").inc()
            log.exception("routing failed; record dead-lettered", event_id=env.event_id)
            await dlq_topic.send(key=msg.key, value=msg.value,
                                 headers=dead_letter_headers(msg, "HANDLER_ERROR", f"{type(exc).__name__}: {exc}"))
            return
        RECORDS.labels(outcome="routed").inc()

    # ------------------------------------------------------------ stage 2: per card
    @app.agent(by_card, name="card_stage")
    async def card_stage(stream):
        keep_on_resume(stream, "card_stage")
        async for payload in stream:
            try:
                await on_card_record(payload)
            except Exception:  # a bug: log it and go on (the gateway's deadline covers the request)
                log.exception("card stage failed on a record; skipped", record=str(payload)[:500])

    async def on_card_record(payload: dict) -> None:
        env, data = _decode(payload["raw"])
        if isinstance(data, PaymentAbandoned):  # on to the buyer, behind the order's own request
            await by_buyer.send(key=data.buyer_id.encode(), value={**payload, "card": None})
            return
        key = data.card_token.encode()
        state = unpacked(domain.CardState, cards.get(key))
        if isinstance(data, CardDeclined):
            state, duplicate = domain.card_decline(state, env.event_id, data.declined_at, rules)
            if duplicate:
                RECORDS.labels(outcome="duplicate").inc()
                return
            cards[key] = packed(state)
            log.info("card decline recorded", event_id=env.event_id, card_token=data.card_token,
                     order_id=data.order_id, buyer_id=data.buyer_id,
                     declines=state.decline_count(domain.to_ms(data.declined_at), rules))
            return
        at = domain.to_ms(data.accepted_at)
        new_state, declines = domain.card_request(state, env.event_id, data.amount, data.accepted_at, rules)
        if new_state is not state:
            cards[key] = packed(new_state)
        card = {"declines": declines, "stats": new_state.stats(at)}
        await by_buyer.send(key=data.buyer_id.encode(), value={**payload, "card": card})

    # ------------------------------------------------------------ stage 3: per buyer, decide
    @app.agent(by_buyer, name="buyer_stage")
    async def buyer_stage(stream):
        keep_on_resume(stream, "buyer_stage")
        async for payload in stream:
            try:
                await on_buyer_record(payload)
            except Exception:
                log.exception("buyer stage failed on a record; skipped", record=str(payload)[:500])

    async def on_buyer_record(payload: dict) -> None:
        env, req = _decode(payload["raw"])
        ended = None
        async with drain_lock:
            # The buyer's last requests may still be in the route agent's open drain (their state
            # not in the table yet): end that drain first, so this record reads and extends the
            # buyer's current windows instead of having them overwritten at the drain's end.
            if req.buyer_id.encode() in route_state["drain"].buyers:
                ended = end_drain()
            if isinstance(req, PaymentAbandoned):
                forget(env, req)
            else:
                await decide(env, req, payload.get("card"),
                             [(k, v.encode("latin-1")) for k, v in payload.get("trace", ())])
        if ended is not None:
            await send_and_ack(route_state["stream"], ended)

    def buyer_state(key: bytes, drain: Drain | None) -> domain.BuyerState:
        if drain is not None and key in drain.buyers:
            return drain.buyers[key][0]
        return unpacked(domain.BuyerState, buyers.get(key))

    def set_buyer_state(key: bytes, state: domain.BuyerState, in_drain: tuple[Drain, Any] | None) -> None:
        if in_drain is None:
            buyers[key] = packed(state)
        else:
            drain, event = in_drain
            drain.buyers[key] = (state, event)

    def forget(env: events.Envelope, abandoned: PaymentAbandoned, in_drain: tuple[Drain, Any] | None = None) -> None:
        """A payment the buyer's daily window counted failed later: out of the window."""
        key = abandoned.buyer_id.encode()
        state = buyer_state(key, in_drain[0] if in_drain else None)
        new_state = domain.buyer_forget(state, env.event_id, abandoned.accepted_at, abandoned.amount)
        if new_state is not state:
            set_buyer_state(key, new_state, in_drain)
            log.info("failed payment taken out of the buyer's daily window", order_id=abandoned.order_id,
                     buyer_id=abandoned.buyer_id, amount=abandoned.amount)

    async def decide(env: events.Envelope, req: Any, card: dict | None, trace: list[tuple[str, bytes]] = (),
                     in_drain: tuple[Drain, Any] | None = None) -> None:
        """The buyer's windows and the decision, in the buyer's partition (buyers, pairs).
        `trace`: the request's traceparent / tracestate headers, put on the decision.
        `in_drain`: the route agent's drain and this request's event (table writes and seller
        items wait for the drain's end); without it they are written at once."""
        card = card or {}
        drain = in_drain[0] if in_drain else None
        key = req.buyer_id.encode()
        state = buyer_state(key, drain)
        request = domain.Request(amount=req.amount, accepted_at=req.accepted_at,
                                 buyer_registered_at=req.buyer_registered_at, card_token=req.card_token)
        state, decision, duplicate = domain.buyer_apply(state, env.event_id, request, card.get("declines", 0), rules)
        at = domain.to_ms(req.accepted_at)
        pair_key = f"{req.buyer_id}/{req.seller_id}".encode()
        first_seen = drain.pairs[pair_key][0] if drain is not None and pair_key in drain.pairs else pairs.get(pair_key)
        if not duplicate:
            set_buyer_state(key, state, in_drain)
            if first_seen is None or at < first_seen:
                if drain is None:
                    pairs[pair_key] = at
                else:
                    drain.pairs[pair_key] = (at, in_drain[1])
        record = events.new_event(
            RiskDecided(order_id=req.order_id, decision=decision.decision, rules=list(decision.rules),
                        message=decision.message),
            source=SOURCE, occurred_at=req.accepted_at, correlation_id=req.order_id,
            causation_id=env.event_id, event_id=domain.decision_event_id(env.event_id))
        # Straight to faust's producer: the same aiokafka producer and partitioner as a faust
        # topic's send, without its per-message future and buffer entry. Faust flushes this
        # producer before it commits offsets: a decision is sent before its request counts as read.
        await app.producer.send(topics.RISK_DECISIONS, req.order_id.encode(), events.encode(record), None, None,
                                list(trace) or None)
        if duplicate:
            RECORDS.labels(outcome="duplicate").inc()
            log.info("duplicate request: decision sent again", event_id=env.event_id, order_id=req.order_id,
                     decision=decision.decision)
            return
        DECISIONS.labels(decision=decision.decision).inc()
        for rule in decision.rules:
            RULES_FIRED.labels(rule=rule).inc()
        # Just what the seller's windows need (not the whole request, decoded a second time there).
        item = [env.event_id, req.amount, req.accepted_at.isoformat(), decision.decision]
        if drain is None:
            await by_seller.send(key=req.seller_id.encode(), value={"seller_id": req.seller_id, "items": [item]})
        else:
            drain.sellers.setdefault(req.seller_id, []).append(item)
        if decision.rules:
            # Every rule that fires is logged. Plain approvals (nearly all, and in risk.decisions
            # anyway) are not: at full load that line cost a fifth of the engine's CPU.
            orders, amount = state.windows(at, rules)
            trace_id = dict(trace).get("traceparent", b"")[3:35].decode("latin-1") or None
            log.info("risk decided", event_id=env.event_id, correlation_id=req.order_id, trace_id=trace_id,
                     order_id=req.order_id,
                     buyer_id=req.buyer_id, seller_id=req.seller_id, amount=req.amount, decision=decision.decision,
                     rules=list(decision.rules), message=decision.message,
                     buyer={"orders_in_velocity_window": orders, "accepted_amount_in_daily_window": amount,
                            "accepted": state.stats(at)},
                     card=card or None, pair_first_seen_ms=first_seen if first_seen is not None else at,
                     new_pair=first_seen is None)

    # ------------------------------------------------------------ stage 4: per seller (statistics)
    @app.agent(by_seller, name="seller_stage")
    async def seller_stage(stream):
        keep_on_resume(stream, "seller_stage")
        # Statistics only: taken in batches, so a busy seller's state is written (changelog)
        # once per batch, not once per order.
        async for batch in stream.take(500, within=0.05):
            changed: dict[bytes, domain.SellerState] = {}
            for payload in batch:
                try:
                    if "raw" in payload:  # the record's shape before 2026-11-28: one whole request
                        env, req = _decode(payload["raw"])
                        key = req.seller_id.encode()
                        items = [(env.event_id, req.amount, req.accepted_at, payload["decision"])]
                    else:  # a seller's orders from one batch of requests
                        key = payload["seller_id"].encode()
                        items = [(e, a, datetime.fromisoformat(t), d) for e, a, t, d in payload["items"]]
                    state = changed.get(key) or unpacked(domain.SellerState, sellers.get(key))
                    for event_id, amount, accepted_at, decision in items:
                        state = domain.seller_add(state, event_id, amount, accepted_at, decision)
                    changed[key] = state
                except Exception:
                    log.exception("seller stage failed on a record; skipped", record=str(payload)[:500])
            for key, state in changed.items():
                sellers[key] = packed(state)
                log.debug("seller window", seller_id=key.decode(), **state.stats(state.newest))

    # ------------------------------------------------------------ web: health, metrics, state
    def ready() -> bool:
        return app.tables.recovery.completed.is_set() and not app.rebalancing

    @app.page("/health")
    async def health(web, request):
        ok = ready()
        return web.json({"status": "ok" if ok else "starting", "app_id": settings.app_id},
                        status=200 if ok else 503)

    @app.page("/metrics")
    async def metrics(web, request):
        return web.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/settings")
    async def show_settings(web, request):
        return web.json(rules.describe())

    def state_page(path: str, tbl: faust.Table, param: str, render):
        @app.page(path, name=f"state_{tbl.name}")
        @app.table_route(table=tbl, match_info=param)
        async def view(web, request, **kwargs):
            key = request.match_info[param]
            value = tbl.get(key.encode())
            if value is None:
                return web.json({"error": {"code": "NOT_FOUND", "message": f"no state for {key}"}}, status=404)
            return web.json(render(value))
        return view

    def render_buyer(value):
        s = unpacked(domain.BuyerState, value)
        orders, amount = s.windows(s.newest, rules)
        return {"newest_ms": s.newest, "orders_in_velocity_window": orders,
                "accepted_amount_in_daily_window": amount, "accepted": s.stats(s.newest), "state": orjson.loads(value)}

    def render_card(value):
        s = unpacked(domain.CardState, value)
        return {"newest_ms": s.newest, "declines_in_window": s.decline_count(s.newest, rules),
                "attempts": s.stats(s.newest)}

    def render_seller(value):
        s = unpacked(domain.SellerState, value)
        return {"newest_ms": s.newest, **s.stats(s.newest)}

    state_page("/buyers/{buyer_id}", buyers, "buyer_id", render_buyer)
    state_page("/cards/{card_token}", cards, "card_token", render_card)
    state_page("/sellers/{seller_id}", sellers, "seller_id", render_seller)

    @app.task
    async def announce_ready():
        # on_started tasks run once table recovery has completed: the engine consumes now.
        # What start-up and recovery built stays for the process's life: out of the cyclic
        # collector's full walks (see `packed`); what is garbage already is collected first.
        gc.collect()
        gc.freeze()
        log.info("risk engine ready", app_id=settings.app_id, web=f"http://{settings.web_host}:{settings.web_port}",
                 rules=rules.describe())

    return app


# ---------------------------------------------------------------- the process
async def _apply_changelog_configs(admin, names: list[str]) -> None:
    """CHANGELOG_TOPIC_CONFIGS on these topics where they differ. AlterConfigs replaces a topic's
    whole set of its own configs: the ones it has (an operator's retention, say) are sent along."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    TOPIC_OWN = 1  # DescribeConfigs' config_source for a topic's own (dynamic) config
    changes = []
    for response in await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in names]):
        for _, _, _, name, entries in response.resources:
            own = {e[0]: e[1] for e in entries if e[3] == TOPIC_OWN}
            wanted = {**own, **CHANGELOG_TOPIC_CONFIGS}
            if wanted != own:
                changes.append(ConfigResource(ConfigResourceType.TOPIC, name, wanted))
    if not changes:
        return
    for response in await admin.alter_configs(changes):
        for code, message, _, name in response.resources:
            if code:  # e.g. not allowed to: the engine works, its restarts stay slow
                log.warning("changelog topic configs not changed", topic=name, error_code=code, error=message)
            else:
                log.info("changelog topic configs changed", topic=name, configs=CHANGELOG_TOPIC_CONFIGS)


async def _ensure_topics(settings: EngineSettings, timeout: float = 60.0) -> None:
    """The public topics (+ .dlq) and the engine's repartition topics; faust declares the
    changelog topics itself (and would the internal ones too; creating them here first makes
    a missing-topic problem show up before the worker starts)."""
    import asyncio
    import time

    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    from shared.kafka import check_access, ensure_topics

    security = settings.kafka_security
    deadline = time.monotonic() + timeout
    while True:
        try:
            await check_access(settings.kafka_bootstrap_servers, security)
            await ensure_topics(settings.kafka_bootstrap_servers, [topics.RISK_REQUESTS, topics.RISK_DECISIONS],
                                settings.partitions, security=security)
            admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers,
                                        **security.client_options())
            await admin.start()
            try:
                existing = set(await admin.list_topics())
                wanted = {settings.internal_topic(s) for s in ("by-card", "by-buyer", "by-seller")}
                missing = sorted(wanted - existing)
                if missing:
                    try:
                        await admin.create_topics([NewTopic(t, num_partitions=settings.partitions, replication_factor=1)
                                                   for t in missing])
                    except TopicAlreadyExistsError:
                        pass
                # faust sets a changelog's configs only when it creates the topic: bring those
                # created before (1 GiB segments, never compacted) to CHANGELOG_TOPIC_CONFIGS.
                changelogs = sorted({settings.internal_topic(f"{t}-changelog") for t in TABLES} & existing)
                if changelogs:
                    await _apply_changelog_configs(admin, changelogs)
            finally:
                await admin.close()
            return
        except KafkaAccessError:
            raise  # wrong credentials: waiting will not help
        except Exception as exc:  # Kafka not up yet: wait for it a while, then give up
            if time.monotonic() > deadline:
                raise
            log.warning("kafka not ready, retrying", error=repr(exc))
            await asyncio.sleep(1)


def main() -> None:
    import asyncio
    import logging

    from shared import logs

    try:
        settings = EngineSettings.from_env()
    except SettingsError as exc:
        raise SystemExit(f"danbao-risk: {exc}") from None
    logs.configure(SOURCE, settings.log_level)
    # faust/mode are chatty at INFO (every rebalance, every recovery step): warnings only.
    for noisy in ("faust", "mode", "aiokafka", "kafka", "aiohttp.access", "aiohttp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log.info("starting", kafka=settings.kafka_bootstrap_servers, kafka_security=settings.kafka_security.describe(),
             app_id=settings.app_id,
             partitions=settings.partitions, web_port=settings.web_port)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_ensure_topics(settings))
    except KafkaAccessError as exc:
        raise SystemExit(f"danbao-risk: {exc}") from None
    finally:
        loop.close()
    asyncio.set_event_loop(asyncio.new_event_loop())

    if not handover.install():  # each fetched record to the agents without four tasks (handover.py)
        log.warning("faust's consumer hand-over left as it is: its wait_first is not the one handover.py knows")
    app = build(settings)
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True, override_logging=False,
                          redirect_stdouts=False)
    worker.spinner = None
    worker.execute_from_commandline()
