"""Engines and transactions that behave the same on PostgreSQL, SQLite and MariaDB/MySQL.

The dialect differences of engines and transactions live here: how a write transaction
takes its lock, how a row is created without a race, and which database errors are worth
retrying. The set-based statements of the engine have theirs in `backends/`, the
transaction runner in `transaction`.
"""

from __future__ import annotations

import os
import random
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError, DisconnectionError, IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.pool import QueuePool

from creditworker.storage.drivers import (
    naming_the_driver,
    resolve_database_url,
)
from creditworker.storage.tables import Base

T = TypeVar("T")

# PostgreSQL SQLSTATEs and MySQL error numbers that mean "run the transaction again": a
# serialization failure, a deadlock, and a prepared statement missing from (or already on) the
# server connection a pooler handed over (`backends.prepared`).
_RETRYABLE_SQLSTATES = {"40001", "40P01", "26000", "42P05"}
_RETRYABLE_MYSQL_ERRNOS = {1205, 1213}
MAX_TRANSACTION_ATTEMPTS = 8


def make_engine(url: str, **engine_options: Any) -> Engine:
    """Create an engine tuned for short write transactions on one account at a time."""
    parsed = resolve_database_url(url)
    with naming_the_driver(parsed):
        parsed, options = _engine_options(parsed, pooled="poolclass" not in engine_options)
        options.update(engine_options)
        engine = create_engine(parsed, **options)
    _tune(engine, engine_options)
    return engine


def is_memory_sqlite(url: URL) -> bool:
    """`sqlite://` or `sqlite:///:memory:`: a database that lives (and dies) with one connection."""
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


POOL_CONNECTIONS = 15
"""A server database's pool keeps every connection it opened, up to this many (SQLAlchemy's
default total: 5 kept + 10 overflow). With that default a burst above five opened overflow
connections and closed them as it ended, and the next burst opened them again, each a new
server process with its statements prepared anew and its caches cold: one slow moment grew
into a storm. In process at 200 metered requests/s (bench/middleware.py, three runs each, on
a busy machine) the default opened 8 to 349 connections in 17 s (p99 up to 215 ms); kept,
7 to 15. Last in, first out, so that what a quiet time needs stays warm and the spares wait
(pinged before use after `PING_AFTER_IDLE_SECONDS`). `make_engine(url, pool_size=...,
max_overflow=...)` overrides it."""


def _engine_options(parsed: URL, *, pooled: bool) -> tuple[URL, dict[str, Any]]:
    """The options of an engine for `parsed`; `pooled`: with the default pool (the caller
    named no `poolclass` of its own, which may take no sizes)."""
    backend = parsed.get_backend_name()
    options: dict[str, Any] = {"future": True}
    if backend == "sqlite":
        options["connect_args"] = {"check_same_thread": False, "timeout": 30}
        if is_memory_sqlite(parsed):
            # Every session must see the same in-memory database, so there is one connection;
            # a pool of one (not StaticPool, which hands the same connection to two threads at
            # once) makes concurrent sessions take turns with it.
            options.update(pool_size=1, max_overflow=0)
            options["poolclass"] = QueuePool
    else:
        options["isolation_level"] = "READ COMMITTED"
        if pooled:
            options.update(pool_size=POOL_CONNECTIONS, max_overflow=0, pool_use_lifo=True)
    if parsed.get_driver_name() == "psycopg2":
        # A batch's row updates go out in pages, not one round trip per row.
        options["executemany_mode"] = "values_plus_batch"
    if backend in ("mysql", "mariadb") and "charset" not in parsed.query:
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    return parsed, options


def _tune(engine: Engine, engine_options: dict[str, Any]) -> None:
    if engine.dialect.name == "sqlite":
        _make_sqlite_serialise_writers(engine)
    elif "pool_pre_ping" not in engine_options:
        _ping_connections_idle_for(engine, PING_AFTER_IDLE_SECONDS)
    _dispose_pool_in_forked_children(engine)


PING_AFTER_IDLE_SECONDS = 1.0
"""A pooled connection unused for this long is pinged before use; a busier one is not."""


