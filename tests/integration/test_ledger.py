"""The double-entry ledger on real Postgres: balanced transfers, no overdraft, two-phase holds,
idempotent ids, and a check that catches tampering."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone

import pytest

from shared import db as dbmod, ledger
from shared.ledger import InsufficientFunds, NewTransfer

NOW = datetime(2026, 11, 25, tzinfo=timezone.utc)


@pytest.fixture
async def conn(infra):
    schema = f"lg_{uuid.uuid4().hex[:8]}"
    pool = await dbmod.create_pool(infra.database_url, schema, min_size=1, max_size=2)
    await dbmod.migrate(pool, schema, [dbmod.RUNTIME_MIGRATIONS])
    async with pool.acquire() as c:
        for wallet in ("wallet:a", "wallet:b"):  # as the gateway opens a user's wallet at registration
            await ledger.open_account(c, wallet, no_overdraft=True)
        yield c
    await pool.close()


async def resolution(conn, pending_id: str) -> str | None:
    """How a pending transfer was resolved (post_pending / void_pending), None while pending."""
    return await conn.fetchval("SELECT kind FROM ledger_transfers WHERE pending_id = $1", pending_id)


async def test_transfers_balance_and_wallets_never_go_negative(conn):
    async with conn.transaction():
        assert await ledger.transfer(conn, "t1", "bank", "wallet:a", 1_000, code="topup", now=NOW)
        assert not await ledger.transfer(conn, "t1", "bank", "wallet:a", 1_000, code="topup", now=NOW)  # same id
        with pytest.raises(InsufficientFunds):
            await ledger.transfer(conn, "t2", "wallet:a", "wallet:b", 1_001, code="pay", now=NOW)
        assert await ledger.transfer(conn, "t3", "wallet:a", "wallet:b", 400, code="pay", now=NOW)
    assert (await ledger.account(conn, "wallet:a")).balance == 600
    assert (await ledger.account(conn, "wallet:b")).balance == 400
    assert (await ledger.account(conn, "bank")).debits_posted == 1_000
    assert await conn.fetchval("SELECT count(*) FROM ledger_transfers WHERE id = 't2'") == 0
    assert await ledger.check(conn) == []


async def test_pending_transfer_reserves_then_posts_or_voids(conn):
    await ledger.transfer(conn, "in", "bank", "wallet:a", 1_000, code="topup", now=NOW)
    await ledger.transfer(conn, "hold-1", "wallet:a", "escrow", 700, code="payment", now=NOW, pending=True)
    a = await ledger.account(conn, "wallet:a")
    assert (a.balance, a.available) == (1_000, 300)
    with pytest.raises(InsufficientFunds):  # the reservation counts
        await ledger.transfer(conn, "hold-2", "wallet:a", "escrow", 301, code="payment", now=NOW, pending=True)
    assert await resolution(conn, "hold-1") is None  # still pending
    assert await ledger.post_pending(conn, "post-1", "hold-1", NOW)
    assert not await ledger.void_pending(conn, "void-1", "hold-1", NOW)  # resolved once only
    assert await resolution(conn, "hold-1") == "post_pending"
    a = await ledger.account(conn, "wallet:a")
    assert (a.balance, a.available) == (300, 300)
    assert (await ledger.account(conn, "escrow")).balance == 700
    await ledger.transfer(conn, "hold-3", "wallet:a", "escrow", 300, code="payment", now=NOW, pending=True)
    assert await ledger.void_pending(conn, "void-3", "hold-3", NOW)
    assert await resolution(conn, "hold-3") == "void_pending"
    assert (await ledger.account(conn, "wallet:a")).available == 300
    assert await ledger.check(conn) == []


async def test_check_finds_tampered_balances(conn):
    await ledger.transfer(conn, "in", "bank", "wallet:a", 1_000, code="topup", now=NOW)
    await conn.execute("UPDATE ledger_accounts SET credits_posted = credits_posted + 1 WHERE id = 'wallet:a'")
    problems = await ledger.check(conn)
    assert any("wallet:a" in p and "differ" in p for p in problems)
    await conn.execute("UPDATE ledger_accounts SET credits_posted = 0 WHERE id = 'wallet:a'")
    await conn.execute("UPDATE ledger_transfers SET amount = 5 WHERE id = 'in'")  # history rewritten
    assert any("wallet:a" in p for p in await ledger.check(conn))


async def test_shared_accounts_keep_no_running_totals(conn):
    await ledger.transfer(conn, "in", "bank", "wallet:a", 1_000, code="topup", now=NOW)
    await ledger.transfer(conn, "pay", "wallet:a", "escrow", 300, code="pay", now=NOW, pending=True)
    row = await conn.fetchrow("SELECT debits_posted, credits_pending FROM ledger_accounts WHERE id = 'bank'")
    assert tuple(row) == (0, 0)  # no hot row: the balance comes from the transfers
    assert (await ledger.account(conn, "bank")).debits_posted == 1_000
    assert (await ledger.account(conn, "escrow")).credits_pending == 300
    await ledger.post_pending(conn, "post", "pay", NOW)
    escrow = await ledger.account(conn, "escrow")
    assert (escrow.credits_posted, escrow.credits_pending, escrow.balance) == (300, 0, 300)
    assert await ledger.check(conn) == []


async def test_the_no_overdraft_flag_not_the_name_protects_an_account(conn):
    await ledger.open_account(conn, "purse", no_overdraft=True)
    await ledger.transfer(conn, "in", "bank", "purse", 500, code="topup", now=NOW)
    with pytest.raises(InsufficientFunds):
        await ledger.transfer(conn, "out", "purse", "escrow", 501, code="pay", now=NOW)
    applied, refused = await ledger.transfer_many(conn, [NewTransfer("m1", "purse", "escrow", 300, "pay", pending=True),
                                                         NewTransfer("m2", "purse", "escrow", 300, "pay", pending=True)],
                                                  NOW, partial=True)
    assert (applied, refused) == ({"m1"}, {"m2"})
    assert (await ledger.account(conn, "purse")).available == 200
    assert await ledger.resolve_many(conn, [("v1", "m1")], post=False, now=NOW) == {"m1"}
    assert (await ledger.account(conn, "purse")).available == 500
    # An account opened by its first transfer is ordinary, whatever its name: no totals, no check.
    await ledger.transfer(conn, "neg", "wallet:unopened", "escrow", 10, code="pay", now=NOW)
    assert (await ledger.account(conn, "wallet:unopened")).balance == -10
    assert await conn.fetchval("SELECT no_overdraft FROM ledger_accounts WHERE id = 'wallet:unopened'") is False
    await ledger.open_account(conn, "purse", no_overdraft=True)  # again: nothing changes
    with pytest.raises(ValueError):
        await ledger.open_account(conn, "purse")  # flags never change
    assert await ledger.check(conn) == []


async def test_set_transfers_keep_both_sides_totals_exact(conn):
    # The set paths write the transfers and the running totals in one statement each: the totals
    # must follow posted and pending transfers, on both sides, with repeats changing nothing.
    for purse in ("purse-a", "purse-b"):
        await ledger.open_account(conn, purse, no_overdraft=True)
    await ledger.transfer(conn, "fund", "bank", "purse-a", 1_000, code="topup", now=NOW)
    batch = [NewTransfer("p1", "purse-a", "purse-b", 100, "pay"),
             NewTransfer("h1", "purse-a", "purse-b", 250, "pay", pending=True),
             NewTransfer("h2", "purse-a", "escrow", 40, "pay", pending=True)]
    assert await ledger.transfer_many(conn, batch, NOW) == ({"p1", "h1", "h2"}, set())
    assert await ledger.transfer_many(conn, batch, NOW) == (set(), set())  # repeated: a no-op
    a, b = await ledger.account(conn, "purse-a"), await ledger.account(conn, "purse-b")
    assert (a.debits_posted, a.debits_pending, a.available) == (100, 290, 610)
    assert (b.credits_posted, b.credits_pending, b.balance) == (100, 250, 100)
    assert await ledger.resolve_many(conn, [("post-h1", "h1")], post=True, now=NOW) == {"h1"}
    assert await ledger.resolve_many(conn, [("void-h2", "h2")], post=False, now=NOW) == {"h2"}
    assert await ledger.resolve_many(conn, [("post-h1", "h1"), ("void-h2", "h2")], post=True, now=NOW) == set()
    a, b = await ledger.account(conn, "purse-a"), await ledger.account(conn, "purse-b")
    assert (a.debits_posted, a.debits_pending, a.available) == (350, 0, 650)
    assert (b.credits_posted, b.credits_pending, b.balance) == (350, 0, 350)
    assert await ledger.check(conn) == []
