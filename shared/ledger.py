"""Double-entry ledger inside one service's schema (see migrations/002_ledger.sql).

Every movement is a transfer from a debit account to a credit account, so each entry balances
by construction. Wallet-like accounts (no_overdraft) can never go below zero: a transfer that
would overdraw one is refused with InsufficientFunds and changes nothing. Holds are pending
transfers, later posted or voided (TigerBeetle's two-phase transfers). Transfer ids are
deterministic, so repeating a transfer is a no-op.

Sign convention: for a credit-normal account (wallets, holds, revenue, what is owed to
another service) balance = credits - debits; for the asset account of money at the bank
channel, balance = debits - credits.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg


class InsufficientFunds(Exception):
    pass


@dataclass(frozen=True)
class Account:
    id: str
    debits_posted: int = 0
    credits_posted: int = 0
    debits_pending: int = 0
    credits_pending: int = 0

    @property
    def balance(self) -> int:
        """Posted balance of a credit-normal account."""
        return self.credits_posted - self.debits_posted

    @property
    def available(self) -> int:
        """What a credit-normal account can still spend: posted balance less pending debits."""
        return self.credits_posted - self.debits_posted - self.debits_pending


# Accounts are opened on first use. Those whose id starts with one of these can never be overdrawn.
NO_OVERDRAFT_PREFIXES = ("wallet:",)


async def _ensure_accounts(conn: asyncpg.Connection, *ids: str) -> None:
    await conn.executemany(
        "INSERT INTO ledger_accounts (id, no_overdraft) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
        [(i, i.startswith(NO_OVERDRAFT_PREFIXES)) for i in ids])


async def _debit(conn: asyncpg.Connection, account: str, amount: int, column: str) -> None:
    # Conditional update: refuses (no row) instead of tripping the CHECK and aborting the transaction.
    ok = await conn.fetchval(
        f"""UPDATE ledger_accounts SET {column} = {column} + $2
            WHERE id = $1 AND (NOT no_overdraft OR credits_posted - debits_posted - debits_pending >= $2)
            RETURNING true""", account, amount)
    if not ok:
        raise InsufficientFunds(f"{account} cannot pay {amount}")


async def transfer(conn: asyncpg.Connection, transfer_id: str, debit: str, credit: str, amount: int, *,
                   code: str, now: datetime, order_id: str | None = None, pending: bool = False) -> bool:
    """Move `amount` fen from `debit` to `credit` (posted, or pending when `pending`).
    False when `transfer_id` was already applied; InsufficientFunds (and no change) when it would
    overdraw a no-overdraft account."""
    if not isinstance(amount, int) or amount <= 0:
        raise ValueError(f"a transfer moves a positive whole number of fen, not {amount!r}")
    await _ensure_accounts(conn, debit, credit)
    async with conn.transaction():  # savepoint: a refused overdraft leaves nothing behind
        inserted = await conn.fetchval(
            """INSERT INTO ledger_transfers (id, debit_account, credit_account, amount, kind, code, order_id, created_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING RETURNING true""",
            transfer_id, debit, credit, amount, "pending" if pending else "posted", code, order_id, now)
        if not inserted:
            return False
        column = "pending" if pending else "posted"
        await _debit(conn, debit, amount, f"debits_{column}")
        await conn.execute(f"UPDATE ledger_accounts SET credits_{column} = credits_{column} + $2 WHERE id = $1",
                           credit, amount)
    return True


async def _resolve(conn: asyncpg.Connection, transfer_id: str, pending_id: str, kind: str, now: datetime) -> bool:
    pending = await conn.fetchrow(
        "SELECT debit_account, credit_account, amount, code, order_id FROM ledger_transfers WHERE id = $1 AND kind = 'pending'",
        pending_id)
    if pending is None:
        raise LookupError(f"no pending transfer {pending_id}")
    inserted = await conn.fetchval(
        """INSERT INTO ledger_transfers (id, debit_account, credit_account, amount, kind, pending_id, code, order_id, created_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING RETURNING true""",
        transfer_id, pending["debit_account"], pending["credit_account"], pending["amount"], kind, pending_id,
        pending["code"], pending["order_id"], now)
    if not inserted:
        return False
    amount = pending["amount"]
    posted = kind == "post_pending"
    await conn.execute(
        f"""UPDATE ledger_accounts SET debits_pending = debits_pending - $2
            {', debits_posted = debits_posted + $2' if posted else ''} WHERE id = $1""",
        pending["debit_account"], amount)
    await conn.execute(
        f"""UPDATE ledger_accounts SET credits_pending = credits_pending - $2
            {', credits_posted = credits_posted + $2' if posted else ''} WHERE id = $1""",
        pending["credit_account"], amount)
    return True


async def post_pending(conn: asyncpg.Connection, transfer_id: str, pending_id: str, now: datetime) -> bool:
    return await _resolve(conn, transfer_id, pending_id, "post_pending", now)


async def void_pending(conn: asyncpg.Connection, transfer_id: str, pending_id: str, now: datetime) -> bool:
    return await _resolve(conn, transfer_id, pending_id, "void_pending", now)


async def pending_state(conn: asyncpg.Connection, pending_id: str) -> str | None:
    """'pending', 'posted', 'voided', or None when there is no such pending transfer."""
    row = await conn.fetchrow(
        """SELECT p.id, r.kind FROM ledger_transfers p LEFT JOIN ledger_transfers r ON r.pending_id = p.id
           WHERE p.id = $1 AND p.kind = 'pending'""", pending_id)
    if row is None:
        return None
    return {None: "pending", "post_pending": "posted", "void_pending": "voided"}[row["kind"]]


async def account(conn: asyncpg.Connection | asyncpg.Pool, account_id: str) -> Account:
    row = await conn.fetchrow(
        "SELECT id, debits_posted, credits_posted, debits_pending, credits_pending FROM ledger_accounts WHERE id = $1",
        account_id)
    return Account(**dict(row)) if row else Account(id=account_id)


async def check(conn: asyncpg.Connection | asyncpg.Pool) -> list[str]:
    """Problems in this ledger: cached totals that differ from the transfers, or debits != credits."""
    problems = []
    rows = await conn.fetch(
        """WITH moves AS (
             SELECT debit_account AS account, amount AS d_posted, 0 AS c_posted, 0 AS d_pending, 0 AS c_pending
               FROM ledger_transfers WHERE kind IN ('posted', 'post_pending')
             UNION ALL SELECT credit_account, 0, amount, 0, 0 FROM ledger_transfers WHERE kind IN ('posted', 'post_pending')
             UNION ALL SELECT debit_account, 0, 0, amount, 0 FROM ledger_transfers WHERE kind = 'pending'
             UNION ALL SELECT credit_account, 0, 0, 0, amount FROM ledger_transfers WHERE kind = 'pending'
             UNION ALL SELECT debit_account, 0, 0, -amount, 0 FROM ledger_transfers WHERE kind IN ('post_pending', 'void_pending')
             UNION ALL SELECT credit_account, 0, 0, 0, -amount FROM ledger_transfers WHERE kind IN ('post_pending', 'void_pending'))
           SELECT a.id, a.debits_posted, a.credits_posted, a.debits_pending, a.credits_pending, a.no_overdraft,
                  coalesce(sum(m.d_posted), 0) AS dp, coalesce(sum(m.c_posted), 0) AS cp,
                  coalesce(sum(m.d_pending), 0) AS dq, coalesce(sum(m.c_pending), 0) AS cq
           FROM ledger_accounts a LEFT JOIN moves m ON m.account = a.id GROUP BY a.id""")
    total_debits = total_credits = 0
    for r in rows:
        if (r["debits_posted"], r["credits_posted"], r["debits_pending"], r["credits_pending"]) != (r["dp"], r["cp"], r["dq"], r["cq"]):
            problems.append(f"account {r['id']}: cached totals differ from its transfers")
        if r["no_overdraft"] and r["credits_posted"] - r["debits_posted"] - r["debits_pending"] < 0:
            problems.append(f"account {r['id']} is overdrawn")
        total_debits += r["debits_posted"]
        total_credits += r["credits_posted"]
    if total_debits != total_credits:
        problems.append(f"posted debits {total_debits} != posted credits {total_credits}")
    return problems
