"""Idempotency keys for HTTP writes (docs/contract.md §6, Stripe's model): the same key with the same
body returns the first result again; the same key with another body is 409 IDEMPOTENCY_CONFLICT.
The key is claimed in the transaction of the write itself, so a concurrent repeat waits for the
first to commit and then gets its result; a write that fails unexpectedly claims nothing."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Awaitable, Callable

import asyncpg

from shared.errors import ApiError

Result = tuple[int, dict[str, Any]]  # (HTTP status, JSON body)


def request_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


async def run_once(pool: asyncpg.Pool, scope: str, key: str, body: dict[str, Any],
                   write: Callable[[asyncpg.Connection], Awaitable[Result]]) -> Result:
    digest = request_hash(body)
    async with pool.acquire() as conn, conn.transaction():
        claimed = await conn.fetchval(
            """INSERT INTO idempotency_keys (scope, key, request_hash) VALUES ($1, $2, $3)
               ON CONFLICT DO NOTHING RETURNING true""", scope, key, digest)
        if not claimed:
            row = await conn.fetchrow("SELECT request_hash, status, body FROM idempotency_keys WHERE scope = $1 AND key = $2",
                                      scope, key)
            if row["request_hash"] != digest:
                raise ApiError(409, "IDEMPOTENCY_CONFLICT", "this idempotency_key was used with a different request")
            return row["status"], row["body"]
        status, result = await write(conn)
        await conn.execute("UPDATE idempotency_keys SET status = $3, body = $4 WHERE scope = $1 AND key = $2",
                           scope, key, status, result)
        return status, result
