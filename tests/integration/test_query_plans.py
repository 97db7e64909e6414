"""The set statements of the hot path find their rows by index, however the planner sizes their
input: a statement that scans a whole table costs more the more a platform has served (with a
few thousand payments, a one-row update took ~1 ms instead of ~0.1 ms). Checked with the generic
plan, the one a prepared statement ends up with."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from services.credit import store as credit_store
from services.escrow import store as escrow_store
from services.gateway import store as gateway_store
from shared import db as dbmod
from shared import inbox, ledger

NOW = datetime(2026, 11, 29, tzinfo=timezone.utc)
ROOT = Path(__file__).resolve().parents[2]


async def _schema(infra, service: str):
    schema = f"qp_{uuid.uuid4().hex[:8]}"
    pool = await dbmod.create_pool(infra.database_url, schema, min_size=1, max_size=2)
    await dbmod.migrate(pool, schema, [dbmod.RUNTIME_MIGRATIONS, ROOT / "services" / service / "migrations"])
    return pool, schema


async def _seq_scans(conn, table: str) -> int:
    """Sequential scans of `table` counted by this session and not reported yet (compare two)."""
    return await conn.fetchval(
        "SELECT seq_scan FROM pg_stat_xact_user_tables WHERE schemaname = current_schema() AND relname = $1", table)


@pytest.fixture
async def gateway(infra):
    pool, schema = await _schema(infra, "gateway")
    async with pool.acquire() as conn:
        await conn.execute(
            """INSERT INTO payments (order_id, placed_event_id, buyer_id, seller_id, amount, currency, payment_method,
                                     installments, auto_confirm_days, status, accepted_at, updated_at)
               SELECT 'o' || i, 'e' || i, 'b' || (i % 300), 's', 100, 'CNY', 'balance', 1, 10, 'PENDING', $1, $1
               FROM generate_series(1, 3000) AS i""", NOW)
        await conn.execute("ANALYZE payments")
        yield conn
    await pool.execute(f"DROP SCHEMA {schema} CASCADE")
    await pool.close()


@pytest.fixture
async def credit(infra):
    pool, schema = await _schema(infra, "credit")
    async with pool.acquire() as conn:
        await conn.execute(
            """INSERT INTO profiles (user_id, real_name_verified, registered_at, updated_at) SELECT 'u' || i, true, $1, $1 FROM generate_series(1, 3000) AS i""",
            NOW)
        await conn.execute("""INSERT INTO huabei_accounts (user_id, status, credit_limit, score, id_number_hash, phone_hash,
                                                           activated_at, reviewed_at)
                              VALUES ('u9', 'active', 50000, 600, 'id-hash', 'phone-hash', $1, $1)""", NOW)
        await conn.execute("ANALYZE profiles")
        yield conn
    await pool.execute(f"DROP SCHEMA {schema} CASCADE")
    await pool.close()


async def test_payment_updates_find_their_rows_by_key(gateway):
    async with gateway.transaction():
        await gateway.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        before = await _seq_scans(gateway, "payments")
        await gateway_store.update_payments(gateway, NOW, [{"order_id": "o42", "saga_state": "RISK_CHECK"}])
        assert await _seq_scans(gateway, "payments") == before
        assert await gateway.fetchval("SELECT saga_state FROM payments WHERE order_id = 'o42'") == "RISK_CHECK"


async def test_behaviour_counts_find_their_profiles_by_key_and_name_the_huabei_users(credit):
    async with credit.transaction():
        await credit.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        before = await _seq_scans(credit, "profiles")
        huabei_users = await credit_store.count_behaviour_many(credit, {"u7": 2, "u9": 1}, "successful_payments")
        assert huabei_users == ["u9"]  # whose score is refreshed next
        assert await _seq_scans(credit, "profiles") == before
        rows = await credit.fetch("SELECT user_id, successful_payments FROM profiles WHERE user_id IN ('u7', 'u9')")
        assert {r["user_id"]: r["successful_payments"] for r in rows} == {"u7": 2, "u9": 1}


async def test_the_services_sessions_plan_a_prepared_statement_once(gateway):
    """A service's pool runs every prepared statement on its generic plan (shared/db.py
    PLAN_CACHE_MODE): planned once, not again at each execution with the values in it."""
    await gateway.execute("PREPARE by_keys(text[]) AS SELECT * FROM payments WHERE order_id = ANY($1) FOR UPDATE")
    try:
        for _ in range(6):  # past the five custom plans Postgres tries by default
            plan = "\n".join(r[0] for r in await gateway.fetch("EXPLAIN EXECUTE by_keys('{o1,o2}')"))
            assert "$1" in plan and "o1" not in plan, plan
            assert "Seq Scan" not in plan, plan
    finally:
        await gateway.execute("DEALLOCATE by_keys")


@pytest.fixture
async def fresh(infra):
    """A service's schema as a new platform has it: migrated, its tables empty, never analyzed."""
    made = []

    async def make(service: str):
        pool, schema = await _schema(infra, service)
        made.append((pool, schema))
        return pool

    yield make
    for pool, schema in made:
        await pool.execute(f"DROP SCHEMA {schema} CASCADE")
        await pool.close()


