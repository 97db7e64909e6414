"""The audit trail of operator actions (shared/audit.py): every /admin/* call that may change
something, on every service, is recorded with who, what, when and the outcome, and read back at
GET /admin/audit-log (operator only, newest first)."""
from __future__ import annotations

import json

from shared.auth import fingerprint
from tests.integration.conftest import API_TOKEN, SERVICES, eventually, user_token


async def _trail(client, limit=20, **params):
    response = await client.get("/admin/audit-log", params={"limit": limit, **params})
    assert response.status_code == 200, response.text
    return response.json()


async def test_a_risk_review_is_recorded_and_read_back(shop):
    gateway = shop.api("gateway")
    buyer, seller = await shop.user(balance=2_000_000), await shop.user()  # a new buyer: large amounts go to review
    order = await shop.place(buyer, seller, 1_500_000)

    async def in_review():
        return (await shop.payment(order)).get("risk_decision") == "review"
    await eventually(in_review)
    response = await gateway.post(f"/admin/payments/{order}/risk-review", json={"decision": "approve"},
                                  headers={"X-Operator": "alice"})
    assert response.status_code == 200, response.text

    (entry,) = [e for e in await _trail(gateway) if e["path"] == f"/admin/payments/{order}/risk-review"]
    assert entry["operator"] == "alice" and entry["token_id"] == fingerprint(API_TOKEN)
    assert (entry["method"], entry["body"], entry["status"]) == ("POST", {"decision": "approve"}, 200)
    assert entry["at"].endswith("Z") and entry["finished_at"] >= entry["at"]
    # Reading the trail, or anything else, is not an action: only the review is there.
    assert not [e for e in await _trail(gateway, 100) if e["method"] == "GET"]


async def test_every_service_records_clock_moves_and_refusals_newest_first(services, api, db):
    for name in SERVICES:
        client = api(name)
        moved = await client.post("/admin/clock", json={"advance_seconds": 1}, headers={"X-Operator": f"bob-{name}"})
        assert moved.status_code == 200
        # A refused body: its secret field is masked in the trail, the outcome is the 400.
        bad = await client.post("/admin/clock", json={"advance_seconds": 1, "api_token": API_TOKEN,
                                                      "phone": "13812345678", "note": "x" * 500})
        assert bad.status_code == 400
        # No token and a user token: refused, recorded with no operator fingerprint.
        anonymous = await client.post("/admin/clock", json={"advance_seconds": 1}, headers={"Authorization": ""})
        assert anonymous.status_code == 401
        as_user = await client.post("/admin/clock", json={"advance_seconds": 1},
                                    headers={"Authorization": f"Bearer {user_token('mallory')}"})
        assert as_user.status_code == 403

        newest = await _trail(client, limit=4)
        assert [e["status"] for e in newest] == [403, 401, 400, 200], name
        assert [e["id"] for e in newest] == sorted((e["id"] for e in newest), reverse=True)
        forbidden, unauthenticated, refused, done = newest
        assert forbidden["token_id"] == "user:mallory" and unauthenticated["token_id"] is None
        assert refused["body"]["api_token"] == "***" and refused["body"]["phone"] == "***"
        assert refused["body"]["advance_seconds"] == 1 and len(refused["body"]["note"]) <= 101
        assert done["operator"] == f"bob-{name}" and done["body"] == {"advance_seconds": 1}
        assert await _trail(client, limit=1, before=done["id"]) != [done]

        # The trail is the operator's only.
        assert (await client.get("/admin/audit-log", headers={"Authorization": f"Bearer {user_token('u')}"})
                ).status_code == 403
        assert (await client.get("/admin/audit-log", params={"limit": 0})).status_code == 400

    # Each service keeps its own trail in its own schema, and no token is in any of them.
    for name in SERVICES:
        rows = await db.fetch(f"SELECT * FROM {name}.audit_log")
        assert rows and all(r["path"].startswith("/admin/") for r in rows)
        text = json.dumps([dict(r) for r in rows], default=str)
        assert API_TOKEN not in text and "13812345678" not in text
