"""asyncpg queries for the escrow service's schema."""
from __future__ import annotations

import dataclasses
from datetime import datetime

import asyncpg

from services.escrow.domain import Escrow, Refund, RefundKind, RefundState, Status
from shared import db, outbox

_FIELDS = [f.name for f in dataclasses.fields(Escrow)]
_COLUMNS = ", ".join(_FIELDS)


def _escrow(row: asyncpg.Record | None) -> Escrow | None:
    if row is None:
        return None
    return Escrow(**{**{f: row[f] for f in _FIELDS}, "status": Status(row["status"])})


async def lock(conn: asyncpg.Connection, order_id: str) -> Escrow | None:
    """The order's escrow, locked until the transaction ends. The advisory lock also serializes
    the first command of an order (no row to lock yet: HoldFunds racing CancelOrder); the row
    lock serializes with the auto-confirm loop."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('escrow:' || $1::text))", order_id)
    return _escrow(await conn.fetchrow(f"SELECT {_COLUMNS} FROM escrows WHERE order_id = $1 FOR UPDATE", order_id))


async def lock_many(conn: asyncpg.Connection, order_ids: list[str]) -> dict[str, Escrow]:
    """`lock` for many orders, in order_id order; returns the escrows that exist."""
    ids = sorted(set(order_ids))
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('escrow:' || o)) FROM unnest($1::text[]) AS o", ids)
    rows = await conn.fetch(f"SELECT {_COLUMNS} FROM escrows WHERE order_id = ANY($1::text[]) ORDER BY order_id FOR UPDATE",
                            ids)
    return {r["order_id"]: _escrow(r) for r in rows}


async def get(conn: asyncpg.Connection | asyncpg.Pool, order_id: str) -> Escrow | None:
    return _escrow(await conn.fetchrow(f"SELECT {_COLUMNS} FROM escrows WHERE order_id = $1", order_id))


async def lock_due(conn: asyncpg.Connection, now: datetime, limit: int) -> list[tuple[Escrow, str | None]]:
    """Holds whose auto-confirm time has come, skipping those a handler is working on right now
    (the next tick sees them again, released or not), each with its kept traceparent (NULL
    unless tracing was on when it was held). The status is a literal so that the planner uses
    the partial index escrows_auto_confirm_due."""
    rows = await conn.fetch(
        f"""SELECT {_COLUMNS}, traceparent FROM escrows
            WHERE status = '{Status.HELD}' AND auto_confirm_at <= $1
                  AND amount - refunded_from_hold - released_gross > 0
            ORDER BY auto_confirm_at LIMIT $2 FOR UPDATE SKIP LOCKED""", now, limit)
    return [(_escrow(r), r["traceparent"]) for r in rows]


_N = len(_FIELDS)
# An existing row takes the new values, all but its traceparent (kept from its first hold).
_UPSERT = f"""ON CONFLICT (order_id) DO UPDATE SET {", ".join(f"{f} = EXCLUDED.{f}" for f in _FIELDS if f != "order_id")},
                updated_at = EXCLUDED.updated_at"""
_SAVE_ANY = f"""INSERT INTO escrows ({_COLUMNS}, created_at, updated_at{{traced}})
            VALUES ({", ".join(f"${i}" for i in range(1, _N + 1))}, ${_N + 1}, ${_N + 1}{{param}})
            {_UPSERT}"""
_SAVE = _SAVE_ANY.format(traced="", param="")
# A new hold with its order's trace context; an existing row keeps the one it has.
_SAVE_TRACED = _SAVE_ANY.format(traced=", traceparent", param=f", ${_N + 2}")


def _values(escrow: Escrow) -> list:
    return [v.value if isinstance(v, Status) else v for v in (getattr(escrow, f) for f in _FIELDS)]


async def save(conn: asyncpg.Connection, escrow: Escrow, now: datetime, traceparent: str | None = None) -> None:
    """`traceparent` (tracing on only): the order's trace context, kept for the auto-confirm timer."""
    if traceparent is None:
        await conn.execute(_SAVE, *_values(escrow), now)
    else:
        await conn.execute(_SAVE_TRACED, *_values(escrow), now, traceparent)


async def save_many(conn: asyncpg.Connection, escrows: list[Escrow], now: datetime,
                    traceparents: list[str | None] | None = None, emit: list[outbox.Row] = ()) -> None:
    """`save` for many (distinct orders), in one statement; `traceparents` (tracing on only):
    each escrow's, in the same order. `emit`: outbox rows written by the same statement (a round
    trip less per batch)."""
    if not escrows:
        await outbox.add_many(conn, list(emit))
        return
    if traceparents is not None and len(traceparents) != len(escrows):
        raise ValueError("one traceparent per escrow")
    rows = [dict(zip(_FIELDS, _values(e)), traceparent=traceparents[i] if traceparents else None)
            for i, e in enumerate(escrows)]
    if emit:
        await outbox.write_with(conn, f"saved AS ({_SAVE_MANY})", [db.json_rows(rows), now], list(emit))
    else:
        await conn.execute(_SAVE_MANY, db.json_rows(rows), now)


_SAVE_MANY = f"""INSERT INTO escrows ({_COLUMNS}, created_at, updated_at, traceparent)
            SELECT {_COLUMNS}, $2, $2, traceparent FROM jsonb_populate_recordset(NULL::escrows, $1::text::jsonb)
            {_UPSERT}"""


async def get_refund(conn: asyncpg.Connection, order_id: str, refund_id: str) -> Refund | None:
    row = await conn.fetchrow(
        "SELECT order_id, refund_id, amount, kind, state, reason_code FROM refunds WHERE order_id = $1 AND refund_id = $2",
        order_id, refund_id)
    if row is None:
        return None
    return Refund(row["order_id"], row["refund_id"], row["amount"], RefundKind(row["kind"]), RefundState(row["state"]),
                  row["reason_code"])


async def save_refund(conn: asyncpg.Connection, refund: Refund, now: datetime) -> None:
    """Insert a refund, or settle a pending one (same order and refund_id)."""
    await conn.execute(
        """INSERT INTO refunds (order_id, refund_id, amount, kind, state, reason_code, created_at, updated_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $7)
           ON CONFLICT (order_id, refund_id) DO UPDATE SET state = EXCLUDED.state, reason_code = EXCLUDED.reason_code,
               updated_at = EXCLUDED.updated_at""",
        refund.order_id, refund.refund_id, refund.amount, refund.kind.value, refund.state.value, refund.reason_code,
        now)
