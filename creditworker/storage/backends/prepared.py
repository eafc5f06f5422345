"""Server-side prepared statements for the PostgreSQL path's fixed statement texts.

Parsing and planning were most of what the server spent on a metered request (2.7 ms of
its CPU per reserve + commit against 0.9 ms for hand-written SQL doing the same writes;
bench/engine_cost.py). Each statement with parameters is prepared once per connection
(`PREPARE cw_<hash> AS ...`, named by a hash of its text) and then run as `EXECUTE
cw_<hash>(...)`; the PREPARE rides in the same multi-statement text as its first EXECUTE, so
a script stays one round trip. With `plan_cache_mode = force_generic_plan` (sent with the
lock that opens a write transaction, `postgres_arrays.KEYED_PLANS`) a statement is planned
once per connection, not once per run.

SQL-level prepared statements belong to the server connection. A pooler in transaction mode
(PgBouncer's `pool_mode = transaction`) hands each transaction to any server connection,
which may lack the statement (SQLSTATE 26000) or already hold it (42P05). Either error makes
the client's list of its connection's statements unknown: it is read again from
`pg_prepared_statements` before the connection's next statement, and the transaction reruns
(`storage.database.rerun_on_conflict`). After `GIVE_UP_AFTER` such errors on one engine it
stops preparing, with one warning; `disable` (the service's `prepared_statements=False`,
`CREDITWORKER_DATABASE_PREPARED_STATEMENTS=false`) turns it off from the start.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import weakref
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

POOLER_SQLSTATES = frozenset({"26000", "42P05"})
"""invalid_sql_statement_name, duplicate_prepared_statement: the server connection is not the
one the statements were prepared on."""
GIVE_UP_AFTER = 3
PREFIX = "cw_"

_KNOWN = "creditworker.prepared"
"""In a pooled connection's `info` (kept for the DBAPI connection's life, cleared when it is
replaced): the names prepared on it, or None when unknown after a failure."""
_PLACEHOLDER = re.compile(r"%\((\w+)\)s")

_off: weakref.WeakSet[Engine] = weakref.WeakSet()
_pooler_errors: weakref.WeakKeyDictionary[Engine, int] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def disable(engine: Engine) -> None:
    """Never prepare on `engine` (behind a pooler in transaction mode)."""
    _off.add(engine)


def enabled(engine: Engine) -> bool:
    return engine not in _off


@dataclass(frozen=True, slots=True)
class _Script:
    """A statement text split for preparing: what a connection that holds all its
    statements sends (built once), and what one that lacks some needs."""

    names: frozenset[str]
    executes: str
    parts: tuple[tuple[str | None, str, str], ...]
    """Per statement: its prepared name (None without parameters), its PREPARE, its EXECUTE."""


@lru_cache(maxsize=2048)
def _split(statement: str) -> _Script:
    """`statement`, `;`-separated, for preparing. The engine's texts never hold `;` in a
    literal: their values travel as parameters."""
    parts: list[tuple[str | None, str, str]] = []
    for part in statement.split(";"):
        part = part.strip()
        if not part:
            continue
        names = list(dict.fromkeys(_PLACEHOLDER.findall(part)))
        if not names:
            parts.append((None, part, part))
            continue
        body = _PLACEHOLDER.sub(lambda match, names=names: f"${names.index(match.group(1)) + 1}", part)
        name = PREFIX + hashlib.blake2b(part.encode(), digest_size=10).hexdigest()
        arguments = ", ".join(f"%({parameter})s" for parameter in names)
        parts.append((name, f"PREPARE {name} AS {body}", f"EXECUTE {name}({arguments})"))
    return _Script(frozenset(name for name, _prepare, _execute in parts if name is not None),
                   ";\n".join(execute for _name, _prepare, execute in parts), tuple(parts))


def script(connection: Connection, statement: str) -> tuple[str, list[str]]:
    """`statement` as this connection runs it, and the names it prepares (to be noted with
    `succeeded` once it ran)."""
    if connection.engine in _off:
        return statement, []
    info = connection.connection.info
    known = info.get(_KNOWN)
    if known is None:  # a new connection (none), or unknown after a failure (read it)
        known = info[_KNOWN] = set() if _KNOWN not in info else _read_known(connection)
    split = _split(statement)
    if split.names <= known:
        return split.executes, []
    texts, preparing = [], []
    for name, prepare, execute in split.parts:
        if name is not None and name not in known and name not in preparing:
            texts.append(prepare)
            preparing.append(name)
        texts.append(execute)
    return ";\n".join(texts), preparing


def succeeded(connection: Connection, preparing: list[str]) -> None:
    if preparing:
        known = connection.connection.info.get(_KNOWN)
        if known is not None:
            known.update(preparing)


def failed(connection: Connection, preparing: list[str], error: BaseException) -> None:
    """After a failed script: PREPARE is not undone by a rollback, and which of its PREPAREs ran
    is unknown, so the list is read again before the connection's next statement."""
    state = getattr(error, "pgcode", None) or getattr(error, "sqlstate", None)
    pooler = state in POOLER_SQLSTATES
    if (preparing or pooler) and not connection.invalidated:
        connection.connection.info[_KNOWN] = None
    if pooler:
        engine = connection.engine
        with _lock:
            count = _pooler_errors[engine] = _pooler_errors.get(engine, 0) + 1
            giving_up = count >= GIVE_UP_AFTER and engine not in _off
            if giving_up:
                _off.add(engine)
        if giving_up:
            log.warning(
                "prepared statements lost %d times on %s: a pooler in transaction mode? The engine"
                " stops preparing its statements (set CREDITWORKER_DATABASE_PREPARED_STATEMENTS=false"
                " to start that way)", count, engine.url.render_as_string(hide_password=True))


def _read_known(connection: Connection) -> set[str]:
    """The statements this server connection holds (one round trip, only after a failure)."""
    cursor: Any = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute("SELECT name FROM pg_prepared_statements WHERE starts_with(name, %(prefix)s)",
                       {"prefix": PREFIX})
        return {row[0] for row in cursor.fetchall()}
    finally:
        cursor.close()
