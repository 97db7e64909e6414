"""Where an idempotency key comes from: the Idempotency-Key header or the body's idempotency_key."""
from __future__ import annotations

import pytest
from starlette.requests import Request

from shared import idempotency
from shared.errors import ApiError


def request(header: str | None = None) -> Request:
    headers = [(b"idempotency-key", header.encode())] if header is not None else []
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers})


def test_the_key_from_the_header_or_the_body():
    assert idempotency.key(request("k-1"), None) == "k-1"
    assert idempotency.key(request(), "k-1") == "k-1"
    assert idempotency.key(request("k-1"), "k-1") == "k-1"  # both, the same


@pytest.mark.parametrize("header, body", [("k-1", "k-2"), (None, None), ("", None), ("x" * 65, None)])
def test_missing_bad_or_different_keys_are_400(header, body):
    with pytest.raises(ApiError) as info:
        idempotency.key(request(header), body)
    assert (info.value.status, info.value.code) == (400, "INVALID_REQUEST")


def test_the_request_hash_ignores_key_order():
    assert idempotency.request_hash({"a": 1, "b": 2}) == idempotency.request_hash({"b": 2, "a": 1})
    assert idempotency.request_hash({"a": 1}) != idempotency.request_hash({"a": 2})


@pytest.mark.parametrize("model, body", [
    ("TopUp", {"amount": 100, "card_token": "tok_visa"}),
    ("Withdrawal", {"amount": 100}),
    ("Repayment", {"amount": 100, "source": "bank_card", "card_token": "tok_visa"}),
])
def test_a_gateway_write_is_the_same_request_with_its_key_in_the_header_or_the_body(model, body):
    from services.gateway import api
    cls = getattr(api, model)
    in_header = api.fingerprint(cls.model_validate(body), idempotency.key(request("k-1"), None))
    in_body = api.fingerprint(cls.model_validate({**body, "idempotency_key": "k-1"}),
                              idempotency.key(request(), "k-1"))
    assert idempotency.request_hash(in_header) == idempotency.request_hash(in_body)
    # as stored before the header was accepted: the body as given, key included
    assert idempotency.request_hash(in_body) == idempotency.request_hash(
        {**{f: None for f in cls.model_fields}, **body, "idempotency_key": "k-1"})
    other = api.fingerprint(cls.model_validate({**body, "amount": 5}), "k-1")
    assert idempotency.request_hash(other) != idempotency.request_hash(in_body)
