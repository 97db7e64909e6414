"""The risk engine (services/risk, faust-streaming) as a real process on the real Kafka.

Only Kafka is needed (not the four Danbao services). Requests are published to
`risk.requests` with a plain producer; decisions are read back from `risk.decisions`. Every
test uses its own buyer / card / seller ids, since the topics are shared across runs.
"""
from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from services.risk.domain import decision_event_id
from shared import events
from shared.events import CardDeclined, RiskCheckRequested
from tests.integration.conftest import RISK_APP_ID, committed_through, eventually, new_id

pytestmark = pytest.mark.integration

APP_ID = RISK_APP_ID  # the session engine's consumer group and state topics


@pytest.fixture(scope="module")
async def engine(services):
    """The session's risk engine: one engine (one consumer group) per Kafka, since a second group
    would answer every request and dead-letter every bad record again."""
    return services["risk"]


# ---------------------------------------------------------------- helpers
def request_event(buyer: str, at: datetime, *, amount: int = 10_000, seller: str = "s-risk-it",
                  card: str | None = None, registered: datetime | None = None) -> dict:
    data = RiskCheckRequested(order_id=new_id("o"), buyer_id=buyer, seller_id=seller, amount=amount,
                              payment_method="bank_card" if card else "balance", card_token=card,
                              accepted_at=at, buyer_registered_at=registered)
    return events.new_event(data, source="payment-gateway", occurred_at=at, correlation_id=data.order_id)


def decline_event(buyer: str, card: str, at: datetime) -> dict:
    data = CardDeclined(order_id=new_id("o"), buyer_id=buyer, card_token=card, declined_at=at)
    return events.new_event(data, source="payment-gateway", occurred_at=at, correlation_id=data.order_id)


async def publish(kafka, *envelopes: dict) -> None:
    for env in envelopes:  # one by one, so a buyer's records keep their order
        await kafka.send("risk.requests", env, key=env["data"]["buyer_id"])


async def decisions(kafka, since, requests: list[dict], timeout: float = 30, settle: float = 1.0) -> dict:
    """order_id -> [decision envelopes] for the given requests, once each has one (+ `settle` s)."""
    wanted = {r["data"]["order_id"] for r in requests}

    def complete(records) -> bool:
        seen = {json.loads(r.value)["data"]["order_id"] for r in records}
        return wanted <= seen

    records = await kafka.read("risk.decisions", since, complete, timeout=timeout)
    if settle:  # read again a little later, to catch a second (re-sent) copy
        await asyncio.sleep(settle)
        first, until = len(records), time.monotonic() + 1.0
        records = await kafka.read("risk.decisions", since,
                                   lambda recs: len(recs) >= first and time.monotonic() > until, timeout=timeout)
    out: dict[str, list[dict]] = {}
    for r in records:
        value = json.loads(r.value)
        if value["data"]["order_id"] in wanted:
            assert r.key.decode() == value["data"]["order_id"]
            out.setdefault(value["data"]["order_id"], []).append(value)
    missing = wanted - set(out)
    assert not missing, f"no decision within {timeout}s for {sorted(missing)}"
    return out


def only(found: dict, request: dict) -> dict:
    """The one decision of a request (a re-sent copy must be the identical event)."""
    copies = found[request["data"]["order_id"]]
    assert all(c == copies[0] for c in copies), copies
    return copies[0]


async def state(engine, kind: str, key: str) -> dict | None:
    async with httpx.AsyncClient(timeout=5) as client:
        r = await client.get(f"{engine.url}/{kind}/{key}")
        return r.json() if r.status_code == 200 else None