def _ping_connections_idle_for(engine: Engine, seconds: float) -> None:
    """`pool_pre_ping`, but only for connections that sat idle in the pool.

    A plain pre-ping is one more round trip per transaction (per batch of the engine), and
    on a loaded machine a round trip costs milliseconds. A connection handed back less than
    `seconds` ago was working then; one that waited longer (a restarted server, a firewall
    that dropped it) is pinged, and a dead one is replaced before anyone uses it. A
    connection that dies within the window fails its statement, is invalidated, and the
    error is transient (`is_transient`): the worker retries, as for any lost connection.
    """

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info["checked_in_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        returned = record.info.get("checked_in_at")
        if returned is None or time.monotonic() - returned < seconds:
            return  # new (just connected) or recently working
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:  # the pool replaces the connection
            raise DisconnectionError("pooled connection failed its ping") from exc


def _make_sqlite_serialise_writers(engine: Engine) -> None:
    """SQLite has no row locks: every transaction takes the write lock up front.

    pysqlite's own transaction handling is switched off so that BEGIN IMMEDIATE is ours
    (the recipe from SQLAlchemy's SQLite dialect documentation).
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _dispose_pool_in_forked_children(engine: Engine) -> None:
    """Pooled connections must never cross a fork (Celery's prefork pool forks after import).

    ``dispose(close=False)`` drops the parent's connections in the child without closing
    the parent's sockets, as SQLAlchemy's pooling documentation recommends.
    """
    engine_ref = weakref.ref(engine)

    def _after_fork() -> None:
        forked = engine_ref()
        if forked is not None:
            forked.dispose(close=False)

    os.register_at_fork(after_in_child=_after_fork)


def is_retryable_conflict(exc: BaseException) -> bool:
    """A deadlock, serialization failure or lock timeout: the transaction may simply rerun."""
    if not isinstance(exc, DBAPIError) or isinstance(exc, IntegrityError):
        return False
    orig = exc.orig
    if (getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)) in _RETRYABLE_SQLSTATES:
        return True  # psycopg2 names the SQLSTATE `pgcode`, psycopg 3 `sqlstate`
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int) and args[0] in _RETRYABLE_MYSQL_ERRNOS:
        return True
    return "database is locked" in str(orig)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying later: a conflict, or the database connection was lost or refused."""
    if is_retryable_conflict(exc):
        return True
    if isinstance(exc, DBAPIError) and not isinstance(exc, IntegrityError):
        if exc.connection_invalidated:
            return True
        name = type(exc.orig).__name__
        return name in ("OperationalError", "InterfaceError")
    return False


def rerun_on_conflict(attempt: Callable[[], T]) -> T:
    """Call `attempt` (one whole transaction) again on deadlocks, serialization failures and
    unique-key races: the one place this policy lives (`transaction.run_transaction`, the one
    transaction runner, uses it).

    An IntegrityError is retried once because two requests racing for the same new
    idempotency key end that way; the rerun finds the winner's row and replays it.
    """
    integrity_retries = 0
    for number in range(1, MAX_TRANSACTION_ATTEMPTS + 1):
        try:
            return attempt()
        except IntegrityError:
            integrity_retries += 1
            if integrity_retries > 1:
                raise
        except DBAPIError as exc:
            if not is_retryable_conflict(exc) or number == MAX_TRANSACTION_ATTEMPTS:
                raise
            time.sleep(random.uniform(0, 0.005 * 2**number))
    raise AssertionError("unreachable")


def insert_if_absent(
    session: Session | Connection, table: type[Base], values: dict[str, Any]
) -> bool:
    """Insert a row unless its primary key exists; True if this call inserted it.

    Safe under concurrency: two transactions racing for the same key never both insert,
    and the loser does not fail.
    """
    backend = (session.dialect if isinstance(session, Connection) else session.get_bind().dialect).name
    statement: Any
    if backend == "postgresql":
        statement = postgresql.insert(table).values(values).on_conflict_do_nothing()
    elif backend == "sqlite":
        statement = sqlite.insert(table).values(values).on_conflict_do_nothing()
    elif backend in ("mysql", "mariadb"):
        statement = mysql.insert(table).values(values).prefix_with("IGNORE")
    else:
        raise NotImplementedError(f"no insert-if-absent for the {backend} dialect")
    # An INSERT's rowcount is read before the cursor closes only when asked (psycopg 3 forgets
    # it then: sqlalchemy/sqlalchemy#10974).
    result = session.execute(statement.execution_options(preserve_rowcount=True))
    return bool(getattr(result, "rowcount", 0) == 1)
