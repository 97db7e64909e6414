"""Personal data at rest (shared/pii.py, docs/design.md "Personal data"): `phone` and
`id_number` are kept only as a keyed hash and a masked value, in every table, event and answer;
the rules that need them (one Huabei account per phone and per id number, the same registration
again) still hold; and the migrations convert rows stored in clear before."""
from __future__ import annotations

import json
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

from aiokafka import TopicPartition

from shared import db as dbmod, pii
from tests.integration.conftest import LOGS, ROOT, envelope, eventually, new_id

SCHEMAS = ("gateway", "escrow", "credit", "billing")


def clear_values() -> tuple[str, str]:
    return f"186{uuid.uuid4().int % 10**8:08d}", f"44030{uuid.uuid4().int % 10**13:013d}"


async def places_holding(db, *values: str, schemas=SCHEMAS) -> list[str]:
    """Every table column (text, json, bytea, arrays) of these schemas that holds one of `values`."""
    columns = await db.fetch(
        """SELECT table_schema, table_name, column_name, data_type FROM information_schema.columns
           WHERE table_schema = ANY($1) AND data_type IN ('text', 'character varying', 'jsonb', 'json', 'bytea', 'ARRAY')""",
        list(schemas))
    found = []
    for c in columns:
        column = f'"{c["table_schema"]}"."{c["table_name"]}"'
        holds = (f"position(convert_to($1, 'UTF8') in \"{c['column_name']}\") > 0" if c["data_type"] == "bytea"
                 else f"strpos(\"{c['column_name']}\"::text, $1) > 0")
        for value in values:
            if await db.fetchval(f"SELECT count(*) FROM {column} WHERE {holds}", value):
                found.append(f"{column}.{c['column_name']}")
    return found


async def test_phone_and_id_number_are_never_kept_in_clear(shop, db, kafka):
    phone, id_number = clear_values()
    since = await kafka.end_offsets("users.events")
    gateway, credit = shop.api("gateway"), shop.api("credit")
    user = await shop.user(phone=phone, id_number=id_number, balance=10_000)

    # Answers show masked values only.
    shown = (await gateway.get(f"/v1/users/{user}")).json()
    assert shown["phone"] == pii.mask_phone(phone) == f"{phone[:3]}****{phone[-4:]}"
    assert shown["id_number"] == "*" * 14 + id_number[-4:]
    activated = await shop.activate(user)
    assert activated["status"] == "active"
    profile = (await credit.get(f"/v1/credit-profiles/{user}")).json()
    assert (profile["phone"], profile["id_number"]) == (shown["phone"], shown["id_number"])

    # The event carries the hashes and masks.
    records = await kafka.read("users.events", since, lambda rs: any(r.key == user.encode() for r in rs))
    (record,) = [r for r in records if r.key == user.encode()]
    data = json.loads(record.value)["data"]
    assert data["phone_hash"] == pii.digest("phone", phone) and data["phone_masked"] == shown["phone"]
    assert data["id_number_hash"] == pii.digest("id_number", id_number)
    assert "phone" not in data and "id_number" not in data
    assert phone.encode() not in record.value and id_number.encode() not in record.value

    # Some money moves too, then no table of any service holds the clear values.
    seller = await shop.user()
    order = await shop.place(user, seller, 1_000)
    await shop.events(order, 1)
    assert await places_holding(db, phone, id_number) == []
    row = await db.fetchrow("SELECT phone_hash, id_number_hash FROM credit.huabei_accounts WHERE user_id = $1", user)
    assert dict(row) == {"phone_hash": data["phone_hash"], "id_number_hash": data["id_number_hash"]}
    # Nor the logs of the services.
    for name in ("gateway", "credit"):
        log = (LOGS / f"test-{name}.log").read_text(errors="replace")
        assert phone not in log and id_number not in log, name


