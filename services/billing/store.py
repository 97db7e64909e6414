"""asyncpg queries for the billing service's schema (migrations/001_billing.sql)."""
from __future__ import annotations

from datetime import date, datetime

import asyncpg

from services.billing.domain import ItemKind

Conn = asyncpg.Connection | asyncpg.Pool

# What is still owed on an item, in SQL.
OUTSTANDING = "(principal - principal_paid) + (fee - fee_paid) + (penalty - penalty_paid)"


# ---------------------------------------------------------------- users (UserRegistered)
async def insert_user(conn: asyncpg.Connection, user_id: str, registered_at: datetime) -> None:
    await conn.execute("INSERT INTO users (user_id, registered_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                       user_id, registered_at)


async def known_user(conn: Conn, user_id: str) -> str | None:
    """The user id when billing knows the user (registered, or with an account), else None."""
    return await conn.fetchval(
        """SELECT user_id FROM users WHERE user_id = $1
           UNION ALL SELECT user_id FROM accounts WHERE user_id = $1 LIMIT 1""", user_id)


# ---------------------------------------------------------------- accounts
async def ensure_account(conn: asyncpg.Connection, user_id: str, next_period: str, next_check_at: datetime,
                         now: datetime) -> None:
    await conn.execute(
        """INSERT INTO accounts (user_id, next_period, next_check_at, created_at, updated_at)
           VALUES ($1, $2, $3, $4, $4) ON CONFLICT (user_id) DO NOTHING""",
        user_id, next_period, next_check_at, now)


async def lock_account(conn: asyncpg.Connection, user_id: str, *, skip_locked: bool = False) -> dict | None:
    """The user's account row, locked until the transaction ends: every write for a user (and the
    timer) takes this lock first, so one user's billing is applied one change at a time."""
    row = await conn.fetchrow(
        f"SELECT * FROM accounts WHERE user_id = $1 FOR UPDATE{' SKIP LOCKED' if skip_locked else ''}", user_id)
    return dict(row) if row else None


async def get_account(conn: Conn, user_id: str) -> dict | None:
    row = await conn.fetchrow("SELECT * FROM accounts WHERE user_id = $1", user_id)
    return dict(row) if row else None


async def lock_due_accounts(conn: asyncpg.Connection, now: datetime, limit: int,
                            exclude: list[str] = ()) -> list[dict]:
    """Accounts whose timer has fallen due, skipping those another transaction holds (a handler
    or another billing process is bringing them up to date right now) and `exclude`."""
    rows = await conn.fetch(
        """SELECT * FROM accounts WHERE next_check_at <= $1 AND user_id <> ALL($3::text[]) ORDER BY next_check_at
           LIMIT $2 FOR UPDATE SKIP LOCKED""", now, limit, list(exclude))
    return [dict(r) for r in rows]


async def save_account(conn: asyncpg.Connection, account: dict, now: datetime) -> None:
    await conn.execute(
        """UPDATE accounts SET next_period = $2, next_check_at = $3, overdue = $4, days_overdue = $5, updated_at = $6
           WHERE user_id = $1""",
        account["user_id"], account["next_period"], account["next_check_at"], account["overdue"],
        account["days_overdue"], now)


# ---------------------------------------------------------------- statements
async def insert_statement(conn: asyncpg.Connection, statement_id: str, user_id: str, period: str, issued_on: date,
                           due_on: date, now: datetime) -> bool:
    """Issue a statement; False when this (user, period) was issued already."""
    return bool(await conn.fetchval(
        """INSERT INTO statements (statement_id, user_id, period, issued_on, due_on, issued_at)
           VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING true""",
        statement_id, user_id, period, issued_on, due_on, now))


async def get_statement(conn: Conn, statement_id: str) -> dict | None:
    row = await conn.fetchrow("SELECT * FROM statements WHERE statement_id = $1", statement_id)
    return dict(row) if row else None


async def statement_of_period(conn: Conn, user_id: str, period: str) -> dict | None:
    row = await conn.fetchrow("SELECT * FROM statements WHERE user_id = $1 AND period = $2", user_id, period)
    return dict(row) if row else None


async def statements_of(conn: Conn, user_id: str) -> list[dict]:
    return [dict(r) for r in await conn.fetch("SELECT * FROM statements WHERE user_id = $1 ORDER BY period", user_id)]


async def set_converted(conn: asyncpg.Connection, statement_id: str, plan_id: str, now: datetime) -> None:
    await conn.execute("UPDATE statements SET converted_at = $2, plan_id = $3 WHERE statement_id = $1",
                       statement_id, now, plan_id)


# ---------------------------------------------------------------- purchases and plans
async def insert_purchase(conn: asyncpg.Connection, order_id: str, user_id: str, amount: int, installments: int,
                          committed_at: datetime, period: str, plan_id: str | None) -> bool:
    return bool(await conn.fetchval(
        """INSERT INTO purchases (order_id, user_id, amount, installments, committed_at, period, plan_id)
           VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING RETURNING true""",
        order_id, user_id, amount, installments, committed_at, period, plan_id))


async def get_purchase(conn: Conn, order_id: str) -> dict | None:
    row = await conn.fetchrow("SELECT * FROM purchases WHERE order_id = $1", order_id)
    return dict(row) if row else None


async def add_refunded(conn: asyncpg.Connection, order_id: str, amount: int) -> None:
    await conn.execute("UPDATE purchases SET refunded = LEAST(amount, refunded + $2) WHERE order_id = $1",
                       order_id, amount)


async def insert_plan(conn: asyncpg.Connection, plan_id: str, user_id: str, source: str, order_id: str | None,
                      statement_id: str | None, periods: int, principal: int, fee: int, now: datetime) -> None:
    await conn.execute(
        """INSERT INTO plans (plan_id, user_id, source, order_id, statement_id, periods, principal, fee, created_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)""",
        plan_id, user_id, source, order_id, statement_id, periods, principal, fee, now)


async def plan_items(conn: asyncpg.Connection, plan_id: str) -> list[dict]:
    rows = await conn.fetch("SELECT * FROM items WHERE plan_id = $1 ORDER BY period_no FOR UPDATE", plan_id)
    return [dict(r) for r in rows]


# ---------------------------------------------------------------- items
async def add_statement_item(conn: asyncpg.Connection, item_id: str, user_id: str, period: str, due_on: date,
                             amount: int, billed: bool, penalty_through: date | None) -> None:
    """Post `amount` of purchases to a cycle's own item (creating it). `penalty_through`: for a
    posting after the due day, the overdue days already over, which its principal is not charged for."""
    await conn.execute(
        """INSERT INTO items (item_id, user_id, kind, period, due_on, billed, principal, penalty_through)
           VALUES ($1, $2, $8, $3, $4, $5, $6, $7)
           ON CONFLICT (item_id) DO UPDATE SET principal = items.principal + EXCLUDED.principal,
               penalty_through = GREATEST(items.penalty_through, EXCLUDED.penalty_through)""",
        item_id, user_id, period, due_on, billed, amount, penalty_through, ItemKind.STATEMENT.value)


async def insert_installment_item(conn: asyncpg.Connection, item_id: str, user_id: str, period: str, due_on: date,
                                  plan_id: str, period_no: int, principal: int, fee: int, billed: bool,
                                  penalty_through: date | None) -> None:
    await conn.execute(
        """INSERT INTO items (item_id, user_id, kind, period, due_on, plan_id, period_no, billed, principal, fee,
                              penalty_through)
           VALUES ($1, $2, $11, $3, $4, $5, $6, $7, $8, $9, $10)""",
        item_id, user_id, period, due_on, plan_id, period_no, billed, principal, fee, penalty_through,
        ItemKind.INSTALLMENT.value)


async def get_item(conn: asyncpg.Connection, item_id: str, *, lock: bool = True) -> dict | None:
    row = await conn.fetchrow(f"SELECT * FROM items WHERE item_id = $1{' FOR UPDATE' if lock else ''}", item_id)
    return dict(row) if row else None


async def period_items(conn: asyncpg.Connection, user_id: str, period: str) -> list[dict]:
    rows = await conn.fetch("SELECT * FROM items WHERE user_id = $1 AND period = $2 ORDER BY item_id FOR UPDATE",
                            user_id, period)
    return [dict(r) for r in rows]


async def mark_billed(conn: asyncpg.Connection, user_id: str, period: str) -> None:
    await conn.execute("UPDATE items SET billed = true WHERE user_id = $1 AND period = $2", user_id, period)


async def mark_fee_accrued(conn: asyncpg.Connection, item_id: str) -> None:
    await conn.execute("UPDATE items SET fee_accrued = true WHERE item_id = $1", item_id)


async def set_item_amounts(conn: asyncpg.Connection, item_id: str, *, principal: int, fee: int, fee_paid: int) -> None:
    await conn.execute("UPDATE items SET principal = $2, fee = $3, fee_paid = $4 WHERE item_id = $1",
                       item_id, principal, fee, fee_paid)


async def items_to_charge(conn: asyncpg.Connection, user_id: str, yesterday: date) -> list[dict]:
    """Billed items with principal unpaid whose overdue days up to `yesterday` are not all charged."""
    rows = await conn.fetch(
        """SELECT * FROM items WHERE user_id = $1 AND billed AND principal > principal_paid AND due_on < $2
             AND (penalty_through IS NULL OR penalty_through < $2)
           ORDER BY due_on, item_id FOR UPDATE""", user_id, yesterday)
    return [dict(r) for r in rows]


async def insert_charges(conn: asyncpg.Connection, item_id: str, charges: list[tuple[date, int, int]],
                         now: datetime) -> list[tuple[date, int]]:
    """Record charged days (day, principal, amount); returns those that were new (day, amount)."""
    rows = await conn.fetch(
        """INSERT INTO penalty_charges (item_id, day, principal, amount, charged_at)
           SELECT $1, d, p, a, $5 FROM unnest($2::date[], $3::bigint[], $4::bigint[]) AS c(d, p, a)
           ON CONFLICT DO NOTHING RETURNING day, amount""",
        item_id, [c[0] for c in charges], [c[1] for c in charges], [c[2] for c in charges], now)
    return sorted((r["day"], r["amount"]) for r in rows)


async def add_penalty(conn: asyncpg.Connection, item_id: str, amount: int, through: date) -> None:
    await conn.execute(
        """UPDATE items SET penalty = penalty + $2, penalty_through = GREATEST(penalty_through, $3)
           WHERE item_id = $1""", item_id, amount, through)


async def penalty_charges(conn: Conn, item_id: str) -> list[dict]:
    return [dict(r) for r in await conn.fetch(
        "SELECT day, principal, amount FROM penalty_charges WHERE item_id = $1 ORDER BY day", item_id)]


async def oldest_unpaid_billed_due(conn: asyncpg.Connection, user_id: str) -> date | None:
    return await conn.fetchval(f"SELECT min(due_on) FROM items WHERE user_id = $1 AND billed AND {OUTSTANDING} > 0",
                               user_id)


async def owed_items(conn: asyncpg.Connection, user_id: str) -> list[dict]:
    """Everything the user still owes, in allocation order: by due date; on one due date the
    statement's own item first, then installment periods (oldest plan first). Includes the open
    cycle and installment periods not billed yet (paid ahead only after everything due)."""
    rows = await conn.fetch(
        """SELECT i.* FROM items i LEFT JOIN plans p USING (plan_id)
           WHERE i.user_id = $1
             AND (i.principal - i.principal_paid) + (i.fee - i.fee_paid) + (i.penalty - i.penalty_paid) > 0
           ORDER BY i.due_on, i.kind <> $2, p.created_at, i.plan_id, i.period_no FOR UPDATE OF i""",
        user_id, ItemKind.STATEMENT.value)
    return [dict(r) for r in rows]


async def pay_item(conn: asyncpg.Connection, item_id: str, penalty: int, fee: int, principal: int) -> None:
    await conn.execute(
        """UPDATE items SET penalty_paid = penalty_paid + $2, fee_paid = fee_paid + $3,
               principal_paid = principal_paid + $4 WHERE item_id = $1""", item_id, penalty, fee, principal)


async def period_totals(conn: Conn, user_id: str) -> dict[str, dict]:
    """Per period: the sums the statements API shows."""
    rows = await conn.fetch(
        """SELECT period, count(*) AS items, sum(principal)::bigint AS principal, sum(fee)::bigint AS fee,
                  sum(penalty)::bigint AS penalty,
                  sum(principal_paid + fee_paid + penalty_paid)::bigint AS paid
           FROM items WHERE user_id = $1 GROUP BY period""", user_id)
    return {r["period"]: dict(r) for r in rows}


async def items_of_user(conn: Conn, user_id: str) -> list[dict]:
    return [dict(r) for r in await conn.fetch(
        "SELECT * FROM items WHERE user_id = $1 ORDER BY due_on, kind <> $2, plan_id, period_no", user_id,
        ItemKind.STATEMENT.value)]


# ---------------------------------------------------------------- refunds
async def insert_refund(conn: asyncpg.Connection, order_id: str, refund_key: str, user_id: str, amount: int,
                        refunded_at: datetime) -> bool:
    return bool(await conn.fetchval(
        """INSERT INTO refunds (order_id, refund_key, user_id, amount, refunded_at) VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT DO NOTHING RETURNING true""", order_id, refund_key, user_id, amount, refunded_at))


async def waiting_refunds(conn: asyncpg.Connection, order_id: str) -> list[dict]:
    rows = await conn.fetch(
        "SELECT * FROM refunds WHERE order_id = $1 AND NOT applied ORDER BY refunded_at, refund_key FOR UPDATE",
        order_id)
    return [dict(r) for r in rows]


async def mark_refund_applied(conn: asyncpg.Connection, order_id: str, refund_key: str, principal_reduced: int,
                              fee_waived: int, overpayment: int, now: datetime) -> None:
    await conn.execute(
        """UPDATE refunds SET applied = true, principal_reduced = $3, fee_waived = $4, overpayment = $5, applied_at = $6
           WHERE order_id = $1 AND refund_key = $2""",
        order_id, refund_key, principal_reduced, fee_waived, overpayment, now)


# ---------------------------------------------------------------- repayments
async def get_repayment(conn: Conn, repayment_id: str) -> dict | None:
    row = await conn.fetchrow("SELECT * FROM repayments WHERE repayment_id = $1", repayment_id)
    return dict(row) if row else None


async def insert_repayment(conn: asyncpg.Connection, r: dict) -> None:
    await conn.execute(
        """INSERT INTO repayments (repayment_id, user_id, amount, requested_at, applied_at, principal, fee, penalty,
                                   overpayment, on_time, allocated)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)""",
        r["repayment_id"], r["user_id"], r["amount"], r["requested_at"], r["applied_at"], r["principal"], r["fee"],
        r["penalty"], r["overpayment"], r["on_time"], r["allocated"])
