"""asyncpg queries for the credit service's schema."""
from __future__ import annotations

from datetime import datetime

import asyncpg

from services.credit.domain import AccountStatus, Behaviour, Line, Profile, ReservationState
from shared import pii


# ---------------------------------------------------------------- profiles
async def upsert_profile(conn: asyncpg.Connection, p: dict, now: datetime) -> None:
    """`p` is a UserRegistered's data: the hashes and masks of phone and id number (an event
    published before they were hashed carries the clear values: hashed here, never stored)."""
    p = pii.protect(p) if p.get("phone") is not None or p.get("id_number") is not None else p
    await conn.execute(
        """INSERT INTO profiles (user_id, birth_date, phone_hash, phone_masked, id_number_hash, id_number_masked,
                                 real_name_verified, registered_at, updated_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
           ON CONFLICT (user_id) DO UPDATE SET birth_date = EXCLUDED.birth_date, phone_hash = EXCLUDED.phone_hash,
               phone_masked = EXCLUDED.phone_masked, id_number_hash = EXCLUDED.id_number_hash,
               id_number_masked = EXCLUDED.id_number_masked, real_name_verified = EXCLUDED.real_name_verified,
               updated_at = EXCLUDED.updated_at""",
        p["user_id"], p["birth_date"], p.get("phone_hash"), p.get("phone_masked"), p.get("id_number_hash"),
        p.get("id_number_masked"), p["real_name_verified"], p["registered_at"], now)


async def get_profile(conn: asyncpg.Connection | asyncpg.Pool, user_id: str) -> dict | None:
    row = await conn.fetchrow("SELECT * FROM profiles WHERE user_id = $1", user_id)
    return dict(row) if row else None


def profile_and_behaviour(row: dict, tz) -> tuple[Profile, Behaviour]:
    # The rules need only whether there is a phone / id number, and equality: the hashes.
    profile = Profile(user_id=row["user_id"], birth_date=row["birth_date"], phone=row["phone_hash"],
                      id_number=row["id_number_hash"], real_name_verified=row["real_name_verified"],
                      registered_on=row["registered_at"].astimezone(tz).date())
    behaviour = Behaviour(successful_payments=row["successful_payments"], on_time_repayments=row["on_time_repayments"],
                          late_repayments=row["late_repayments"], days_overdue=row["days_overdue"])
    return profile, behaviour


async def count_behaviour(conn: asyncpg.Connection, user_id: str, column: str, by: int = 1) -> None:
    assert column in ("successful_payments", "on_time_repayments", "late_repayments")
    await conn.execute(f"UPDATE profiles SET {column} = {column} + $2 WHERE user_id = $1", user_id, by)


async def count_behaviour_many(conn: asyncpg.Connection, counts: dict[str, int], column: str) -> list[str]:
    """`count_behaviour` for many users in one statement (rows updated in user_id order); returns
    those of them who have a Huabei account, in the same round trip."""
    assert column in ("successful_payments", "on_time_repayments", "late_repayments")
    ids = sorted(counts)
    # `= ANY($1)` beside each join: the planner takes unnest for 100 rows and would otherwise
    # hash-join it against a scan of every profile.
    rows = await conn.fetch(
        f"""WITH counted AS (
                UPDATE profiles p SET {column} = p.{column} + u.n
                FROM (SELECT p2.user_id, u.n FROM unnest($1::text[], $2::int[]) AS u(id, n)
                      JOIN profiles p2 ON p2.user_id = u.id WHERE p2.user_id = ANY($1::text[])
                      ORDER BY p2.user_id FOR UPDATE OF p2) AS u
                WHERE p.user_id = u.user_id AND p.user_id = ANY($1::text[]))
            SELECT user_id FROM huabei_accounts WHERE user_id = ANY($1::text[]) ORDER BY user_id""",
        ids, [counts[i] for i in ids])
    return [r["user_id"] for r in rows]


async def set_days_overdue(conn: asyncpg.Connection, user_id: str, days: int) -> None:
    """Overdue days only accumulate (a later, smaller report never lowers them)."""
    await conn.execute("UPDATE profiles SET days_overdue = GREATEST(days_overdue, $2) WHERE user_id = $1", user_id, days)


# ---------------------------------------------------------------- accounts
async def get_account(conn: asyncpg.Connection | asyncpg.Pool, user_id: str, *, lock: bool = False) -> dict | None:
    row = await conn.fetchrow(f"SELECT * FROM huabei_accounts WHERE user_id = $1{' FOR UPDATE' if lock else ''}",
                              user_id)
    return dict(row) if row else None


def line_of(account: dict | None) -> Line | None:
    if account is None:
        return None
    return Line(credit_limit=account["credit_limit"], used=account["used"], reserved=account["reserved"],
                frozen=account["status"] == AccountStatus.FROZEN)


async def taken(conn: asyncpg.Connection, user_id: str, id_number_hash: str | None,
                phone_hash: str | None) -> tuple[bool, bool]:
    row = await conn.fetchrow(
        """SELECT bool_or(id_number_hash = $2) AS id_taken, bool_or(phone_hash = $3) AS phone_taken
           FROM huabei_accounts WHERE user_id <> $1""", user_id, id_number_hash, phone_hash)
    return bool(row["id_taken"]), bool(row["phone_taken"])