# ---------------------------------------------------------------- tests
async def test_burst_from_one_buyer_is_rejected_from_the_21st_order(engine, kafka):
    buyer = new_id("b")
    t0 = datetime.now(timezone.utc)
    burst = [request_event(buyer, t0 + timedelta(milliseconds=10 * i)) for i in range(25)]
    since = await kafka.end_offsets("risk.decisions")
    await publish(kafka, *burst)
    found = await decisions(kafka, since, burst)

    got = [only(found, r) for r in burst]
    assert [d["data"]["decision"] for d in got] == ["approve"] * 20 + ["reject"] * 5
    assert got[19]["data"] == {"order_id": burst[19]["data"]["order_id"], "decision": "approve", "rules": [],
                               "message": "approved: no rule fired"}
    assert got[20]["data"]["rules"] == ["buyer_velocity"]
    assert got[20]["data"]["message"] == "rejected by buyer_velocity: 21 orders within 60 s (max 20)"
    assert got[24]["data"]["message"].startswith("rejected by buyer_velocity: 25 orders")
    for request, decision in zip(burst, got):  # the envelope
        assert decision["type"] == "RiskDecided" and decision["source"] == "risk-engine"
        assert decision["event_id"] == decision_event_id(request["event_id"])
        assert decision["correlation_id"] == request["data"]["order_id"]
        assert decision["causation_id"] == request["event_id"]
        # occurred_at is the request's accepted_at (RFC 3339, to the millisecond)
        assert decision["occurred_at"] == events.rfc3339(datetime.fromisoformat(request["data"]["accepted_at"]))
        events.decode(json.dumps(decision).encode(), events.SCHEMAS["risk.decisions"])  # valid on the contract


async def test_card_requests_count_with_the_wallet_requests_still_in_the_open_drain(engine, kafka):
    """Wallet requests are decided in the route agent's drain, whose state reaches the table only
    when the drain ends (up to 0.2 s later); card requests reach the buyer's windows through the
    card stage. Both count: 20 wallet orders, then 2 by card right after, and the 21st is refused."""
    buyer = new_id("b")
    t0 = datetime.now(timezone.utc)
    wallet = [request_event(buyer, t0 + timedelta(milliseconds=10 * i)) for i in range(20)]
    cards = [request_event(buyer, t0 + timedelta(milliseconds=300 + 10 * i), card=f"tok_{new_id('c')}") for i in range(2)]
    since = await kafka.end_offsets("risk.decisions")
    await publish(kafka, *wallet, *cards)
    found = await decisions(kafka, since, wallet + cards)
    assert [only(found, r)["data"]["decision"] for r in wallet] == ["approve"] * 20
    for r in cards:
        decision = only(found, r)["data"]
        assert decision["decision"] == "reject" and "buyer_velocity" in decision["rules"], decision


async def test_windows_follow_accepted_at_not_the_wall_clock(engine, kafka):
    buyer = new_id("b")
    later = datetime.now(timezone.utc) + timedelta(days=3)  # e.g. the test clock moved ahead
    first = [request_event(buyer, later + timedelta(milliseconds=i)) for i in range(21)]
    # published a moment later, but accepted 60 s after the 21st: the window has moved on
    after = request_event(buyer, later + timedelta(seconds=60, milliseconds=20))
    since = await kafka.end_offsets("risk.decisions")
    await publish(kafka, *first, after)
    found = await decisions(kafka, since, [*first, after])
    assert [only(found, r)["data"]["decision"] for r in first] == ["approve"] * 20 + ["reject"]
    assert only(found, after)["data"]["decision"] == "approve"


async def test_decline_burst_on_one_card(engine, kafka):
    card = f"tok_it_{uuid.uuid4().hex[:12]}"
    t0 = datetime.now(timezone.utc)
    # four declines, by different buyers: the card's state is kept per card token
    await publish(kafka, *[decline_event(new_id("b"), card, t0 + timedelta(seconds=i)) for i in range(4)])
    await eventually(lambda: _declines(engine, card, 4), timeout=20)
    buyer = new_id("b")
    fourth = request_event(buyer, t0 + timedelta(minutes=1), card=card)
    since = await kafka.end_offsets("risk.decisions")
    await publish(kafka, fourth)
    assert only(await decisions(kafka, since, [fourth], settle=0), fourth)["data"]["decision"] == "approve"

    await publish(kafka, decline_event(buyer, card, t0 + timedelta(minutes=2)))  # the 5th
    await eventually(lambda: _declines(engine, card, 5), timeout=20)
    same_buyer = request_event(buyer, t0 + timedelta(minutes=3), card=card)
    other_buyer = request_event(new_id("b"), t0 + timedelta(minutes=3), card=card)
    other_card = request_event(buyer, t0 + timedelta(minutes=3), card=f"tok_it_{uuid.uuid4().hex[:12]}")
    no_card = request_event(buyer, t0 + timedelta(minutes=3))
    # an hour and a second after the first decline: only 3 of the 5 are still within the hour
    an_hour_later = request_event(buyer, t0 + timedelta(minutes=60, seconds=1), card=card)
    since = await kafka.end_offsets("risk.decisions")
    await publish(kafka, same_buyer, other_buyer, other_card, no_card, an_hour_later)
    found = await decisions(kafka, since, [same_buyer, other_buyer, other_card, no_card, an_hour_later])
    for rejected in (same_buyer, other_buyer):
        d = only(found, rejected)["data"]
        assert d["decision"] == "reject" and d["rules"] == ["card_decline_burst"]
        assert d["message"] == f"rejected by card_decline_burst: 5 declines on card {card} within 1 h (limit 5)"
    assert only(found, other_card)["data"]["decision"] == "approve"
    assert only(found, no_card)["data"]["decision"] == "approve"
    assert only(found, an_hour_later)["data"]["decision"] == "approve"


