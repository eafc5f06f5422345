"""The engine's transactions: one Core connection, and on PostgreSQL no round trip for BEGIN.

psycopg2 and psycopg 3 open a transaction with a `BEGIN` of their own, a round trip before
the first statement (one of the five a batch of deducts made). Here the connection runs in
autocommit mode, where the driver sends nothing of its own, and the engine opens the transaction itself:
`BEGIN` goes out as the first words of the transaction's first statement, whichever that is
(the lock, a hold's owner, an ORM query of the subscriptions), and `COMMIT` after `work`
returned, or as the last words of the statement that `commit_with_next_statement` names
(the writer's, when it needs no result back). Whatever happens in between, a transaction still open on the connection (libpq
knows, without asking the server) is rolled back, or the connection is thrown away, before
the pool gets it back. Other databases and drivers use SQLAlchemy's transaction as usual.

The whole of `work` reruns under the one retry policy, `storage.database.rerun_on_conflict`:
on deadlocks and serialization failures, and once on an IntegrityError (two requests racing
for one new key).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from creditworker.storage.database import rerun_on_conflict

T = TypeVar("T")

BEGIN = "BEGIN ISOLATION LEVEL READ COMMITTED;\n"
COMMIT = ";\nCOMMIT"
_STATE = "creditworker.transaction"
"""In a connection's `info`, where its engine-run transaction is: one of the four below."""
_PENDING, _OPEN, _COMMITTED = "BEGIN pending", "open", "committed"
_ONE_STATEMENT, _COMMIT_NEXT = "BEGIN pending, COMMIT next", "COMMIT next"

_folding: weakref.WeakSet[Engine] = weakref.WeakSet()
_folding_lock = threading.Lock()


def run_transaction(engine: Engine, work: Callable[[Connection], T]) -> T:
    """Run `work` in one transaction on a Core connection; rerun it on conflicts.

    `work` must be safe to rerun from scratch: everything it did is rolled back first.
    """
    fold = engine.dialect.name == "postgresql" and engine.dialect.driver in ("psycopg2", "psycopg")
    if fold:
        _fold_begin(engine)
    return rerun_on_conflict(lambda: _folded(engine, work) if fold else _plain(engine, work))


def _plain(engine: Engine, work: Callable[[Connection], T]) -> T:
    with engine.begin() as connection:
        return work(connection)


def _folded(engine: Engine, work: Callable[[Connection], T]) -> T:
    with engine.connect() as connection:
        dbapi_connection: Any = connection.connection.dbapi_connection
        level = _autocommit(dbapi_connection, connection.dialect.driver)
        info = connection.info
        info[_STATE] = _PENDING
        try:
            if _accounted(connection):
                connection.begin()  # SQLAlchemy's bookkeeping: the driver sends nothing for it
            value = work(connection)
            if info[_STATE] in (_OPEN, _COMMIT_NEXT):  # BEGIN went out, COMMIT did not
                info[_STATE] = None
                connection.exec_driver_sql("COMMIT")
            if connection.in_transaction():  # begun above, or by a statement SQLAlchemy ran
                connection.commit()
            return value
        finally:
            info.pop(_STATE, None)
            _end_open_transaction(connection, dbapi_connection, level, connection.dialect.driver)


def _accounted(connection: Connection) -> bool:
    """Whether a folded transaction keeps SQLAlchemy's own account of it, which sends nothing
    and cost 6% of a metered request's instructions: when anyone listens to the engine's
    transactions, and on psycopg 3, whose `commit()` and `rollback()` act on the server's
    transaction even in autocommit mode (psycopg2's do nothing there). Without it, a
    statement that SQLAlchemy runs begins the account anyway, committed with the rest."""
    if connection.dialect.driver == "psycopg":
        return True
    dispatch = connection.engine.dispatch
    return bool(dispatch.begin or dispatch.commit or dispatch.rollback)


def runs_folded(connection: Connection) -> bool:
    """Whether `connection` is in a transaction this module runs (its BEGIN and COMMIT
    go out in `folded_statement`, whatever SQLAlchemy's account of it says)."""
    return connection.info.get(_STATE) is not None


def commit_with_next_statement(connection: Connection) -> bool:
    """Have the next statement on `connection` end with COMMIT, if this module runs its
    transaction (else False: the caller's transaction commits as usual). Nothing may run on
    the connection after that statement, and its result is COMMIT's: it returns no rows."""
    info = connection.info
    if info.get(_STATE) not in (_PENDING, _OPEN):
        return False
    info[_STATE] = _COMMIT_NEXT if info[_STATE] == _OPEN else _ONE_STATEMENT
    return True


def _autocommit(dbapi_connection: Any, driver: str) -> Any:
    """Switch the driver to autocommit mode without a round trip; returns what to restore.

    psycopg 3 only flips a flag. For psycopg2 it is not SQLAlchemy's AUTOCOMMIT isolation
    level, nor psycopg2's `autocommit` alone: leaving autocommit mode with an isolation level
    set (the engine sets READ COMMITTED) makes psycopg2 send `SET
    default_transaction_isolation TO DEFAULT`. Outside autocommit mode it only notes a level
    (for its next BEGIN), so the level is cleared first and restored after; the engine's own
    BEGIN names it."""
    level = None
    if driver == "psycopg2":
        level = dbapi_connection.isolation_level
        dbapi_connection.isolation_level = None
    dbapi_connection.autocommit = True
    return level


