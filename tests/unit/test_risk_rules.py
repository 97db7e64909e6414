"""The risk rules (docs/contract.md §5) as pure functions: concrete values and the boundaries."""
from __future__ import annotations

import itertools
import json
from datetime import datetime, timedelta, timezone

import pytest

from services.risk import domain
from shared.settings import SettingsError
from services.risk.domain import (APPROVE, REJECT, REVIEW, BuyerState, CardState, Request, RiskSettings, SellerState,
                                  Windows)

T0 = datetime(2026, 11, 25, 10, 0, 0, tzinfo=timezone.utc)
S = RiskSettings()  # the contract's defaults
OLD_BUYER = T0 - timedelta(days=400)
_ids = itertools.count()


def req(amount: int = 10_000, at: datetime = T0, registered: datetime | None = OLD_BUYER,
        card: str | None = None) -> Request:
    return Request(amount=amount, accepted_at=at, buyer_registered_at=registered, card_token=card)


def run_buyer(requests: list[Request], state: BuyerState | None = None, card_declines: int = 0,
              s: RiskSettings = S) -> tuple[BuyerState, list[domain.Decision]]:
    state = state or BuyerState()
    out = []
    for r in requests:
        state, decision, duplicate = domain.buyer_apply(state, f"ev-{next(_ids)}", r, card_declines, s)
        assert not duplicate
        out.append(decision)
    return state, out


# ---------------------------------------------------------------- defaults follow the contract
def test_defaults_are_the_contract_values():
    assert (S.buyer_velocity_max, S.buyer_velocity_window_seconds) == (20, 60)
    assert (S.buyer_daily_amount_max_fen, S.buyer_daily_amount_window_seconds) == (5_000_000, 86_400)
    assert (S.card_decline_max, S.card_decline_window_seconds) == (5, 3_600)
    assert (S.new_buyer_seconds, S.new_buyer_amount_fen) == (86_400, 1_000_000)
    assert list(domain.RULES) == ["buyer_velocity", "buyer_daily_amount", "card_decline_burst",
                                  "new_buyer_large_amount"]
    assert [domain.RULES[r] for r in domain.RULES] == [REJECT, REJECT, REJECT, REVIEW]


# ---------------------------------------------------------------- buyer_velocity
def test_velocity_20th_order_in_60_s_is_approved_21st_rejected():
    assert domain.decide(req(), Windows(buyer_orders=19), S).decision == APPROVE  # this is the 20th
    d = domain.decide(req(), Windows(buyer_orders=20), S)  # the 21st
    assert d.decision == REJECT and d.rules == ("buyer_velocity",)
    assert d.message == "rejected by buyer_velocity: 21 orders within 60 s (max 20)"


def test_velocity_burst_through_the_window_state():
    burst = [req(at=T0 + timedelta(seconds=i)) for i in range(25)]  # 25 orders within 25 s
    state, decisions = run_buyer(burst)
    assert [d.decision for d in decisions] == [APPROVE] * 20 + [REJECT] * 5
    assert decisions[20].message.startswith("rejected by buyer_velocity: 21 orders")
    assert decisions[24].message.startswith("rejected by buyer_velocity: 25 orders")
    # rejected orders count too: 30 s later all 25 are still in the window
    _, (d,) = run_buyer([req(at=T0 + timedelta(seconds=30))], state)
    assert d.decision == REJECT and "26 orders" in d.message


def test_velocity_window_is_half_open_an_order_exactly_60_s_old_has_left_it():
    state, decisions = run_buyer([req(at=T0 + timedelta(milliseconds=i)) for i in range(20)])
    assert all(d.decision == APPROVE for d in decisions)
    # 59.999 s after the first one: all 20 are inside -> the 21st is rejected
    _, (d,) = run_buyer([req(at=T0 + timedelta(seconds=59, milliseconds=999))], state)
    assert d.decision == REJECT
    # 60.019 s after the first: exactly 60 s after the 20th one, so every earlier order has left
    _, (d,) = run_buyer([req(at=T0 + timedelta(seconds=60, milliseconds=19))], state)
    assert d.decision == APPROVE
    # 60.010 s: the orders at 11 … 19 ms (9 of them) are still inside -> the 10th, approved
    s2, (d,) = run_buyer([req(at=T0 + timedelta(seconds=60, milliseconds=10))], state)
    assert d.decision == APPROVE and s2.windows(domain.to_ms(T0 + timedelta(seconds=60, milliseconds=10)), S)[0] == 10