async def _declines(engine, card: str, n: int) -> bool:
    s = await state(engine, "cards", card)
    return bool(s) and s["declines_in_window"] == n


async def test_daily_amount_and_new_buyer_review(engine, kafka):
    buyer, newbie = new_id("b"), new_id("b")
    t0 = datetime.now(timezone.utc)
    amounts = [request_event(buyer, t0 + timedelta(minutes=i), amount=a)
               for i, a in enumerate([3_000_000, 3_000_000, 2_000_000, 1])]
    review = request_event(newbie, t0, amount=1_000_001, registered=t0 - timedelta(hours=2))
    review_and_reject = request_event(newbie, t0 + timedelta(minutes=1), amount=4_000_000,
                                      registered=t0 - timedelta(hours=2))
    since = await kafka.end_offsets("risk.decisions")
    await publish(kafka, *amounts, review, review_and_reject)
    found = await decisions(kafka, since, [*amounts, review, review_and_reject])
    # the rejected 3 000 000 does not count: 3 000 000 + 2 000 000 reaches the max exactly
    assert [only(found, r)["data"]["decision"] for r in amounts] == ["approve", "reject", "approve", "reject"]
    assert only(found, amounts[1])["data"]["rules"] == ["buyer_daily_amount"]
    d = only(found, review)["data"]
    assert d["decision"] == "review" and d["rules"] == ["new_buyer_large_amount"]
    d = only(found, review_and_reject)["data"]  # 1 000 001 (review counts) + 4 000 000 > 5 000 000
    assert d["decision"] == "reject" and d["rules"] == ["buyer_daily_amount", "new_buyer_large_amount"]


async def test_bad_records_go_to_the_dead_letter_topic_and_redeliveries_are_decided_once(engine, kafka):
    buyer = new_id("b")
    t0 = datetime.now(timezone.utc)
    good = request_event(buyer, t0)
    unknown = {**request_event(buyer, t0), "type": "Nonsense"}
    bad_data = request_event(buyer, t0)
    bad_data["data"]["amount"] = 1.5
    raw_garbage = b"{not json"
    dlq_since = await kafka.end_offsets("risk.requests.dlq")
    since = await kafka.end_offsets("risk.decisions")
    await kafka.send("risk.requests", raw_garbage, key=buyer)
    await publish(kafka, unknown, bad_data, good, good, good)  # the same event three times
    found = await decisions(kafka, since, [good], settle=2.0)
    copies = found[good["data"]["order_id"]]
    assert {c["event_id"] for c in copies} == {decision_event_id(good["event_id"])}
    assert only(found, good)["data"]["decision"] == "approve"
    # the duplicates did not count as orders
    assert (await state(engine, "buyers", buyer))["orders_in_velocity_window"] == 1

    dead = await kafka.read("risk.requests.dlq", dlq_since,
                            lambda recs: sum(r.key == buyer.encode() for r in recs) >= 3, timeout=20)
    dead = [r for r in dead if r.key == buyer.encode()]
    assert [r.value for r in dead] == [raw_garbage, json.dumps(unknown).encode(), json.dumps(bad_data).encode()]
    codes = [dict(r.headers)["error.code"] for r in dead]
    assert codes == [b"INVALID_JSON", b"UNKNOWN_EVENT_TYPE", b"INVALID_DATA"]
    assert dict(dead[0].headers)["original.topic"] == b"risk.requests"
    assert set(dict(dead[0].headers)) == {"error.code", "error.message", "original.topic", "original.partition",
                                          "original.offset"}


