"""Idempotency keys for HTTP writes (docs/contract.md §6, Stripe's model).

- The key comes in the `Idempotency-Key` header or in the body's `idempotency_key` (`key`); both
  given and different is 400 INVALID_REQUEST.
- The first response for a key is stored and returned again for the same key with the same body,
  refusals (4xx) included: a write that raises ApiError with a 4xx has its writes undone and its
  error stored as the response, exactly as one that returns a 4xx result. The same key with
  another body is 409 IDEMPOTENCY_CONFLICT.
- The key is claimed in the transaction of the write itself, so a concurrent repeat waits for the
  first to commit and then gets its result; a write that fails unexpectedly (5xx, a crash)
  claims nothing and may be retried with the same key.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Awaitable, Callable

import asyncpg
from fastapi import Request

from shared.errors import ApiError

Result = tuple[int, dict[str, Any]]  # (HTTP status, JSON body)

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 64


def request_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def key(request: Request, body_key: str | None) -> str:
    """The write's idempotency key: the `Idempotency-Key` header or the body's
    `idempotency_key` (1 … 64 characters); 400 INVALID_REQUEST when neither is given or both are
    and differ."""
    header = request.headers.get(HEADER)
    if header is not None and not 1 <= len(header) <= MAX_KEY_LENGTH:
        raise ApiError(400, "INVALID_REQUEST", f"{HEADER}: 1 to {MAX_KEY_LENGTH} characters")
    if header is not None and body_key is not None and header != body_key:
        raise ApiError(400, "INVALID_REQUEST", f"the {HEADER} header and idempotency_key differ")
    found = header if header is not None else body_key
    if found is None:
        raise ApiError(400, "INVALID_REQUEST", f"idempotency_key (or the {HEADER} header) is required")
    return found


def _error(exc: ApiError) -> Result:
    return exc.status, {"error": {"code": exc.code, "message": exc.message}}


async def run_once(pool: asyncpg.Pool, scope: str, key: str, body: dict[str, Any],
                   write: Callable[[asyncpg.Connection], Awaitable[Result]]) -> Result:
    """`write(conn)` once per (scope, key): its (status, body), or a 4xx ApiError it raised as
    (status, error body), is stored and returned for every repeat with the same `body`."""
    digest = request_hash(body)
    async with pool.acquire() as conn, conn.transaction():
        claimed = await conn.fetchval(
            """INSERT INTO idempotency_keys (scope, key, request_hash) VALUES ($1, $2, $3)
               ON CONFLICT DO NOTHING RETURNING true""", scope, key, digest)
        if not claimed:
            row = await conn.fetchrow("SELECT request_hash, status, body FROM idempotency_keys WHERE scope = $1 AND key = $2",
                                      scope, key)
            if row["request_hash"] != digest:
                raise ApiError(409, "IDEMPOTENCY_CONFLICT", "this idempotency key was used with a different request")
            return row["status"], row["body"]
        try:
            async with conn.transaction():  # savepoint: a refusal leaves none of its writes behind
                status, result = await write(conn)
        except ApiError as exc:
            if exc.status >= 500:
                raise
            status, result = _error(exc)
        await conn.execute("UPDATE idempotency_keys SET status = $3, body = $4 WHERE scope = $1 AND key = $2",
                           scope, key, status, result)
        return status, result
