"""Double-entry ledger inside one service's schema (see migrations/002_ledger.sql).

Every movement is a transfer from a debit account to a credit account, so each entry balances
by construction. Balances are derived from the transfers (view `ledger_balances`). An account
opened with the no_overdraft flag (`open_account`, as TigerBeetle's flags: set when the account
is created, never changed; wallets) can never go below zero: it also keeps running totals on its
row, which the overdraft check reads and locks, and a transfer that would overdraw it is refused
with InsufficientFunds and changes nothing. Other accounts are opened on first use and keep no
totals (bank, escrow, ...), so transactions do not queue on their rows. Holds are pending
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


async def open_account(conn: asyncpg.Connection, account_id: str, *, no_overdraft: bool = False) -> None:
    """Open an account with its flag before money moves through it (a no-overdraft account must
    be: a transfer opens an unknown account as an ordinary one). Opening again is a no-op; with
    the other flag it is a ValueError (flags never change)."""
    flag = await conn.fetchval(
        """INSERT INTO ledger_accounts (id, no_overdraft) VALUES ($1, $2)
           ON CONFLICT (id) DO UPDATE SET no_overdraft = ledger_accounts.no_overdraft RETURNING no_overdraft""",
        account_id, no_overdraft)
    if flag != no_overdraft:
        raise ValueError(f"account {account_id} is already open with no_overdraft={flag}")


async def _open(conn: asyncpg.Connection, ids: list[str]) -> set[str]:
    """Open the accounts not opened yet (ordinary) and return those of `ids` that keep running
    totals (no_overdraft), in one statement."""
    rows = await conn.fetch(
        """WITH opened AS (INSERT INTO ledger_accounts (id) SELECT unnest($1::text[]) ON CONFLICT (id) DO NOTHING)
           SELECT id FROM ledger_accounts WHERE id = ANY($1::text[]) AND no_overdraft""", ids)
    return {r["id"] for r in rows}


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
    keeps_totals = await _open(conn, [debit, credit])
    async with conn.transaction():  # savepoint: a refused overdraft leaves nothing behind
        inserted = await conn.fetchval(
            """INSERT INTO ledger_transfers (id, debit_account, credit_account, amount, kind, code, order_id, created_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING RETURNING true""",
            transfer_id, debit, credit, amount, "pending" if pending else "posted", code, order_id, now)
        if not inserted:
            return False
        column = "pending" if pending else "posted"
        if debit in keeps_totals:
            await _debit(conn, debit, amount, f"debits_{column}")
        if credit in keeps_totals:
            await conn.execute(f"UPDATE ledger_accounts SET credits_{column} = credits_{column} + $2 WHERE id = $1",
                               credit, amount)
    return True


async def _resolve(conn: asyncpg.Connection, transfer_id: str, pending_id: str, kind: str, now: datetime) -> bool:
    pending = await conn.fetchrow(
        """SELECT t.debit_account, t.credit_account, t.amount, t.code, t.order_id,
                  d.no_overdraft AS debit_keeps_totals, c.no_overdraft AS credit_keeps_totals
           FROM ledger_transfers t JOIN ledger_accounts d ON d.id = t.debit_account
                JOIN ledger_accounts c ON c.id = t.credit_account
           WHERE t.id = $1 AND t.kind = 'pending'""", pending_id)
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
    if pending["debit_keeps_totals"]:
        await conn.execute(
            f"""UPDATE ledger_accounts SET debits_pending = debits_pending - $2
                {', debits_posted = debits_posted + $2' if posted else ''} WHERE id = $1""",
            pending["debit_account"], amount)
    if pending["credit_keeps_totals"]:
        await conn.execute(
            f"""UPDATE ledger_accounts SET credits_pending = credits_pending - $2
                {', credits_posted = credits_posted + $2' if posted else ''} WHERE id = $1""",
            pending["credit_account"], amount)
    return True


async def post_pending(conn: asyncpg.Connection, transfer_id: str, pending_id: str, now: datetime) -> bool:
    return await _resolve(conn, transfer_id, pending_id, "post_pending", now)


async def void_pending(conn: asyncpg.Connection, transfer_id: str, pending_id: str, now: datetime) -> bool:
    return await _resolve(conn, transfer_id, pending_id, "void_pending", now)


# ---------------------------------------------------------------- many at once
# The consumers' set paths move money for hundreds of orders in a few statements. Same rules as
# above; total-keeping accounts are locked in id order, so two transactions never deadlock on them.
@dataclass(frozen=True)
class NewTransfer:
    id: str
    debit: str
    credit: str
    amount: int
    code: str
    order_id: str | None = None
    pending: bool = False


# The running totals of the total-keeping accounts among $1 change by what the data-modifying CTE
# `moved` (account, debits_posted, credits_posted, debits_pending, credits_pending) says, in the
# same statement as the transfers it comes from: one round trip, and the totals can never miss a
# transfer. Those accounts are locked (in id order) before. (`a.id = ANY($1)` too: joined with the
# CTE alone, the planner scans every account.)
_ADD_TOTALS = """,
    deltas AS (SELECT acct, sum(dp) AS dp, sum(cp) AS cp, sum(dq) AS dq, sum(cq) AS cq FROM moved
               WHERE acct = ANY($1::text[]) GROUP BY acct),
    totals AS (UPDATE ledger_accounts a SET debits_posted = a.debits_posted + d.dp,
                                            credits_posted = a.credits_posted + d.cp,
                                            debits_pending = a.debits_pending + d.dq,
                                            credits_pending = a.credits_pending + d.cq
               FROM deltas d WHERE a.id = d.acct AND a.id = ANY($1::text[]))"""


async def _open_and_lock(conn: asyncpg.Connection, accounts: list[str]) -> dict[str, int]:
    """Open the accounts not opened yet (ordinary) and lock the total-keeping (no_overdraft) ones
    in id order, in one statement; returns what each total-keeping account has available."""
    rows = await conn.fetch(
        """WITH opened AS (INSERT INTO ledger_accounts (id) SELECT unnest($1::text[]) ON CONFLICT (id) DO NOTHING)
           SELECT id, credits_posted - debits_posted - debits_pending AS available FROM ledger_accounts
           WHERE id = ANY($1::text[]) AND no_overdraft ORDER BY id FOR UPDATE""", accounts)
    return {r["id"]: r["available"] for r in rows}


async def transfer_many(conn: asyncpg.Connection, transfers: list[NewTransfer], now: datetime, *,
                        partial: bool = False) -> tuple[set[str], set[str]]:
    """`transfer` for many at once: (ids applied now, ids refused). Already applied ids are in
    neither. Without `partial`, a transfer that would overdraw a no-overdraft account raises
    InsufficientFunds before anything is written; with it, the transfers are taken in order and
    those that no longer fit are refused (counting repeats too: a caller that must be exact about
    a repeated transfer goes one by one)."""
    if not transfers:
        return set(), set()
    for t in transfers:
        if not isinstance(t.amount, int) or t.amount <= 0:
            raise ValueError(f"a transfer moves a positive whole number of fen, not {t.amount!r}")
    available = await _open_and_lock(conn, sorted({a for t in transfers for a in (t.debit, t.credit)}))
    refused: set[str] = set()
    for t in transfers:
        if t.debit in available:  # a no-overdraft account
            if available[t.debit] < t.amount:
                if not partial:
                    raise InsufficientFunds(f"{t.debit} cannot pay {t.amount}")
                refused.add(t.id)
                continue
            available[t.debit] -= t.amount
    todo = [t for t in transfers if t.id not in refused]
    if not todo:
        return set(), refused
    rows = await conn.fetch(
        """WITH applied AS (
               INSERT INTO ledger_transfers (id, debit_account, credit_account, amount, kind, code, order_id, created_at)
               SELECT i, d, c, a, k, code, o, $9 FROM unnest($2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[],
                                                       $7::text[], $8::text[]) AS u(i, d, c, a, k, code, o)
               ON CONFLICT (id) DO NOTHING RETURNING id, debit_account, credit_account, amount, kind),
           moved AS (SELECT debit_account AS acct, CASE kind WHEN 'posted' THEN amount ELSE 0 END AS dp, 0 AS cp,
                            CASE kind WHEN 'pending' THEN amount ELSE 0 END AS dq, 0 AS cq FROM applied
                     UNION ALL
                     SELECT credit_account, 0, CASE kind WHEN 'posted' THEN amount ELSE 0 END,
                            0, CASE kind WHEN 'pending' THEN amount ELSE 0 END FROM applied)""" + _ADD_TOTALS + """
           SELECT id FROM applied""",
        sorted(available), [t.id for t in todo], [t.debit for t in todo], [t.credit for t in todo],
        [t.amount for t in todo], ["pending" if t.pending else "posted" for t in todo],
        [t.code for t in todo], [t.order_id for t in todo], now)
    return {r["id"] for r in rows}, refused


async def resolve_many(conn: asyncpg.Connection, resolutions: list[tuple[str, str]], *, post: bool,
                       now: datetime) -> set[str]:
    """Post (or void) many pending transfers: resolutions are (transfer_id, pending_id). Returns
    the pending ids resolved now (the others were resolved before, or are no pending transfer:
    `_resolve` tells those apart, one by one)."""
    if not resolutions:
        return set()
    pending_ids = [p for _, p in resolutions]
    # Lock the total-keeping accounts they touch, in id order, before changing their totals.
    locked = await conn.fetch(
        """SELECT id FROM ledger_accounts WHERE no_overdraft AND id = ANY(ARRAY(
               SELECT debit_account FROM ledger_transfers WHERE id = ANY($1::text[])
               UNION SELECT credit_account FROM ledger_transfers WHERE id = ANY($1::text[])))
           ORDER BY id FOR UPDATE""", pending_ids)  # = ANY(ARRAY(..)): an index scan, not every account
    done = await conn.fetch(
        """WITH done AS (
               INSERT INTO ledger_transfers (id, debit_account, credit_account, amount, kind, pending_id, code, order_id,
                                             created_at)
               SELECT u.i, p.debit_account, p.credit_account, p.amount, $4, p.id, p.code, p.order_id, $5
               FROM unnest($2::text[], $3::text[]) AS u(i, pid) JOIN ledger_transfers p ON p.id = u.pid AND p.kind = 'pending'
               ON CONFLICT DO NOTHING RETURNING pending_id, debit_account, credit_account, amount),
           moved AS (SELECT debit_account AS acct, CASE WHEN $6 THEN amount ELSE 0 END AS dp, 0 AS cp,
                            -amount AS dq, 0 AS cq FROM done
                     UNION ALL
                     SELECT credit_account, 0, CASE WHEN $6 THEN amount ELSE 0 END, 0, -amount FROM done)""" + _ADD_TOTALS + """
           SELECT pending_id FROM done""",
        [r["id"] for r in locked], [t for t, _ in resolutions], pending_ids, "post_pending" if post else "void_pending",
        now, post)
    return {r["pending_id"] for r in done}


async def account(conn: asyncpg.Connection | asyncpg.Pool, account_id: str) -> Account:
    """An account's totals: kept on its row (no_overdraft), else derived from its transfers."""
    row = await conn.fetchrow(
        """SELECT id, debits_posted, credits_posted, debits_pending, credits_pending FROM ledger_accounts
           WHERE id = $1 AND no_overdraft
           UNION ALL
           SELECT id, debits_posted, credits_posted, debits_pending, credits_pending FROM ledger_balances
           WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM ledger_accounts WHERE id = $1 AND no_overdraft)""",
        account_id)
    return Account(**dict(row)) if row else Account(id=account_id)


async def check(conn: asyncpg.Connection | asyncpg.Pool) -> list[str]:
    """Problems in this ledger: running totals that differ from the transfers, an overdrawn
    account, or posted debits that differ from posted credits."""
    problems = []
    rows = await conn.fetch(
        """SELECT a.id, a.no_overdraft, a.debits_posted, a.credits_posted, a.debits_pending, a.credits_pending,
                  coalesce(b.debits_posted, 0) AS dp, coalesce(b.credits_posted, 0) AS cp,
                  coalesce(b.debits_pending, 0) AS dq, coalesce(b.credits_pending, 0) AS cq
           FROM ledger_accounts a LEFT JOIN ledger_balances b USING (id)""")
    for r in rows:
        cached = (r["debits_posted"], r["credits_posted"], r["debits_pending"], r["credits_pending"])
        derived = (r["dp"], r["cp"], r["dq"], r["cq"])
        if r["no_overdraft"] and cached != derived:
            problems.append(f"account {r['id']}: running totals {cached} differ from its transfers {derived}")
        if r["no_overdraft"] and r["cp"] - r["dp"] - r["dq"] < 0:
            problems.append(f"account {r['id']} is overdrawn")
    totals = await conn.fetchrow(
        "SELECT coalesce(sum(debits_posted), 0) AS d, coalesce(sum(credits_posted), 0) AS c FROM ledger_balances")
    if totals["d"] != totals["c"]:
        problems.append(f"posted debits {totals['d']} != posted credits {totals['c']}")
    return problems
