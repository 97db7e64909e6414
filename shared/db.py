"""Postgres: one pool per service, its schema first on the search path, migrations applied in
order, once, under an advisory lock (several copies of a service may start together)."""
from __future__ import annotations

import importlib.util
from decimal import Decimal
from pathlib import Path

import asyncpg
import orjson

from shared import outbox

RUNTIME_MIGRATIONS = Path(__file__).parent / "migrations"

# Postgres is away or not there yet: the work is retried, never blamed on the record. While a
# restarted server recovers it answers "not yet accepting connections" (57P03); a server shutting
# down ends sessions with 57P01/57P02; a full server refuses with 53300. OSError is whole, not just
# its network errors: connecting to a stopped server's Unix socket (how `./danbao up` connects the
# services) raises FileNotFoundError, and asyncio reports several failed addresses as a plain
# OSError. A handler's own file errors would be retried too; no handler touches files.
CONNECTION_LOST = (OSError, asyncpg.PostgresConnectionError,
                   asyncpg.exceptions.CannotConnectNowError, asyncpg.exceptions.AdminShutdownError,
                   asyncpg.exceptions.CrashShutdownError, asyncpg.exceptions.TooManyConnectionsError)


# asyncpg's messages: "connection is closed", "cannot perform operation: connection is closed",
# "... underlying connection is closed", "pool is closing", "pool is closed".
_CLOSED = ("connection is closed", "pool is closing", "pool is closed")


def connection_lost(exc: BaseException) -> bool:
    """Is `exc` Postgres being away (CONNECTION_LOST, or a closed connection or pool)? asyncpg
    raises its InterfaceError for a closed connection or pool, but also for a bug in the calls
    ("another operation is in progress", a closed prepared statement): retrying those would never
    end, so only asyncpg's closed-connection and closed-pool messages count."""
    if isinstance(exc, asyncpg.InterfaceError):
        return type(exc) is asyncpg.InterfaceError and str(exc).endswith(_CLOSED)
    return isinstance(exc, CONNECTION_LOST)


def json_text(value) -> str:
    # OPT_NON_STR_KEYS: keys that are not text become text, as json.dumps makes them.
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


async def _init_connection(conn: asyncpg.Connection) -> None:
    # orjson reads an integer beyond 64 bits as a float; no column of ours holds one (amounts are
    # bounded far below, docs/contract.md §2).
    await conn.set_type_codec("jsonb", encoder=json_text, decoder=orjson.loads, schema="pg_catalog")
    await conn.set_type_codec("json", encoder=json_text, decoder=orjson.loads, schema="pg_catalog")


def _json_default(value):
    # orjson writes datetimes and dates itself (RFC 3339, as isoformat); Decimal it leaves to us.
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not a column value")


def json_rows(rows: list[dict]) -> str:
    """Rows for `jsonb_populate_recordset(NULL::<table>, $n::text::jsonb)`: many rows as one
    parameter, each value decoded by its column's own type (timestamps, arrays, numbers), so a
    set of rows is one statement that Postgres runs once instead of once per row (executemany)."""
    return orjson.dumps(rows, default=_json_default, option=orjson.OPT_NON_STR_KEYS).decode()


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Released connections skip asyncpg's reset query (RESET ALL, UNLISTEN, ...: a round trip
    per release). Nothing here changes session state: settings are SET LOCAL, advisory locks are
    transaction-level, and the relay listens on a connection of its own. An open transaction is
    still rolled back by the pool."""


class _Transaction:
    """asyncpg's transaction (or savepoint) with the outbox's hand-off (shared/outbox.py): once the
    process hands off (`outbox.hand_off_to`), a top-level transaction collects the outbox rows
    written in it and hands them over right after its commit, so the process sends its rows in
    the order its transactions commit; a transaction or savepoint that rolls back forgets the
    rows written in it (they never existed)."""

    def __init__(self, conn: asyncpg.Connection, transaction):
        self._conn, self._transaction = conn, transaction
        self._mark: int | None = None
        self._target = None      # where a top-level transaction's rows go after its commit
        self._collecting = None  # outbox.collecting() of that transaction, and its rows
        self._rows: list = []

    async def __aenter__(self):
        target = outbox.handing_off()
        if target is not None and not self._conn.is_in_transaction():
            self._target, self._collecting = target, outbox.collecting()
            self._rows = self._collecting.__enter__()
        self._mark = outbox.mark()
        try:
            return await self._transaction.__aenter__()
        except BaseException:
            self._stop_collecting()
            raise

    async def __aexit__(self, exc_type, exc, tb):
        try:
            result = await self._transaction.__aexit__(exc_type, exc, tb)  # the commit, or the rollback
        except BaseException:  # the commit failed: nothing was written
            outbox.roll_back_to(self._mark)
            self._stop_collecting()
            raise
        if exc_type is not None:
            outbox.roll_back_to(self._mark)
        self._stop_collecting()
        if self._rows and exc_type is None:
            await self._target(self._rows)
        return result

    def _stop_collecting(self) -> None:
        if self._collecting is not None:
            self._collecting.__exit__(None, None, None)
            self._collecting = None


class Connection(asyncpg.Connection):
    def transaction(self, **options) -> _Transaction:  # type: ignore[override]
        return _Transaction(self, super().transaction(**options))


# A prepared statement is planned once, not at every execution. Left to itself, Postgres kept
# re-planning most of the hot statements (their array parameters make the generic plan's
# estimate look dearer than a custom plan's), and planning took ~40 % of their time
# (docs/performance.md, step 15). The generic plans of the set statements find their rows by
# index (tests/integration/test_query_plans.py checks them).
PLAN_CACHE_MODE = "force_generic_plan"
# Random reads cost about what sequential ones do on the disks this runs on (SSD, a VM's disk).
# With the default 4.0, a generic plan made while a table is still empty (a new platform's first
# minute) scans the whole table by key, and keeps doing so as the table grows, until autoanalyze
# has the statement planned again.
RANDOM_PAGE_COST = "1.1"


async def create_pool(dsn: str, schema: str, *, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=_init_connection, reset=_keep_session,
        connection_class=Connection,
        server_settings={"search_path": schema, "application_name": f"danbao-{schema}",
                         "plan_cache_mode": PLAN_CACHE_MODE, "random_page_cost": RANDOM_PAGE_COST},
    )


async def _run_python(conn: asyncpg.Connection, path: Path) -> None:
    """A `NNN_name.py` migration: a module with `async def migrate(conn)`, for changes SQL cannot
    make alone (e.g. hashing personal data with a key from the environment)."""
    spec = importlib.util.spec_from_file_location(f"danbao_migration_{path.parent.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    await module.migrate(conn)


async def migrate(pool: asyncpg.Pool, schema: str, folders: list[Path]) -> list[str]:
    """Apply the `*.sql` and `*.py` migrations of each folder (runtime's first), each once, in
    name order, all in one transaction."""
    applied_now = []
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"migrate:{schema}")
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        for folder in folders:
            for path in sorted([*folder.glob("*.sql"), *folder.glob("*.py")], key=lambda p: p.name):
                name = f"{folder.parent.name}/{path.name}"
                if name in done or path.name == "__init__.py":
                    continue
                if path.suffix == ".py":
                    await _run_python(conn, path)
                else:
                    await conn.execute(path.read_text())
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
                applied_now.append(name)
    return applied_now
