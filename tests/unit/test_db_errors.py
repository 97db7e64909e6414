"""Which Postgres errors are "the database is away" (retried) and which are a bug or a bad value
(dead-lettered): shared/db.py connection_lost, shared/consumer.py transient."""
import asyncio

import asyncpg
import pytest

from shared import db
from shared.consumer import transient


@pytest.mark.parametrize("exc", [
    ConnectionRefusedError(111, "Connection refused"),
    # A stopped server's Unix socket is gone (the services connect through it), and asyncio's
    # report of several failed addresses is a plain OSError.
    FileNotFoundError(2, "No such file or directory"),
    OSError("Multiple exceptions: [Errno 111] Connect call failed ('127.0.0.1', 5432), [Errno 99] ..."),
    asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.exceptions.CannotConnectNowError("the database system is not yet accepting connections"),
    asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already"),
    asyncpg.InterfaceError("connection is closed"),
    asyncpg.InterfaceError("cannot perform operation: connection is closed"),
    asyncpg.InterfaceError("pool is closing"),
    asyncpg.InterfaceError("pool is closed"),
    asyncpg.InterfaceError("cannot call Connection.execute(): the underlying connection is closed"),
])
def test_postgres_away_is_connection_lost(exc):
    assert db.connection_lost(exc) and transient(exc)


@pytest.mark.parametrize("exc", [
    asyncpg.exceptions.DataError("invalid input for query argument $1: 'x' (an integer is required)"),
    asyncpg.exceptions._base.DataError("invalid record"),  # a subclass of InterfaceError
    asyncpg.InterfaceError("cannot call PreparedStatement.fetch(): the prepared statement is closed"),
    asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
    asyncpg.exceptions.UndefinedColumnError('column "nope" does not exist'),
    asyncpg.exceptions.CheckViolationError("new row violates check constraint"),
    ValueError("rule violated"),
])
def test_a_bug_or_a_bad_value_is_not(exc):
    assert not db.connection_lost(exc) and not transient(exc)


@pytest.mark.parametrize("exc", [
    asyncio.TimeoutError(), asyncpg.exceptions.DeadlockDetectedError("deadlock detected"),
    asyncpg.exceptions.SerializationError("could not serialize access"),
    asyncpg.exceptions.LockNotAvailableError("canceling statement due to lock timeout"),
    asyncpg.exceptions.QueryCanceledError("canceling statement due to user request"),
    asyncpg.exceptions.OutdatedSchemaCacheError("cached statement plan is invalid due to a database schema change"),
    asyncpg.exceptions.InvalidCachedStatementError("cached plan must not change result type"),
])
def test_timeouts_deadlocks_cancels_and_schema_changes_are_retried(exc):
    assert transient(exc)