async def test_the_rules_still_see_equal_values(shop):
    gateway = shop.api("gateway")
    phone, id_number = clear_values()
    first = await shop.user(phone=phone)
    await shop.activate(first)
    second = await shop.user(phone=phone)  # the same phone, another id number
    refused = await shop.api("credit").post(f"/v1/huabei/{second}/activation")
    assert refused.status_code == 422 and refused.json()["error"]["message"].startswith("phone")
    third = await shop.user(id_number=id_number)
    await shop.activate(third)
    fourth = await shop.user(id_number=id_number)
    refused = await shop.api("credit").post(f"/v1/huabei/{fourth}/activation")
    assert refused.status_code == 422 and refused.json()["error"]["message"].startswith("id_number")

    # The same registration again is recognised by the hashes; another phone is a conflict.
    body = {"user_id": new_id("u"), "full_name": "Li Lei", "birth_date": "1990-02-03", "phone": phone,
            "id_number": id_number, "real_name_verified": True}
    assert (await gateway.post("/v1/users", json=body)).status_code == 201
    again = await gateway.post("/v1/users", json=body)
    assert again.status_code == 200 and again.json()["phone"] == pii.mask_phone(phone)
    other = await gateway.post("/v1/users", json={**body, "phone": clear_values()[0]})
    assert other.status_code == 409 and other.json()["error"]["code"] == "USER_EXISTS"


async def test_an_event_published_before_the_hashing_is_hashed_on_arrival(shop, kafka, db):
    """A UserRegistered with the clear values (as the gateway published them before): credit
    applies it and keeps only the hash and the mask."""
    phone, id_number = clear_values()
    user = new_id("u")
    old = envelope("UserRegistered", {"user_id": user, "birth_date": "1990-01-01", "phone": phone,
                                      "id_number": id_number, "real_name_verified": True,
                                      "registered_at": "2026-11-01T00:00:00Z"}, source="payment-gateway")
    await kafka.send("users.events", old, key=user)

    async def arrived():
        return (await shop.api("credit").get(f"/v1/credit-profiles/{user}")).json()
    profile = await eventually(arrived)
    assert profile["phone"] == pii.mask_phone(phone) and profile["id_number"] == pii.mask_id_number(id_number)
    row = await db.fetchrow("SELECT phone_hash, id_number_hash FROM credit.profiles WHERE user_id = $1", user)
    assert row["phone_hash"] == pii.digest("phone", phone)
    assert await places_holding(db, phone, id_number, schemas=("credit",)) == []


async def _schema_at_006(infra, service: str, tmp_path: Path, last: str):
    """A fresh schema with `service`'s migrations up to `last` (the layout before the hashing)."""
    folder = tmp_path / service / "migrations"
    folder.mkdir(parents=True)
    for path in sorted((ROOT / "services" / service / "migrations").glob("*.sql")):
        if path.name <= last:
            shutil.copy(path, folder / path.name)
    schema = f"pii_{service}_{uuid.uuid4().hex[:8]}"
    pool = await dbmod.create_pool(infra.database_url, schema, min_size=1, max_size=2)
    await dbmod.migrate(pool, schema, [dbmod.RUNTIME_MIGRATIONS, folder])
    return schema, pool