async def test_restart_keeps_the_window_state(engine, kafka, infra):
    buyer = new_id("b")
    t0 = datetime.now(timezone.utc)
    orders = [request_event(buyer, t0 + timedelta(milliseconds=10 * i)) for i in range(25)]
    since = await kafka.end_offsets("risk.decisions")

    before = await kafka.end_offsets("risk.requests")
    await publish(kafka, *orders[:12])
    await decisions(kafka, since, orders[:12], settle=0)
    # Past the commit interval (1 s): the 12 are in the changelog and their offsets committed.
    # Waited for, not assumed: the test session's group starts a partition it never committed at
    # its end (auto_offset_reset latest), so without a commit the restart would skip the rest.
    await committed_through(infra.kafka, APP_ID, await kafka.end_offsets("risk.requests"), before)
    await publish(kafka, *orders[12:17])
    engine.kill(signal.SIGKILL)  # mid-run: the last five may or may not have been processed

    started = time.monotonic()
    engine.start()
    await engine.wait_healthy(90)
    print(f"\nrisk engine ready {time.monotonic() - started:.1f} s after a restart following SIGKILL")
    await publish(kafka, *orders[17:])
    found = await decisions(kafka, since, orders, timeout=60, settle=2.0)

    got = [only(found, r)["data"] for r in orders]  # re-sent copies after the crash are identical
    assert [d["decision"] for d in got] == ["approve"] * 20 + ["reject"] * 5, [d["message"] for d in got]
    assert got[20]["message"] == "rejected by buyer_velocity: 21 orders within 60 s (max 20)"
    s = await state(engine, "buyers", buyer)
    assert s["orders_in_velocity_window"] == 25 and s["accepted"]["1m"] == {"count": 20, "amount": 200_000}


async def test_state_lives_in_compacted_changelog_topics(engine, infra):
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    from shared.kafka import client_options

    admin = AIOKafkaAdminClient(bootstrap_servers=infra.kafka, **client_options())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        changelogs = [f"{APP_ID}-{t}-changelog" for t in ("cards", "buyers", "pairs", "sellers")]
        internal = [f"{APP_ID}-by-{k}" for k in ("card", "buyer", "seller")]
        assert set(changelogs + internal + ["risk.requests", "risk.decisions", "risk.requests.dlq"]) <= existing
        configs = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in changelogs])
        for response in configs:
            for resource in response.resources:
                config = dict((c[0], c[1]) for c in resource[4])
                assert config["cleanup.policy"] == "compact", (resource[3], config["cleanup.policy"])
                # small segments, or Kafka never compacts them (it cleans closed segments only)
                assert config["segment.bytes"] == str(16 * 2**20), (resource[3], config["segment.bytes"])
    finally:
        await admin.close()


async def test_changelogs_created_before_get_small_segments_at_start(infra, monkeypatch):
    """faust sets a changelog topic's configs only when it creates it: the engine's start brings
    those of an older deployment (Kafka's 1 GiB segments, so never compacted) to small segments."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    from services.risk.app import EngineSettings, _ensure_topics
    from shared.kafka import client_options

    app_id = f"risk-old-{uuid.uuid4().hex[:8]}"
    topic = f"{app_id}-buyers-changelog"
    admin = AIOKafkaAdminClient(bootstrap_servers=infra.kafka, **client_options())
    await admin.start()

    async def config() -> dict:
        [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        return {c[0]: c[1] for c in response.resources[0][4]}

    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1,
                                            topic_configs={"cleanup.policy": "compact", "max.message.bytes": "2000000"})])

        async def described():  # a new topic's configs can come back empty for a moment after its creation
            return "segment.bytes" in await config()
        await eventually(described, timeout=10)
        assert (await config())["segment.bytes"] == str(2**30)
        monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", infra.kafka)
        monkeypatch.setenv("RISK_APP_ID", app_id)
        await _ensure_topics(EngineSettings.from_env())

        async def small_segments():  # the broker shows a config change within a second or so
            c = await config()
            return (c["cleanup.policy"], c["segment.bytes"], c["segment.ms"]) == (
                "compact", str(16 * 2**20), str(10 * 60 * 1000))
        await eventually(small_segments, timeout=10)
        assert (await config())["max.message.bytes"] == "2000000"  # the topic's own other configs stay
    finally:
        await admin.delete_topics([topic, *(f"{app_id}-by-{k}" for k in ("card", "buyer", "seller"))])
        await admin.close()