def test_velocity_threshold_is_a_setting():
    s = RiskSettings(buyer_velocity_max=3, buyer_velocity_window_seconds=10)
    _, decisions = run_buyer([req(at=T0 + timedelta(seconds=i)) for i in range(5)], s=s)
    assert [d.decision for d in decisions] == [APPROVE, APPROVE, APPROVE, REJECT, REJECT]
    assert decisions[3].message == "rejected by buyer_velocity: 4 orders within 10 s (max 3)"


# ---------------------------------------------------------------- buyer_daily_amount
def test_daily_amount_reaching_the_max_is_approved_exceeding_it_rejected():
    assert domain.decide(req(amount=1_000_000), Windows(buyer_accepted_amount=4_000_000), S).decision == APPROVE
    d = domain.decide(req(amount=1_000_001), Windows(buyer_accepted_amount=4_000_000), S)
    assert d.decision == REJECT and d.rules == ("buyer_daily_amount",)
    assert d.message == ("rejected by buyer_daily_amount: 5000001 fen accepted within 24 h with this order "
                         "(max 5000000)")
    # a single order above the max, with nothing accepted before
    assert domain.decide(req(amount=5_000_001), Windows(), S).rules == ("buyer_daily_amount",)


def test_daily_amount_counts_approved_and_reviewed_but_not_rejected_orders():
    minute = timedelta(minutes=1)
    state, decisions = run_buyer([
        req(amount=3_000_000, at=T0),                 # approve: 3 000 000
        req(amount=3_000_000, at=T0 + minute),        # 6 000 000 > max: reject, does not count
        req(amount=2_000_000, at=T0 + 2 * minute),    # 5 000 000: approve
        req(amount=1, at=T0 + 3 * minute),            # 5 000 001: reject
    ])
    assert [d.decision for d in decisions] == [APPROVE, REJECT, APPROVE, REJECT]
    assert state.windows(domain.to_ms(T0 + 3 * minute), S)[1] == 5_000_000

    # a review (new buyer, large amount) counts toward the window
    new = T0 - timedelta(hours=1)
    state, decisions = run_buyer([req(amount=2_000_000, at=T0, registered=new),
                                  req(amount=3_000_001, at=T0 + minute, registered=new)])
    assert [d.decision for d in decisions] == [REVIEW, REJECT]
    assert decisions[1].rules == ("buyer_daily_amount", "new_buyer_large_amount")


def test_daily_amount_window_slides_on_accepted_at():
    state, _ = run_buyer([req(amount=5_000_000, at=T0)])
    _, (d,) = run_buyer([req(amount=1, at=T0 + timedelta(hours=23, minutes=59, seconds=59))], state)
    assert d.decision == REJECT
    _, (d,) = run_buyer([req(amount=1, at=T0 + timedelta(hours=24))], state)  # exactly 24 h later: left the window
    assert d.decision == APPROVE
    # the test clock may jump days ahead: the windows follow accepted_at, not the wall clock
    state2, (d,) = run_buyer([req(amount=5_000_000, at=T0 + timedelta(days=3))], state)
    assert d.decision == APPROVE and state2.accepted == ((domain.to_ms(T0 + timedelta(days=3)), 5_000_000),)


def test_an_order_rejected_by_the_card_rule_does_not_count_toward_the_amount():
    state, (d,) = run_buyer([req(amount=4_000_000, card="tok_x")], card_declines=5)
    assert d.decision == REJECT and d.rules == ("card_decline_burst",)
    assert state.accepted == () and len(state.orders) == 1  # still counts for velocity
    _, (d,) = run_buyer([req(amount=5_000_000, at=T0 + timedelta(seconds=1), card="tok_y")], state)
    assert d.decision == APPROVE


# ---------------------------------------------------------------- card_decline_burst
def test_card_with_4_declines_is_fine_5_declines_rejects_further_payments():
    assert domain.decide(req(card="tok_a"), Windows(card_declines=4), S).decision == APPROVE
    d = domain.decide(req(card="tok_a"), Windows(card_declines=5), S)
    assert d.decision == REJECT and d.rules == ("card_decline_burst",)
    assert d.message == "rejected by card_decline_burst: 5 declines on card tok_a within 1 h (limit 5)"
    assert domain.decide(req(card="tok_a"), Windows(card_declines=9), S).decision == REJECT
    # no card, no card rule
    assert domain.decide(req(card=None), Windows(card_declines=9), S).decision == APPROVE


