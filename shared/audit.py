"""The audit trail of operator actions: every /admin/* call that may change something (POST,
PUT, PATCH, DELETE) is recorded in the service's own `audit_log` table with who (the operator
token's fingerprint, never the token, and the caller's `X-Operator` name), what (method, path, a
summary of the body without secrets or personal data), when, and the outcome (HTTP status).
Written before the action runs and completed after it, so even a crash leaves the attempt
(status null). Refused calls (401, 403, 400) are recorded too. Read back at GET /admin/audit-log."""
from __future__ import annotations

import json
import math
import re

import asyncpg

from shared.clock import utcnow

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Body fields whose value never goes into the trail.
SENSITIVE = re.compile(r"token|secret|password|passwd|authorization|credential|api_?key|phone|id_number|card",
                       re.IGNORECASE)
MAX_TEXT, MAX_ITEMS, MAX_DEPTH = 100, 20, 4
MASK = "***"


def audited(method: str, path: str) -> bool:
    return method.upper() in MUTATING and (path == "/admin" or path.startswith("/admin/"))


def clean(text: str, limit: int = MAX_TEXT) -> str:
    """Printable text Postgres can store: no NUL or other control characters, no lone surrogates,
    at most `limit` characters."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    text = "".join(c if c.isprintable() else "\ufffd" for c in text)
    return text if len(text) <= limit else text[:limit] + "…"


def summarize(value, depth: int = 0):
    """A JSON value with every sensitive field masked, long texts cut and big containers trimmed."""
    if isinstance(value, dict):
        if depth >= MAX_DEPTH:
            return f"{{{len(value)} fields}}"
        items = list(value.items())[:MAX_ITEMS]
        return {clean(str(k), 64): MASK if SENSITIVE.search(str(k)) else summarize(v, depth + 1) for k, v in items}
    if isinstance(value, list):
        if depth >= MAX_DEPTH:
            return f"[{len(value)} items]"
        return [summarize(v, depth + 1) for v in value[:MAX_ITEMS]]
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # NaN and infinities are not JSON Postgres stores
    return value  # numbers, booleans, null


def body_summary(raw: bytes) -> dict | list | str | None:
    if not raw:
        return None
    try:
        return summarize(json.loads(raw))
    except (ValueError, RecursionError):
        return f"<{len(raw)} bytes, not JSON>"


# Stamped with the real time (shared.clock.utcnow), not the platform's clock: an operator acted
# then, whatever offset a test has given the controllable clock.
async def start(pool: asyncpg.Pool, *, operator: str | None, token_id: str | None, method: str, path: str,
                body) -> int:
    return await pool.fetchval(
        """INSERT INTO audit_log (at, operator, token_id, method, path, body) VALUES ($1, $2, $3, $4, $5, $6)
           RETURNING id""",
        utcnow(), clean(operator, 64) if operator else None, token_id, method,
        clean(path, 300), body)


async def finish(pool: asyncpg.Pool, entry_id: int, status: int) -> None:
    await pool.execute("UPDATE audit_log SET status = $2, finished_at = $3 WHERE id = $1",
                       entry_id, status, utcnow())


async def recent(pool: asyncpg.Pool, limit: int, before: int | None = None) -> list[dict]:
    """Newest first; `before` (an id) pages back."""
    # Two statements, not `$2 IS NULL OR id < $2`: the services run generic plans (shared/db.py),
    # and the generic plan of that one would read every entry newer than `before`.
    if before is None:
        rows = await pool.fetch("SELECT * FROM audit_log ORDER BY id DESC LIMIT $1", limit)
    else:
        rows = await pool.fetch("SELECT * FROM audit_log WHERE id < $2 ORDER BY id DESC LIMIT $1", limit, before)
    return [dict(r) for r in rows]
