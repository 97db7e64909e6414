"""The contract's event models: strict, letter by letter (docs/contract.md §2–4)."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from shared import topics
from shared.events import SCHEMAS, DecodeError, OrderPlaced, PaymentFailed, decode, encode, new_event

ORDER_SCHEMAS = SCHEMAS[topics.ORDERS]


def env(type_="OrderPlaced", data=None, **over):
    base = {"event_id": "e-1", "type": type_, "version": 1, "occurred_at": "2026-11-25T10:00:00Z",
            "source": "shop", "data": data if data is not None else order()}
    base.update(over)
    return json.dumps(base).encode()


def order(**over):
    return {"order_id": "o-1", "buyer_id": "b-1", "seller_id": "s-1", "amount": 100, "currency": "CNY",
            "payment_method": "balance", **over}


def code_of(raw: bytes) -> str:
    with pytest.raises(DecodeError) as info:
        decode(raw, ORDER_SCHEMAS, topics.ORDERS)
    return info.value.code


def test_valid_order_placed_gets_defaults():
    envelope, data = decode(env(), ORDER_SCHEMAS)
    assert envelope.event_id == "e-1"
    assert isinstance(data, OrderPlaced)
    assert (data.installments, data.auto_confirm_days, data.card_token) == (1, 10, None)


@pytest.mark.parametrize("raw, code", [
    (b"{not json", "INVALID_JSON"),
    (b"\xff\xfe", "INVALID_JSON"),
    (b"[1, 2]", "INVALID_ENVELOPE"),
    (env(version=2), "INVALID_ENVELOPE"),
    (env(occurred_at="yesterday"), "INVALID_ENVELOPE"),
    (env(occurred_at="2026-11-25T10:00:00"), "INVALID_ENVELOPE"),  # RFC 3339 needs an offset
    (env(event_id=""), "INVALID_ENVELOPE"),
    (env(surprise=1), "INVALID_ENVELOPE"),
    (env(type_="OrderTeleported"), "UNKNOWN_EVENT_TYPE"),
])
def test_envelope_errors(raw, code):
    assert code_of(raw) == code


@pytest.mark.parametrize("data", [
    order(amount=0), order(amount=-1), order(amount=100_000_001), order(amount=1.0), order(amount="100"),
    order(amount=True), order(currency="USD"), order(payment_method="cash"), order(order_id="has space"),
    order(order_id="x" * 65), order(extra="field"), {k: v for k, v in order().items() if k != "buyer_id"},
    order(payment_method="bank_card"),                         # card_token required
    order(card_token="tok_ok"),                                # card_token forbidden for balance
    order(payment_method="bank_card", card_token="4111111111111111"),  # a card number, not a token
    order(payment_method="huabei", installments=2),
    order(installments=3),                                     # installments are Huabei's
    order(auto_confirm_days=0), order(auto_confirm_days=31),
])
def test_order_placed_schema_violations(data):
    assert code_of(env(data=data)) == "INVALID_DATA"


def test_every_order_type_is_strict():
    assert decode(env("OrderShipped", {"order_id": "o-1"}), ORDER_SCHEMAS)[1].order_id == "o-1"
    assert code_of(env("OrderShipped", {"order_id": "o-1", "x": 1})) == "INVALID_DATA"
    assert code_of(env("OrderCancelled", {"order_id": "o-1", "reason": "x" * 201})) == "INVALID_DATA"
    refund = {"order_id": "o-1", "refund_id": "r-1", "amount": 5, "reason": "broken"}
    assert decode(env("RefundRequested", refund), ORDER_SCHEMAS)[1].amount == 5
    assert code_of(env("RefundRequested", {**refund, "amount": 0})) == "INVALID_DATA"


def test_valid_method_combinations():
    assert decode(env(data=order(payment_method="bank_card", card_token="tok_visa_1")), ORDER_SCHEMAS)
    assert decode(env(data=order(payment_method="huabei", installments=12)), ORDER_SCHEMAS)[1].installments == 12


def test_new_event_round_trips_through_the_envelope():
    from datetime import datetime, timezone

    failed = PaymentFailed(order_id="o-1", reason_code="DUPLICATE_ORDER", message="dup")
    out = new_event(failed, source="payment-gateway", occurred_at=datetime(2026, 11, 25, 10, tzinfo=timezone.utc),
                    correlation_id="o-1", causation_id="e-1")
    assert out["occurred_at"] == "2026-11-25T10:00:00.000Z"
    envelope, data = decode(encode(out), SCHEMAS[topics.PAYMENTS])
    assert envelope.type == "PaymentFailed" and data == failed


def test_payment_failed_reason_codes_are_the_contracts():
    with pytest.raises(ValueError):
        PaymentFailed(order_id="o-1", reason_code="SOMETHING_ELSE", message="")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "utf-16-le"])
def test_only_utf8_is_json(encoding):
    raw = env().decode().encode(encoding)
    assert code_of(raw) == "INVALID_JSON"


def test_a_nul_in_any_text_is_refused_by_the_schema():
    assert code_of(env("OrderCancelled", {"order_id": "o-1", "reason": "bad\u0000reason"})) == "INVALID_DATA"
    assert code_of(env(source="shop\u0000")) == "INVALID_ENVELOPE"
    assert code_of(env(correlation_id="c\u0000")) == "INVALID_ENVELOPE"
    with pytest.raises(DecodeError) as info:
        decode(env("OrderCancelled", {"order_id": "o-1", "reason": "\u0000"}), ORDER_SCHEMAS, topics.ORDERS)
    assert "NUL" in info.value.message


def test_a_backslash_u_that_is_not_a_nul_is_fine():
    _, data = decode(env("OrderCancelled", {"order_id": "o-1", "reason": "typed \\u0000 by a human"}),
                     ORDER_SCHEMAS, topics.ORDERS)
    assert data.reason == "typed \\u0000 by a human"


def test_encoding_is_byte_for_byte_what_the_json_module_writes():
    envelope = new_event(OrderPlaced(order_id="o-1", buyer_id="b-1", seller_id="s-1", amount=100, currency="CNY",
                                     payment_method="balance"), source="商店\n\u2028\"x\"",
                         occurred_at=datetime(2026, 11, 29, tzinfo=timezone.utc))
    assert encode(envelope) == json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode()


@pytest.mark.parametrize("raw, code", [
    (env(data=order(amount=2 ** 70)), "INVALID_DATA"),   # beyond 64 bits: too large (a float to orjson)
    (env(data=order(amount=float("nan"))), "INVALID_DATA"),  # NaN: the json module's leniency kept
    ("{\"event_id\": \"e-1\"}".encode("utf-16"), "INVALID_JSON"),  # UTF-8 only
])
def test_the_fast_parser_keeps_every_error_code(raw, code):
    assert code_of(raw) == code