def test_card_decline_window_state():
    card = CardState()
    for i in range(5):
        card, duplicate = domain.card_decline(card, f"d{i}", T0 + timedelta(minutes=i), S)
        assert not duplicate
    # the same decline delivered again counts once
    card2, duplicate = domain.card_decline(card, "d4", T0 + timedelta(minutes=4), S)
    assert duplicate and card2 is card
    at = domain.to_ms(T0 + timedelta(minutes=10))
    assert card.decline_count(at, S) == 5
    # one hour after the first decline it has left the window: 4 remain
    assert card.decline_count(domain.to_ms(T0 + timedelta(hours=1)), S) == 4
    assert card.decline_count(domain.to_ms(T0 + timedelta(minutes=59, seconds=59)), S) == 5
    # old declines are pruned from the state as time moves on
    card, _ = domain.card_decline(card, "d-late", T0 + timedelta(hours=5), S)
    assert [e for _, e in card.declines] == ["d-late"]


def test_card_requests_get_the_decline_count_and_a_redelivery_gets_the_same_count_again():
    card, declines = domain.card_request(CardState(), "r1", 500, T0, S)
    assert declines == 0
    for i in range(5):
        card, _ = domain.card_decline(card, f"d{i}", T0 + timedelta(minutes=1), S)
    card, declines = domain.card_request(card, "r2", 700, T0 + timedelta(minutes=30), S)
    assert declines == 5
    # r1 delivered again after the declines: same answer as the first time, nothing counted twice
    again, declines = domain.card_request(card, "r1", 500, T0, S)
    assert again is card and declines == 0
    stats = card.stats(domain.to_ms(T0 + timedelta(minutes=30)))
    assert stats["1m"] == {"count": 1, "amount": 700}
    assert stats["1h"] == stats["24h"] == {"count": 2, "amount": 1200}


# ---------------------------------------------------------------- new_buyer_large_amount
def test_new_buyer_large_amount_goes_to_review():
    new = T0 - timedelta(hours=23, minutes=59, seconds=59)
    d = domain.decide(req(amount=1_000_001, registered=new), Windows(), S)
    assert d.decision == REVIEW and d.rules == ("new_buyer_large_amount",)
    assert d.message == ("review required by new_buyer_large_amount: buyer registered 23:59:59 before the order "
                         "(less than 24 h), amount 1000001 fen > 1000000")
    # exactly the threshold amount is not "more than"
    assert domain.decide(req(amount=1_000_000, registered=new), Windows(), S).decision == APPROVE
    # registered exactly 24 h before: no longer new
    assert domain.decide(req(amount=1_000_001, registered=T0 - timedelta(hours=24)), Windows(), S).decision == APPROVE
    # registration unknown: the rule does not fire
    assert domain.decide(req(amount=4_000_000, registered=None), Windows(), S).decision == APPROVE


# ---------------------------------------------------------------- precedence
def test_reject_beats_review_and_every_fired_rule_is_named():
    new = T0 - timedelta(minutes=5)
    d = domain.decide(req(amount=2_000_000, registered=new, card="tok_b"),
                      Windows(buyer_orders=20, buyer_accepted_amount=4_000_000, card_declines=5), S)
    assert d.decision == REJECT
    assert d.rules == ("buyer_velocity", "buyer_daily_amount", "card_decline_burst", "new_buyer_large_amount")
    assert d.message.startswith("rejected by buyer_velocity: 21 orders within 60 s (max 20); buyer_daily_amount: ")
    assert "card_decline_burst: 5 declines" in d.message
    assert "(also fired: new_buyer_large_amount: " in d.message

    d = domain.decide(req(amount=2_000_000, registered=new), Windows(buyer_orders=20), S)
    assert (d.decision, d.rules) == (REJECT, ("buyer_velocity", "new_buyer_large_amount"))


def test_a_plain_order_is_approved_with_no_rules():
    d = domain.decide(req(), Windows(buyer_orders=3, buyer_accepted_amount=100, card_declines=1), S)
    assert d == domain.Decision(APPROVE, (), "approved: no rule fired")


# ---------------------------------------------------------------- redeliveries and replays
def test_a_redelivered_request_gets_the_same_decision_and_changes_nothing():
    state, _ = run_buyer([req(at=T0 + timedelta(seconds=i)) for i in range(20)])
    r21 = req(at=T0 + timedelta(seconds=21))
    state2, first, dup = domain.buyer_apply(state, "ev-21", r21, 0, S)
    assert (first.decision, dup) == (REJECT, False)
    state3, again, dup = domain.buyer_apply(state2, "ev-21", r21, 0, S)
    assert dup and again == first and state3 == state2
    # an earlier (approved) one is still known too
    _, again, dup = domain.buyer_apply(state2, state.decided[0][0], req(at=T0), 0, S)
    assert dup and again.decision == APPROVE