def _end_open_transaction(connection: Connection, dbapi_connection: Any, level: Any, driver: str) -> None:
    """Roll back what a failure left open and hand the driver its transactions back; a
    connection that cannot is not reused."""
    driver_connection: Any = connection.connection.driver_connection if not connection.invalidated else None
    if driver_connection is None or driver_connection.closed:
        return
    try:
        if driver_connection.info.transaction_status != 0:  # not TRANSACTION_STATUS_IDLE (both drivers)
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("ROLLBACK")
            finally:
                cursor.close()
        dbapi_connection.autocommit = False
        if driver == "psycopg2":
            dbapi_connection.isolation_level = level
    except Exception:  # noqa: BLE001 - whatever went wrong, the connection must not go back as it is
        connection.invalidate()


def _fold_begin(engine: Engine) -> None:
    """Once per engine: a statement on a connection whose transaction is pending opens it.

    The listeners are the dialect's `do_execute` events, which SQLAlchemy consults only for
    the statements it runs itself; a `before_cursor_execute` listener on the engine would
    make every connection of the engine join the engine's event dispatch, which cost 4% of a
    metered request's instructions though the engine's own scripts run without it."""
    if engine in _folding:
        return
    with _folding_lock:
        if engine in _folding:
            return
        event.listen(engine, "do_execute", _fold_into_execute)
        event.listen(engine, "do_execute_no_params", _fold_into_execute_no_params)
        event.listen(engine, "do_executemany", _begin_before_executemany)
        _folding.add(engine)


def _pending(context: Any) -> Connection | None:
    """The connection of a statement SQLAlchemy is about to run, if it must open or close
    this module's transaction."""
    connection: Connection | None = getattr(context, "root_connection", None)
    if connection is None:
        return None
    try:
        info = connection.info
    except NotImplementedError:  # the one SQLAlchemy makes on first connect to learn the server
        return None
    state = info.get(_STATE)
    if state == _COMMITTED:  # it would run outside any transaction
        raise RuntimeError("a statement after the engine's transaction committed")
    return None if state is None or state == _OPEN else connection


def _folded_for_execute(cursor: Any, statement: str, context: Any) -> str | None:
    """The statement with BEGIN (and COMMIT) folded in, or None: it runs as it is."""
    connection = _pending(context)
    if connection is None or _begun_apart(connection, cursor):
        return None
    return folded_statement(connection, statement)


def _fold_into_execute(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
    """Run the statement with BEGIN (and COMMIT) folded in; True: it ran."""
    folded = _folded_for_execute(cursor, statement, context)
    if folded is not None:
        context.dialect.do_execute(cursor, folded, parameters, context)
    return folded is not None


def _fold_into_execute_no_params(cursor: Any, statement: str, context: Any) -> bool:
    folded = _folded_for_execute(cursor, statement, context)
    if folded is not None:
        context.dialect.do_execute_no_params(cursor, folded, context)
    return folded is not None


def _begin_before_executemany(cursor: Any, _statement: str, _parameters: Any, context: Any) -> bool:
    """An executemany would repeat a folded BEGIN for every row: BEGIN goes alone first."""
    connection = _pending(context)
    if connection is not None:
        if connection.info[_STATE] in (_ONE_STATEMENT, _COMMIT_NEXT):
            raise RuntimeError("COMMIT cannot ride on an executemany")
        cursor.execute(BEGIN)
        connection.info[_STATE] = _OPEN
    return False


def _begun_apart(connection: Connection, cursor: Any) -> bool:
    """psycopg 3's own cursor takes one command with parameters, and of several without them
    answers with the first's result: BEGIN goes alone, and COMMIT after `work` (see
    `_folded`). True when that was done (the statement then runs as it is)."""
    if not _binds_on_server(connection, cursor):
        return False
    if connection.info[_STATE] in (_PENDING, _ONE_STATEMENT):
        cursor.execute(BEGIN)
    connection.info[_STATE] = _OPEN
    return True


def folded_statement(connection: Connection, statement: str) -> str:
    """`statement` as it must go out on `connection`: after `BEGIN` if it is the first of
    the engine's transaction, before `COMMIT` if `commit_with_next_statement` named it. For
    a client-side-bound, single execution (the engine's scripts)."""
    state = connection.info.get(_STATE)
    if state is None or state == _OPEN:
        return statement
    if state == _COMMITTED:  # it would run outside any transaction
        raise RuntimeError("a statement after the engine's transaction committed")
    begin, commit = state in (_PENDING, _ONE_STATEMENT), state in (_COMMIT_NEXT, _ONE_STATEMENT)
    connection.info[_STATE] = _COMMITTED if commit else _OPEN
    return (BEGIN if begin else "") + statement + (COMMIT if commit else "")


def _binds_on_server(connection: Connection, cursor: Any) -> bool:
    """psycopg 3's own cursors bind on the server; the engine's scripts use its client-side
    cursor (storage/backends/postgres_arrays.py), which takes several statements."""
    if connection.dialect.driver != "psycopg":
        return False
    import psycopg

    return not isinstance(cursor, psycopg.ClientCursor)
