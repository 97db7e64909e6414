"""The ops tools' pure parts: what counts as a disagreement in an order's story, and dead-letter
positions and edits."""
from datetime import datetime, timedelta, timezone

import pytest

from deploy.ops import dlq, story
from deploy.ops.__main__ import _set_path

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)


def _story(gateway=None, escrow=None, credit=None, transfers=None, timeline=()):
    return {"status": {"gateway": gateway, "escrow": escrow, "credit": credit, "billing": None, "escrow_refunds": []},
            "transfers": transfers or {}, "timeline": list(timeline)}


def _gw(status="HELD", saga="COMPLETED", method="balance", deadline=None):
    return {"status": status, "saga_state": saga, "payment_method": method, "deadline_at": deadline}


def _t(id_, debit, credit, amount, kind="posted", pending_id=None):
    return {"id": id_, "debit_account": debit, "credit_account": credit, "amount": amount, "kind": kind,
            "pending_id": pending_id}


def test_a_held_payment_with_matching_ledgers_is_consistent():
    s = _story(_gw(), {"status": "HELD", "auto_confirm_at": None},
               transfers={"gateway": [_t("p", "wallet:b", "escrow", 500, "pending"),
                                      _t("pp", "wallet:b", "escrow", 500, "post_pending", "p")],
                          "escrow": [_t("h", "gateway", "hold:o", 500)]})
    assert story.order_problems(s, NOW) == []


def test_status_disagreement_is_named():
    s = _story(_gw("RELEASED"), {"status": "HELD", "auto_confirm_at": None})
    assert story.order_problems(s, NOW) == ["gateway says RELEASED but escrow says HELD"]
    assert story.order_problems(_story(_gw("HELD"), None), NOW) == ["gateway says HELD but escrow says no escrow"]


def test_a_pending_transfer_left_open_after_the_saga_is_a_problem():
    s = _story(_gw("FAILED", "FAILED"), None, transfers={"gateway": [_t("p", "wallet:b", "escrow", 500, "pending")]})
    assert story.order_problems(s, NOW) == ["gateway pending transfer p was never posted nor voided"]


def test_a_hand_over_missing_on_one_side_is_a_problem():
    s = _story(_gw(), {"status": "HELD", "auto_confirm_at": None},
               transfers={"gateway": [_t("x", "wallet:b", "escrow", 500)], "escrow": []})
    [problem] = story.order_problems(s, NOW)
    assert "handed 500 fen to escrow" in problem and "escrow ledger has 0 fen" in problem


def test_late_timers_and_huabei_reservations_are_problems():
    s = _story(_gw("PENDING", "RISK_CHECK", deadline=NOW - timedelta(seconds=1)), None)
    assert story.order_problems(s, NOW) == [f"saga RISK_CHECK is past its deadline {NOW - timedelta(seconds=1):%Y-%m-%d %H:%M:%S}.000Z"]
    s = _story(_gw("FAILED", "FAILED", method="huabei"), None, credit={"state": "reserved", "expires_at": NOW})
    assert story.order_problems(s, NOW) == ["gateway saga FAILED but the credit reservation is reserved"]
    s = _story(None, {"status": "HELD", "auto_confirm_at": NOW - timedelta(hours=1)})
    assert story.order_problems(s, NOW) == ["hold past its auto-confirm time 2026-11-29 11:00:00.000Z"]


def test_the_story_names_the_orders_trace_when_one_was_kept():
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert story.trace_id_of(f"00-{trace}-00f067aa0ba902b7-01") == trace
    assert story.trace_id_of(None) is None and story.trace_id_of("garbage") is None


def test_dead_letter_positions():
    assert dlq.parse_position("orders.events.dlq:3:17") == ("orders.events.dlq", 3, 17)
    for bad in ("orders.events:3:17", "orders.events.dlq:x:1", "nonsense"):
        with pytest.raises(dlq.ReplayError):
            dlq.parse_position(bad)


def test_replay_edits_and_validation():
    env = {"data": {"amount": "lots"}}
    _set_path(env, "data.amount", "7000")
    _set_path(env, "data.reason", "not json")
    assert env == {"data": {"amount": 7000, "reason": "not json"}}
    with pytest.raises(dlq.ReplayError) as err:
        dlq.validate("orders.events", b'{"event_id": "e"}')
    assert err.value.code == "INVALID_ENVELOPE"
    with pytest.raises(dlq.ReplayError) as err:
        dlq.validate("orders.events", "\ufeff{}".encode("utf-16"))
    assert err.value.code == "INVALID_JSON"


def test_dead_letter_keeps_own_headers_apart_from_error_headers():
    letter = dlq.DeadLetter("orders.events.dlq", 0, 5, NOW, b"o-1", b"{}",
                            [("traceparent", b"00-abc"), ("error.code", b"INVALID_DATA"),
                             ("original.topic", b"orders.events"), ("original.offset", b"9")])
    assert letter.own_headers == [("traceparent", b"00-abc")]
    assert letter.original_topic == "orders.events" and letter.header("error.code") == "INVALID_DATA"