async def insert_account(conn: asyncpg.Connection, user_id: str, limit: int, score: int, id_number_hash: str,
                         phone_hash: str, now: datetime) -> bool:
    """False when another account took the id number or phone meanwhile, or the user has one."""
    return bool(await conn.fetchval(
        """INSERT INTO huabei_accounts (user_id, status, credit_limit, score, id_number_hash, phone_hash, activated_at,
                                        reviewed_at)
           VALUES ($1, $7, $2, $3, $4, $5, $6, $6) ON CONFLICT DO NOTHING RETURNING true""",
        user_id, limit, score, id_number_hash, phone_hash, now, AccountStatus.ACTIVE.value))


async def try_reserve(conn: asyncpg.Connection, user_id: str, amount: int) -> bool:
    """Atomically take `amount` from the available credit: concurrent purchases cannot overdraw."""
    return bool(await conn.fetchval(
        """UPDATE huabei_accounts SET reserved = reserved + $2
           WHERE user_id = $1 AND status = $3 AND credit_limit - used - reserved >= $2 RETURNING true""",
        user_id, amount, AccountStatus.ACTIVE.value))


async def move(conn: asyncpg.Connection, user_id: str, *, reserved: int = 0, used: int = 0) -> None:
    await conn.execute(
        "UPDATE huabei_accounts SET reserved = reserved + $2, used = used + $3 WHERE user_id = $1",
        user_id, reserved, used)


async def set_status(conn: asyncpg.Connection, user_id: str, status: AccountStatus) -> None:
    await conn.execute("UPDATE huabei_accounts SET status = $2 WHERE user_id = $1", user_id, status.value)


async def count_review_behaviour(conn: asyncpg.Connection, user_id: str, on_time: bool) -> None:
    column = "on_time_since_review" if on_time else "late_since_review"
    await conn.execute(f"UPDATE huabei_accounts SET {column} = {column} + 1 WHERE user_id = $1", user_id)


async def due_reviews(conn: asyncpg.Connection, before: datetime, limit: int) -> list[dict]:
    rows = await conn.fetch(
        """SELECT a.*, p.birth_date, p.real_name_verified, p.registered_at,
                  p.successful_payments, p.on_time_repayments, p.late_repayments, p.days_overdue
           FROM huabei_accounts a JOIN profiles p USING (user_id)
           WHERE a.reviewed_at <= $1 ORDER BY a.reviewed_at LIMIT $2 FOR UPDATE OF a SKIP LOCKED""", before, limit)
    return [dict(r) for r in rows]


async def save_review(conn: asyncpg.Connection, user_id: str, limit: int, score: int, now: datetime) -> None:
    await conn.execute(
        """UPDATE huabei_accounts SET credit_limit = $2, score = $3, reviewed_at = $4, on_time_since_review = 0,
               late_since_review = 0 WHERE user_id = $1""", user_id, limit, score, now)


async def set_score(conn: asyncpg.Connection, user_id: str, score: int) -> None:
    await conn.execute("UPDATE huabei_accounts SET score = $2 WHERE user_id = $1", user_id, score)


# ---------------------------------------------------------------- reservations
async def get_reservation(conn: asyncpg.Connection, order_id: str) -> dict | None:
    row = await conn.fetchrow("SELECT * FROM reservations WHERE order_id = $1 FOR UPDATE", order_id)
    return dict(row) if row else None


async def insert_reservation(conn: asyncpg.Connection, order_id: str, user_id: str, amount: int, installments: int,
                             expires_at: datetime, now: datetime, *, refusal: tuple[str, str] | None = None,
                             traceparent: str | None = None) -> None:
    """`traceparent` (tracing on only): the order's trace context, kept for the expiry timer."""
    await conn.execute(
        """INSERT INTO reservations (order_id, user_id, amount, installments, state, reason_code, message, expires_at,
                                     created_at, updated_at, traceparent)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10)""",
        order_id, user_id, amount, installments,
        (ReservationState.REFUSED if refusal else ReservationState.RESERVED).value,
        refusal[0] if refusal else None, refusal[1] if refusal else None, expires_at, now, traceparent)


async def set_reservation_state(conn: asyncpg.Connection, order_id: str, state: str, now: datetime, *,
                                reason_code: str | None = None, message: str | None = None,
                                committed_at: datetime | None = None) -> None:
    """A reservation's new state, with the refusal's reason (a refused commit) or when it was committed."""
    await conn.execute(
        """UPDATE reservations SET state = $2, updated_at = $3, reason_code = $4, message = $5,
               committed_at = COALESCE($6, committed_at) WHERE order_id = $1""",
        order_id, state, now, reason_code, message, committed_at)


async def expired_reservations(conn: asyncpg.Connection, now: datetime, limit: int) -> list[dict]:
    """Reservations past their expiry, locked, each with its kept traceparent (NULL unless
    tracing was on when it was made). The state is a literal, not a parameter, so that the
    planner uses reservations_expiring."""
    rows = await conn.fetch(
        f"""SELECT * FROM reservations WHERE state = '{ReservationState.RESERVED}' AND expires_at <= $1
           ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED""", now, limit)
    return [dict(r) for r in rows]


async def first_restoration(conn: asyncpg.Connection, order_id: str, refund_key: str, amount: int) -> bool:
    return bool(await conn.fetchval(
        """INSERT INTO restorations (order_id, refund_key, amount) VALUES ($1, $2, $3)
           ON CONFLICT DO NOTHING RETURNING true""", order_id, refund_key, amount))