async def _all_seq_scans(conn) -> int:
    """Sequential scans of any table of the session's schema, counted by this transaction so far."""
    return await conn.fetchval(
        "SELECT coalesce(sum(seq_scan), 0) FROM pg_stat_xact_user_tables WHERE schemaname = current_schema()")


async def test_a_new_platforms_hot_statements_scan_no_table(fresh):
    """The plan a statement gets on its first execution is the one it keeps while its table grows
    (until autoanalyze has it planned again): made on an empty table, it must still use the key,
    or a new platform's first minute scans whole tables (shared/db.py RANDOM_PAGE_COST). The
    statements of a saga's hops, first run on a new platform's empty tables: none scans a table."""
    gateway, escrow, credit = await fresh("gateway"), await fresh("escrow"), await fresh("credit")
    async with gateway.acquire() as conn, conn.transaction():
        await ledger.open_account(conn, "wallet:b1", no_overdraft=True)
        await ledger.transfer(conn, "top-up", "bank", "wallet:b1", 500, code="top_up", now=NOW)
        before = await _all_seq_scans(conn)
        assert await inbox.first_deliveries(conn, ["e1", "e2"], ["orders.events"] * 2) == {"e1", "e2"}
        assert await gateway_store.registered_at(conn, "u1", "u2") == {}
        assert await gateway_store.lock_payments(conn, ["o1", "o2"]) == {}
        applied, refused = await ledger.transfer_many(  # a wallet reservation, then its post
            conn, [ledger.NewTransfer("r1", "wallet:b1", "escrow", 300, code="hold", order_id="o1", pending=True)],
            NOW, partial=True)
        assert (applied, refused) == ({"r1"}, set())
        assert await ledger.resolve_many(conn, [("p1", "r1")], post=True, now=NOW) == {"r1"}
        await gateway_store.update_payments(conn, NOW, [{"order_id": "o1", "saga_state": "RISK_CHECK"}])
        assert await gateway_store.take_events_many(conn, ["o1"], "pending", "forwarded") == {}
        assert await gateway_store.due_saga_ids(conn, NOW, 100) == []
        assert await gateway_store.expire_parked(conn, NOW, 100) == []  # its timer, each second
        assert await _all_seq_scans(conn) == before
    async with escrow.acquire() as conn, conn.transaction():
        before = await _all_seq_scans(conn)
        assert await escrow_store.lock_many(conn, ["o1", "o2"]) == {}
        assert await escrow_store.lock_due(conn, NOW, 100) == []  # auto-confirm, each second
        assert await _all_seq_scans(conn) == before
    # credit: a payment's count, a Huabei reservation, and its timers (each second: expiries, reviews)
    async with credit.acquire() as conn, conn.transaction():
        before = await _all_seq_scans(conn)
        assert await credit_store.count_behaviour_many(conn, {"u1": 1, "u2": 2}, "successful_payments") == []
        assert await credit_store.get_account(conn, "u1", lock=True) is None
        assert await credit_store.try_reserve(conn, "u1", 100) is False
        assert await credit_store.get_reservation(conn, "o1") is None
        assert await credit_store.expired_reservations(conn, NOW, 100) == []
        assert await credit_store.due_reviews(conn, NOW, 100) == []
        assert await _all_seq_scans(conn) == before
