"""Hostile HTTP bodies: a NUL in any text field is a 400 with the error body, and nothing is written."""
from __future__ import annotations

import json

from tests.integration.conftest import new_id


async def test_nul_in_a_body_text_is_refused_and_nothing_is_written(api):
    user_id = new_id("u")
    body = {"user_id": user_id, "full_name": "Zhang\u0000San", "birth_date": "1990-01-01", "phone": "13912345678",
            "id_number": "110101199001011234", "real_name_verified": True}
    response = await api("gateway").post("/v1/users", content=json.dumps(body),
                                         headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "INVALID_REQUEST" and "NUL" in response.json()["error"]["message"]
    assert (await api("gateway").get(f"/v1/users/{user_id}")).status_code == 404


async def test_nul_in_an_idempotency_key_is_refused(api):
    user_id = new_id("u")
    response = await api("gateway").post(f"/v1/wallets/{user_id}/top-ups",
                                         json={"amount": 100, "card_token": "tok_visa", "idempotency_key": "k\u0000"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "INVALID_REQUEST"


async def test_an_escaped_backslash_before_u0000_is_plain_text(api):
    # `\\u0000` in JSON is a backslash followed by "u0000": no NUL, so not refused for that.
    user_id = new_id("u")
    raw = ('{"user_id": "%s", "full_name": "a\\\\u0000b", "birth_date": "1990-01-01", "phone": "139%08d", '
           '"id_number": "%s", "real_name_verified": true}' % (user_id, abs(hash(user_id)) % 10**8, new_id("id").replace("-", "")))
    response = await api("gateway").post("/v1/users", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 201, response.text


async def test_a_birth_date_after_the_platform_clock_today_is_refused(api):
    user_id = new_id("u")
    body = {"user_id": user_id, "full_name": "Future Kid", "birth_date": "2999-01-01", "phone": "13912345678",
            "id_number": "110101299901011234", "real_name_verified": True}
    response = await api("gateway").post("/v1/users", json=body)
    assert response.status_code == 400 and response.json()["error"]["code"] == "INVALID_REQUEST", response.text
    assert "birth_date" in response.json()["error"]["message"]
    assert (await api("gateway").get(f"/v1/users/{user_id}")).status_code == 404