def test_replaying_the_same_events_gives_the_same_decisions():
    burst = [req(amount=400_000, at=T0 + timedelta(seconds=i)) for i in range(24)]
    _, a = run_buyer(burst)
    _, b = run_buyer(burst)
    assert a == b and [d.decision for d in a].count(REJECT) == 12  # 12 × 400 000 = 4.8 M; then velocity


def test_decision_event_id_is_deterministic():
    assert domain.decision_event_id("e1") == domain.decision_event_id("e1") != domain.decision_event_id("e2")


def test_states_survive_a_json_round_trip():
    state, _ = run_buyer([req(amount=300, at=T0 + timedelta(seconds=i)) for i in range(22)])
    assert BuyerState.from_json(json.loads(json.dumps(state.to_json()))) == state
    card, _ = domain.card_decline(domain.card_request(CardState(), "r", 5, T0, S)[0], "d", T0, S)
    assert CardState.from_json(json.loads(json.dumps(card.to_json()))) == card
    seller = domain.seller_add(SellerState(), "r", 5, T0, REJECT)
    assert SellerState.from_json(json.loads(json.dumps(seller.to_json()))) == seller
    assert BuyerState.from_json(None) == BuyerState()


def test_seller_windows_count_every_order_and_the_accepted_amount():
    s = SellerState()
    s = domain.seller_add(s, "a", 1_000, T0, APPROVE)
    s = domain.seller_add(s, "b", 2_000, T0 + timedelta(minutes=10), REJECT)
    s = domain.seller_add(s, "c", 4_000, T0 + timedelta(hours=2), REVIEW)
    assert domain.seller_add(s, "c", 4_000, T0 + timedelta(hours=2), REVIEW) is s
    stats = s.stats(domain.to_ms(T0 + timedelta(hours=2)))
    assert stats["orders"]["1h"] == {"count": 1, "amount": 4_000}
    assert stats["orders"]["24h"] == {"count": 3, "amount": 7_000}
    assert stats["accepted"]["24h"] == {"count": 2, "amount": 5_000}


# ---------------------------------------------------------------- settings
def test_settings_from_the_environment():
    s = RiskSettings.from_env({"RISK_BUYER_VELOCITY_MAX": "3", "RISK_CARD_DECLINE_WINDOW_SECONDS": "600",
                               "RISK_DISABLED_RULES": "new_buyer_large_amount, buyer_daily_amount"})
    assert s.buyer_velocity_max == 3 and s.card_decline_window_seconds == 600 and s.card_decline_max == 5
    assert s.disabled_rules == {"new_buyer_large_amount", "buyer_daily_amount"}
    d = domain.decide(req(amount=9_000_000, registered=T0), Windows(), s)
    assert d.decision == APPROVE  # both rules that would fire are off
    assert RiskSettings.from_env({}) == S


@pytest.mark.parametrize("env", [{"RISK_BUYER_VELOCITY_MAX": "twenty"}, {"RISK_BUYER_VELOCITY_MAX": "-1"},
                                 {"RISK_CARD_DECLINE_WINDOW_SECONDS": "0"}, {"RISK_DISABLED_RULES": "no_such_rule"},
                                 {"RISK_BUYER_VELOCITY_MAX": "5000"}])
def test_bad_settings_are_refused(env):
    with pytest.raises(SettingsError, match="RISK_"):
        RiskSettings.from_env(env)


def test_engine_settings_and_the_faust_app(monkeypatch):
    from services.risk.app import EngineSettings, build

    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "k1:9092, k2:9093")
    monkeypatch.setenv("RISK_BUYER_VELOCITY_MAX", "7")
    monkeypatch.setenv("WEB_PORT", "9999")  # faust's own variable names do not leak in
    for name in ("RISK_WEB_PORT", "RISK_APP_ID", "KAFKA_TOPIC_PARTITIONS"):
        monkeypatch.delenv(name, raising=False)
    settings = EngineSettings.from_env()
    assert settings.broker == "kafka://k1:9092;kafka://k2:9093"
    assert settings.rules.buyer_velocity_max == 7 and settings.web_port == 8005
    app = build(settings)
    assert app.conf.web_port == 8005 and app.conf.broker_session_timeout == 10
    assert set(app.tables) == {"cards", "buyers", "pairs", "sellers"}
    assert app.tables["buyers"].changelog_topic.get_topic_name() == "risk-engine-buyers-changelog"
    # a drain's table writes fit in faust's producer buffer without stopping the agents' input
    from services.risk.app import DRAIN_MAX
    assert app.producer.buffer.max_messages >= 2 * DRAIN_MAX


