"""Users at the gateway, the UserRegistered event crossing to credit through outbox and Kafka,
access control, and restart safety of the relay and the consumers."""
from __future__ import annotations

import signal

import httpx

from shared import pii
from tests.integration.conftest import eventually, new_id, user_token


def user_body(user_id: str, **over) -> dict:
    return {"user_id": user_id, "full_name": "Han Meimei", "birth_date": "1995-06-15", "phone": "13912345678",
            "id_number": "310101199506150022", "real_name_verified": True, **over}


async def credit_profile(api, user_id: str):
    response = await api("credit").get(f"/v1/credit-profiles/{user_id}")
    return response.json() if response.status_code == 200 else None


async def test_registered_user_appears_in_credit_profiles(services, api, db):
    user_id = new_id("u")
    created = await api("gateway").post("/v1/users", json=user_body(user_id))
    assert created.status_code == 201, created.text
    assert created.json()["user_id"] == user_id

    profile = await eventually(lambda: credit_profile(api, user_id))
    assert profile["birth_date"] == "1995-06-15"
    assert profile["phone"] == "139****5678" and profile["id_number"] == "**************0022"  # masked
    assert profile["real_name_verified"] is True
    assert profile["registered_at"] == created.json()["registered_at"]
    row = await db.fetchrow("SELECT id_number_hash FROM credit.profiles WHERE user_id = $1", user_id)
    assert row["id_number_hash"] == pii.digest("id_number", "310101199506150022")


async def test_registration_is_idempotent_and_conflicts_are_409(services, api):
    user_id = new_id("u")
    gateway = api("gateway")
    assert (await gateway.post("/v1/users", json=user_body(user_id))).status_code == 201
    again = await gateway.post("/v1/users", json=user_body(user_id))
    assert again.status_code == 200 and again.json()["user_id"] == user_id
    conflict = await gateway.post("/v1/users", json=user_body(user_id, full_name="Someone Else"))
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "USER_EXISTS"
    fetched = await gateway.get(f"/v1/users/{user_id}")
    assert fetched.status_code == 200 and fetched.json()["full_name"] == "Han Meimei"
    assert (await gateway.get(f"/v1/users/{new_id('nobody')}")).status_code == 404


async def test_bad_registration_bodies_are_400_with_a_code(services, api):
    gateway = api("gateway")
    for body in ({"user_id": "bad id!", "full_name": "X", "birth_date": "1990-01-01"},
                 {**user_body(new_id("u")), "real_name_verified": "yes"},
                 {**user_body(new_id("u")), "favourite_colour": "red"},
                 {**user_body(new_id("u")), "birth_date": "2999-01-01"}):
        response = await gateway.post("/v1/users", json=body)
        assert response.status_code == 400, body
        assert response.json()["error"]["code"] == "INVALID_REQUEST"


async def test_access_control(services, api):
    user_id, other = new_id("u"), new_id("u")
    assert (await api("gateway").post("/v1/users", json=user_body(user_id))).status_code == 201
    base = services["gateway"].url
    async with httpx.AsyncClient(base_url=base) as anon:
        missing = await anon.get(f"/v1/users/{user_id}")
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "UNAUTHENTICATED"
        expired = await anon.get(f"/v1/users/{user_id}", headers={"Authorization": f"Bearer {user_token(user_id, -10)}"})
        assert expired.status_code == 401 and expired.json()["error"]["code"] == "UNAUTHENTICATED"
        forged = await anon.get(f"/v1/users/{user_id}", headers={"Authorization": "Bearer not-a-token"})
        assert forged.status_code == 401
        own = await anon.get(f"/v1/users/{user_id}", headers={"Authorization": f"Bearer {user_token(user_id)}"})
        assert own.status_code == 200
        foreign = await anon.get(f"/v1/users/{user_id}", headers={"Authorization": f"Bearer {user_token(other)}"})
        assert foreign.status_code == 403 and foreign.json()["error"]["code"] == "FORBIDDEN"
        admin = await anon.get("/admin/clock", headers={"Authorization": f"Bearer {user_token(user_id)}"})
        assert admin.status_code == 403
        for open_path in ("/health", "/metrics", "/openapi.json"):
            assert (await anon.get(open_path)).status_code == 200, open_path


async def test_relay_killed_after_commit_publishes_after_restart(services, api, db):
    """The gateway dies after committing a registration and before its relay published the event:
    the row waits in the outbox and goes out after the restart. The fault is made from outside:
    the test holds the relay's advisory lock and runs the gateway without the hand-off
    (OUTBOX_HANDOFF=0), so the new process commits but cannot publish. (A handed-off row left
    unsent is the relay's too: tests/integration/test_runtime.py.)"""
    gateway = services["gateway"]
    user_id = new_id("u")
    gateway.kill()
    async with db.acquire() as blocker:
        # The killed relay's session lets go of the lock as soon as Postgres sees it gone.
        await eventually(lambda: blocker.fetchval("SELECT pg_try_advisory_lock(hashtext('outbox:gateway'))"))
        try:
            await gateway.restart(OUTBOX_HANDOFF="0")
            response = await api("gateway").post("/v1/users", json=user_body(user_id))
            assert response.status_code == 201  # committed; the relay is waiting for its lock
            gateway.kill()
        finally:
            await blocker.execute("SELECT pg_advisory_unlock(hashtext('outbox:gateway'))")
    pending = await db.fetchval(
        "SELECT count(*) FROM gateway.outbox WHERE published_at IS NULL AND key = $1", user_id.encode())
    assert pending == 1
    assert await credit_profile(api, user_id) is None

    await gateway.restart()
    profile = await eventually(lambda: credit_profile(api, user_id))
    assert profile["user_id"] == user_id
    await eventually(lambda: db.fetchval(  # stamped published (within the relay's 0.5 s stamp wait)
        "SELECT count(*) = 0 FROM gateway.outbox WHERE published_at IS NULL AND key = $1", user_id.encode()), timeout=5)


async def test_consumer_killed_with_sigkill_loses_nothing(services, api, db):
    credit = services["credit"]
    credit.kill(signal.SIGKILL)
    user_ids = [new_id("u") for _ in range(5)]
    for user_id in user_ids:
        assert (await api("gateway").post("/v1/users", json=user_body(user_id))).status_code == 201
    await credit.restart()

    async def all_there():
        return await db.fetchval("SELECT count(*) FROM credit.profiles WHERE user_id = ANY($1)", user_ids) == 5
    await eventually(all_there, timeout=60)


async def test_a_fresh_user_is_known_everywhere_at_once(shop):
    """Read-your-writes: no pause between registering at the gateway and using the account at the
    credit service (which learns of users from users.events a moment later)."""
    for _ in range(3):
        user = await shop.user()
        response = await shop.api("credit").post(f"/v1/huabei/{user}/activation")
        assert response.status_code == 201, response.text
        user = await shop.user()
        response = await shop.api("credit").get(f"/v1/credit-profiles/{user}")
        assert response.status_code == 200, response.text
        assert response.json()["user_id"] == user