async def test_the_migrations_convert_rows_stored_in_clear(infra, db, tmp_path):
    now = datetime.now(timezone.utc)
    phone, id_number = clear_values()

    # The gateway: users and the UserRegistered still in the outbox.
    schema, pool = await _schema_at_006(infra, "gateway", tmp_path, "006")
    try:
        await pool.execute("""INSERT INTO users (user_id, full_name, birth_date, phone, id_number, real_name_verified,
                                                 registered_at) VALUES ('u-1', 'Han', '1990-01-01', $1, $2, true, $3),
                                                                       ('u-2', 'Li', NULL, NULL, NULL, false, $3)""",
                           phone, id_number, now)
        event = envelope("UserRegistered", {"user_id": "u-1", "birth_date": "1990-01-01", "phone": phone,
                                            "id_number": id_number, "real_name_verified": True,
                                            "registered_at": "2026-11-01T00:00:00Z"})
        await pool.execute("INSERT INTO outbox (topic, key, value) VALUES ('users.events', 'u-1', $1)",
                           json.dumps(event).encode())
        before = await places_holding(db, phone, id_number, schemas=(schema,))
        assert {f'"{schema}"."users".phone', f'"{schema}"."users".id_number', f'"{schema}"."outbox".value'} <= set(before)
        applied = await dbmod.migrate(pool, schema, [dbmod.RUNTIME_MIGRATIONS, ROOT / "services/gateway/migrations"])
        assert "gateway/007_personal_data.py" in applied
        rows = {r["user_id"]: dict(r) for r in await pool.fetch("SELECT * FROM users")}
        assert "phone" not in rows["u-1"] and "id_number" not in rows["u-1"]
        assert rows["u-1"]["phone_hash"] == pii.digest("phone", phone)
        assert rows["u-1"]["id_number_masked"] == pii.mask_id_number(id_number)
        assert rows["u-2"]["phone_hash"] is None and rows["u-2"]["phone_masked"] is None
        (value,) = [r["value"] for r in await pool.fetch("SELECT value FROM outbox")]
        data = json.loads(value)["data"]
        assert data["phone_hash"] == pii.digest("phone", phone) and "phone" not in data
        assert await places_holding(db, phone, id_number, schemas=(schema,)) == []
        # Once: a restart applies nothing more.
        assert await dbmod.migrate(pool, schema, [dbmod.RUNTIME_MIGRATIONS, ROOT / "services/gateway/migrations"]) == []
    finally:
        await pool.close()
        await db.execute(f'DROP SCHEMA "{schema}" CASCADE')

    # Credit: its copy of users and the Huabei accounts' unique phone and id number.
    schema, pool = await _schema_at_006(infra, "credit", tmp_path, "003")
    try:
        await pool.execute("""INSERT INTO profiles (user_id, birth_date, phone, id_number, real_name_verified,
                                                    registered_at, updated_at)
                              VALUES ('u-1', '1990-01-01', $1, $2, true, $3, $3)""", phone, id_number, now)
        await pool.execute("""INSERT INTO huabei_accounts (user_id, status, credit_limit, score, id_number, phone,
                                                           activated_at, reviewed_at)
                              VALUES ('u-1', 'active', 50000, 600, $2, $1, $3, $3)""", phone, id_number, now)
        applied = await dbmod.migrate(pool, schema, [dbmod.RUNTIME_MIGRATIONS, ROOT / "services/credit/migrations"])
        assert "credit/004_personal_data.py" in applied
        profile = dict(await pool.fetchrow("SELECT * FROM profiles"))
        assert "phone" not in profile and profile["phone_masked"] == pii.mask_phone(phone)
        account = dict(await pool.fetchrow("SELECT * FROM huabei_accounts"))
        assert account["phone_hash"] == profile["phone_hash"] == pii.digest("phone", phone)
        assert account["id_number_hash"] == profile["id_number_hash"] == pii.digest("id_number", id_number)
        assert await places_holding(db, phone, id_number, schemas=(schema,)) == []
        # The uniqueness rule still holds on the hashes.
        duplicate = pool.execute("""INSERT INTO huabei_accounts (user_id, status, credit_limit, score, id_number_hash,
                                                                 phone_hash, activated_at, reviewed_at)
                                    VALUES ('u-2', 'active', 50000, 600, 'other', $1, $2, $2)""",
                                 account["phone_hash"], now)
        try:
            await duplicate
            raise AssertionError("a second account with the same phone hash was accepted")
        except Exception as exc:
            assert "unique" in str(exc).lower(), exc
    finally:
        await pool.close()
        await db.execute(f'DROP SCHEMA "{schema}" CASCADE')