def test_the_engine_keeps_its_states_as_json_bytes_out_of_the_garbage_collectors_walks():
    """Tables of dicts and lists were some ten tracked objects per key: every full collection
    walked them all (0.3-0.6 s pauses of the engine with a few ten thousand buyers). A state is
    kept as its JSON bytes, which the collector does not track; changelog records written as JSON
    before read back the same."""
    import gc

    from services.risk.app import EngineSettings, build, packed, unpacked

    app = build(EngineSettings.from_env())
    assert {n: app.tables[n].value_serializer for n in ("cards", "buyers", "sellers")} == dict.fromkeys(
        ("cards", "buyers", "sellers"), "raw")
    state, _ = run_buyer([req(1_000, T0), req(2_000, T0 + timedelta(seconds=1))])
    value = packed(state)
    assert isinstance(value, bytes) and not gc.is_tracked(value)
    assert unpacked(BuyerState, value) == state
    assert unpacked(BuyerState, json.dumps(state.to_json()).encode()) == state
    assert unpacked(BuyerState, None) == BuyerState()


def test_a_failed_payment_leaves_the_daily_amount_window_once():
    state, _ = run_buyer([req(2_000_000, T0), req(2_000_000, T0 + timedelta(seconds=1))])
    assert state.windows(domain.to_ms(T0) + 2_000, S)[1] == 4_000_000
    forgotten = domain.buyer_forget(state, "abandon-1", T0 + timedelta(seconds=1), 2_000_000)
    assert forgotten.windows(domain.to_ms(T0) + 2_000, S)[1] == 2_000_000
    assert domain.buyer_forget(forgotten, "abandon-1", T0, 2_000_000) is forgotten  # once per event
    # Another 2 500 000 now fits under the 5 000 000 limit; it would not have before.
    _, decisions = run_buyer([req(2_500_000, T0 + timedelta(seconds=2))], state=forgotten)
    assert decisions[0].decision == APPROVE
    _, decisions = run_buyer([req(2_500_000, T0 + timedelta(seconds=2))], state=state)
    assert decisions[0].decision == REJECT


def test_forgetting_what_was_never_counted_changes_nothing():
    state, _ = run_buyer([req(1_000, T0)])
    assert domain.buyer_forget(state, "abandon-2", T0, 9_999) is state
    assert domain.buyer_forget(state, "abandon-3", T0 + timedelta(seconds=5), 1_000) is state


async def test_the_agents_queues_keep_their_records_when_faust_resumes_flow_control():
    """faust's flow_control.resume() clears every channel queue, and table recovery calls it at its
    end *after* it resumed the partitions and awaited the seek to the committed offsets: records
    the fetcher handed to an agent during that seek, and that the agent had not taken yet, were
    dropped, never decided and (faust's read offset reset by the seek opening a gap over them)
    committed over. After a SIGKILL restart that lost a request's decision
    (test_restart_keeps_the_window_state, about 1 run in 5). Each agent's queue must keep its
    records on resume; a revocation's clear() must still empty it."""
    from services.risk.app import EngineSettings, build

    app = build(EngineSettings.from_env())
    queues = {}

    class Channel:
        def __init__(self, name):
            self.queue = queues[name] = app.FlowControlQueue(maxsize=10, clear_on_resume=True)

        def empty(self):
            return self.queue.empty()

    class Stream:  # just enough of a faust stream for each agent to start and find its input ended
        def __init__(self, name):
            self.channel = Channel(name)

        def noack(self):
            return self

        async def events(self):
            return
            yield

        def __aiter__(self):
            return self.events()

        async def take(self, max_, within):
            return
            yield

    for name, agent in app.agents.items():
        await agent.fun(Stream(name))
    assert set(queues) == {"route", "card_stage", "buyer_stage", "seller_stage"}
    for q in queues.values():
        q.put_nowait("record")
    app.flow_control.suspend()
    app.flow_control.resume()  # what Recovery.on_recovery_completed does once the seek returned
    assert {name: q.qsize() for name, q in queues.items()} == dict.fromkeys(queues, 1)
    app.flow_control.clear()  # what App._on_partitions_revoked does
    assert {name: q.qsize() for name, q in queues.items()} == dict.fromkeys(queues, 0)
