"""The PostgreSQL path (psycopg2 or psycopg 3): every table's rows in one statement over
`unnest`.

Each table's rows go as one array literal per column (`INSERT ... SELECT FROM unnest(...)`,
`UPDATE ... FROM unnest(...)`): the statement's text never changes, so it is compiled once,
and a thousand rows travel as a handful of array parameters instead of thousands of bound
values (measured: see docs/benchmarks.md). A writer's statements are sent together, in one
round trip, when its script finishes (they do not depend on each other's results).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from functools import cache
from typing import Any

import orjson
from sqlalchemy import JSON, Boolean, Integer, Numeric, Table
from sqlalchemy.engine import Connection

from creditworker.contract.credits import DEFAULT_CREDIT_TYPE, PROMOTIONAL_SOURCES
from creditworker.contract.json_text import json_encoder, utc_text
from creditworker.storage.backends import literals, prepared
from creditworker.storage.backends.base import (
    Folded,
    LockedRead,
    ReadAlong,
    Shapes,
    key_columns,
)
from creditworker.storage.backends.core import Core
from creditworker.storage.tables import UtcDateTime
from creditworker.storage.transaction import folded_statement, runs_folded


class PostgresArrays(Core):
    """Raw SQL with array literals, several statements in one round trip (`base.Backend`)."""

    folds_reads = True

    def script(self, connection: Connection) -> ArrayScript:  # type: ignore[override]
        return ArrayScript(connection)

    def insert_rows(
        self, connection: Connection, table: Table, rows: Sequence[dict[str, Any]]
    ) -> None:
        if rows:
            _run(connection, _insert(table, tuple(rows[0]), "", False, len(rows) == 1), _params(table, rows, ""))

    def insert_returning_ids(
        self, connection: Connection, table: Table, rows: Sequence[dict[str, Any]]
    ) -> list[int]:
        if not rows:
            return []
        # The sequence numbers the rows in the order the SELECT produces them (ORDER BY
        # the array position): sorted, the returned ids are the ids of `rows` in order.
        result = _run(connection, _insert(table, tuple(rows[0]), "", True, len(rows) == 1), _params(table, rows, ""))
        return sorted(row[0] for row in result)

    def update_rows(
        self, connection: Connection, table: Table, key: str | tuple[str, ...], rows: Sequence[dict[str, Any]]
    ) -> None:
        if rows:
            keys = key_columns(key)
            _run(connection, _update(table, keys, _set_columns(tuple(rows[0]), keys), "", len(rows) == 1),
                 _params(table, rows, ""))

    def rows_where_in(
        self,
        connection: Connection,
        table: Table,
        columns: tuple[str, ...],
        key: str,
        values: Collection[Any],
        *,
        where: str = "",
        order_by: str = "",
        for_update: bool = False,
    ) -> list[tuple[Any, ...]]:
        """The values travel as one array literal (`key = ANY(...)`), and the statement text
        is the same whatever their number."""
        if not values:
            return []
        wanted = sorted(set(values))
        rows = _run(
            connection,
            _select(table, columns, key, where, order_by, for_update),
            _arrays(table, [{key: v} for v in wanted], ""),
        )
        stamps = [
            index
            for index, name in enumerate(columns)
            if isinstance(table.c[name].type, UtcDateTime)
        ]
        if not stamps:
            return [tuple(row) for row in rows]
        result = []
        for row in rows:
            row = list(row)
            for index in stamps:
                if row[index] is not None:
                    row[index] = row[index].replace(tzinfo=UTC)
            result.append(tuple(row))
        return result

    def drawable_lots(
        self,
        connection: Connection,
        shapes: Shapes,
        needed: Mapping[str, int],
        along: ReadAlong,
        stale_users: Collection[str] = (),
    ) -> tuple[list[tuple[Any, ...]], Folded | None]:
        """Only the lots that come first in the draw-down order until they cover what each
        account may draw; in the same statement what `along` asks: the operation rows, new
        ids from the ledger's and the lots' sequences (after the accounts' lock, so in the
        order their transactions hold it), the stale holds of `stale_users` and the named
        holds (as the lock holder left them)."""
        users = sorted(needed)
        asking = along.stale_holds and along.at is not None and bool(stale_users)
        rows = _run(
            connection,
            _drawable_lots_sql(shapes),
            {
                "users": text_array(users),
                "needed": "{" + ",".join(str(needed[user]) for user in users) + "}",
                "keys": text_array(sorted(set(along.operation_keys))),
                "entry_ids": along.entry_ids,
                "lot_ids": along.lot_ids,
                "stale_users": text_array(sorted(stale_users) if asking else []),
                "stale_at": _timestamp(along.at) if asking else None,
                "at": _timestamp(along.at),
                "hold_ids": text_array(sorted(set(along.hold_ids))),
            },
        )
        lots, *extra = rows[0][0]
        return _from_json_rows(lots, shapes.lots, shapes.lot_columns), _folded(extra, shapes, stale=asking)

    def owners_and_accounts(
        self, connection: Connection, shapes: Shapes, hold_ids: Collection[str], user_ids: Collection[str]
    ) -> tuple[dict[str, tuple[str, int]], set[str] | None]:
        """Both in one statement when both are wanted."""
        if not hold_ids or not user_ids:
            return super().owners_and_accounts(connection, shapes, hold_ids, user_ids)
        rows = _run(
            connection,
            _owners_and_accounts_sql(shapes.holds.name, shapes.accounts.name),
            {
                "holds": text_array(sorted(set(hold_ids))),
                "users": text_array(sorted(set(user_ids))),
            },
        )
        return {row[0]: (row[1], row[2]) for row in rows if row[0] is not None}, {
            row[1] for row in rows if row[0] is None
        }

    def lock_with_owners(
        self, connection: Connection, shapes: Shapes, user_ids: Collection[str], hold_ids: Collection[str]
    ) -> tuple[dict[str, tuple[str, int]], list[tuple[Any, ...]]]:
        """One round trip: the holds' owners are read in the statement that locks the
        accounts (a hold's owner never changes, so reading it there is reading it before)."""
        rows = _run(
            connection,
            _lock_with_owners_sql(shapes),
            {
                "users": text_array(sorted(set(user_ids))),
                "holds": text_array(sorted(set(hold_ids))),
            },
        )
        columns = shapes.account_columns
        width = len(columns)
        owners = {row[width]: (row[width + 1], row[width + 2]) for row in rows if row[width] is not None}
        return owners, [_aware(row[:width], shapes.accounts, columns) for row in rows if row[width] is None]

    def lock_and_read(
        self,
        connection: Connection,
        shapes: Shapes,
        user_ids: Collection[str],
        deducted: Mapping[str, int],
        charges: Sequence[tuple[str, int | None]],
        along: ReadAlong,
    ) -> LockedRead:
        """Two statements in one round trip: the lock, then one read of everything else.

        Under READ COMMITTED each statement of a multi-statement text takes its own
        snapshot, so the read, which starts once the lock is granted, sees what the previous
        lock holder committed (one statement joining the locked rows would not: it keeps the
        snapshot it started with for the rows it did not lock). How far each account's draws
        may reach is computed in the read from the holds it reads there."""
        deducting = sorted(deducted)
        rows = _run(
            connection,
            _lock_and_read_sql(shapes, bool(along.hold_ids), bool(deducted)),
            {
                "users": text_array(sorted(set(user_ids))),
                "holds": text_array(sorted(set(along.hold_ids))),
                "deducting": text_array(deducting),
                "deducted": "{" + ",".join(str(deducted[user]) for user in deducting) + "}",
                "charged": text_array([hold_id for hold_id, _amount in charges]),
                "charges": _integer_array([amount for _hold_id, amount in charges]),
                "keys": text_array(sorted(set(along.operation_keys))),
                "entry_ids": along.entry_ids,
                "lot_ids": along.lot_ids,
                "at": _timestamp(along.at),
                "stale_at": _timestamp(along.at) if along.stale_holds else None,
            },
        )
        lots, *extra, accounts = rows[0][0]
        return LockedRead(_from_json_rows(accounts, shapes.accounts, shapes.account_columns),
                          _from_json_rows(lots, shapes.lots, shapes.lot_columns),
                          _folded(extra, shapes, stale=along.stale_holds))


def _folded(extra: Sequence[Any], shapes: Shapes, *, stale: bool) -> Folded:
    """What `Folded` holds, as the lots' queries read it after the lots (`_read_along`)."""
    operations, entry_ids, lot_ids, stale_holds, holds = extra
    return Folded(
        [tuple(operation) for operation in operations or ()],
        sorted(entry_ids or ()),
        sorted(lot_ids or ()),
        _from_json_rows(stale_holds, shapes.holds, shapes.hold_columns) if stale else None,
        _from_json_rows(holds, shapes.holds, shapes.hold_columns),
    )


class ArrayScript:
    """The writer's statements, sent together in one round trip when `finish` runs (which
    returns the new ids of its own INSERT)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.sql: list[str] = []
        self.params: dict[str, str] = {}

    def _add(self, sql: str, params: dict[str, str]) -> None:
        self.sql.append(sql)
        self.params.update(params)

    def insert(self, table: Table, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            prefix = f"s{len(self.sql)}_"
            self._add(_insert(table, tuple(rows[0]), prefix, False, len(rows) == 1), _params(table, rows, prefix))

    def update(self, table: Table, key: str | tuple[str, ...], rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            prefix = f"s{len(self.sql)}_"
            keys = key_columns(key)
            self._add(
                _update(table, keys, _set_columns(tuple(rows[0]), keys), prefix, len(rows) == 1),
                _params(table, rows, prefix),
            )

    def delete(self, table: Table, key: str, values: Collection[Any]) -> None:
        if values:
            prefix = f"s{len(self.sql)}_"
            self._add(
                f"DELETE FROM {table.name} WHERE {key}"
                f" = ANY(CAST(%({prefix}{key})s AS {_pg_type(table, key)}[]))",
                _arrays(table, [{key: value} for value in sorted(values)], prefix),
            )

    def finish(
        self,
        table: Table,
        rows: Sequence[dict[str, Any]],
        *,
        referencing: Table | None = None,
        referencing_rows: Sequence[dict[str, Any]] = (),
        reference: str = "",
        reference_key: str = "",
        positions: Sequence[int | None] = (),
    ) -> list[int]:
        """All of it is one round trip: the pending statements, then one statement whose
        data-modifying CTEs insert both tables (the referencing rows join the new ids)."""
        ids: list[int] = []
        if rows or referencing_rows:
            sql, params = _insert_with_references(
                table,
                rows,
                referencing,
                referencing_rows,
                reference,
                reference_key,
                positions,
                f"s{len(self.sql)}_",
            )
            self._add(sql, params)
        if self.sql:
            result = _run(self.connection, ";\n".join(self.sql), self.params)
            if rows:
                ids = sorted(row[0] for row in result)
        self.sql, self.params = [], {}
        return ids


def _run(connection: Connection, statement: str, parameters: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Run one statement (or several, `;`-separated) on the driver's cursor of `connection`;
    the rows of the last one (none for a statement that returns none).

    The statements here are fixed text whose results need no type processing, and
    SQLAlchemy's per-statement machinery (execution context, result metadata, row
    processors) was a quarter of the engine's CPU per metered request (profiled with
    bench/engine_cost.py): the cursor is used directly. What a user of the engine can see
    of SQLAlchemy stays: outside the transaction module's transactions the connection's
    transaction begins as it would, the engine's
    `before_cursor_execute`/`after_cursor_execute` listeners run, and a driver error is
    raised as SQLAlchemy's wrapped exception, invalidating the connection on a disconnect.
    Statements with parameters run prepared (`prepared`): the listeners see the
    PREPARE/EXECUTE text that is sent. The transaction module's BEGIN and COMMIT are folded
    in here directly (`folded_statement`): through SQLAlchemy's dispatch, that alone was 3%
    of a metered request's instructions.
    """
    if not runs_folded(connection) and not connection.in_transaction():
        connection.begin()  # as SQLAlchemy's autobegin would
    script = _script_cursor(connection)
    try:
        statement, preparing = prepared.script(connection, statement)
        statement, parameters = script.bind(statement, parameters)
        statement = folded_statement(connection, statement)
        events = connection._has_events or connection.engine._has_events
        if events:  # a listener's own exception goes out as it is, as SQLAlchemy lets it
            for listener in connection.dispatch.before_cursor_execute:
                statement, parameters = listener(connection, script.cursor, statement, parameters, None, False)
        try:
            rows = script.run(statement, parameters)
        except BaseException as error:
            prepared.failed(connection, preparing, error)
            connection._handle_dbapi_exception(error, statement, parameters, script.cursor, None)
            raise  # not reached: the call above raises
        prepared.succeeded(connection, preparing)
        if events:
            connection.dispatch.after_cursor_execute(connection, script.cursor, statement, parameters, None, False)
        return rows
    finally:
        script.close()


class _Psycopg2Script:
    """psycopg2 binds on the client and answers a multi-statement text with its last result."""

    def __init__(self, dbapi_connection: Any, *, hide_parameters: bool) -> None:
        self.cursor = dbapi_connection.cursor()
        # An engine made with `hide_parameters=True` keeps values out of its error messages;
        # written into the statement, they would be in them.
        self.inlines = not hide_parameters and literals.utf8_connection(dbapi_connection)

    def bind(self, statement: str, parameters: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
        """The parameters written into the text (`literals`) where they can be, else as they are."""
        text = literals.inlined(statement, parameters) if self.inlines else None
        return (statement, parameters) if text is None else (text, None)

    def run(self, statement: str, parameters: dict[str, Any] | None) -> list[tuple[Any, ...]]:
        self.cursor.execute(statement, parameters)
        return self.cursor.fetchall() if self.cursor.description is not None else []

    def close(self) -> None:
        self.cursor.close()


class _Psycopg3Script:
    """psycopg 3 binds on the server by default, which takes one statement per round trip; a
    `ClientCursor` binds on the client as psycopg2 does, so a script stays one round trip. Its
    results come first to last: `nextset` walks to the last."""

    def __init__(self, driver_connection: Any) -> None:
        import psycopg

        self.cursor = psycopg.ClientCursor(driver_connection)

    def bind(self, statement: str, parameters: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
        return statement, parameters  # the driver quotes them

    def run(self, statement: str, parameters: dict[str, Any] | None) -> list[tuple[Any, ...]]:
        cursor = self.cursor
        cursor.execute(statement, parameters)
        while cursor.nextset():
            pass
        return cursor.fetchall() if cursor.description is not None else []

    def close(self) -> None:
        self.cursor.close()


def _script_cursor(connection: Connection) -> _Psycopg2Script | _Psycopg3Script:
    pooled = connection.connection
    if connection.dialect.driver == "psycopg":
        return _Psycopg3Script(pooled.driver_connection)
    return _Psycopg2Script(pooled.dbapi_connection, hide_parameters=connection.engine.hide_parameters)


DRAW_ORDER = (
    "l.priority, l.expires_at IS NULL, l.expires_at, l.source NOT IN ("
    + ", ".join(f"'{source}'" for source in sorted(PROMOTIONAL_SOURCES)) + "), l.id"
)
"""The draw-down order of `rules.draw_order`, in SQL: the window below sends the prefix of
lots a draw can reach, so both must sort alike (tests/engine/test_draw_order.py holds them
equal on PostgreSQL; the rules sort in Python what this path sent and what a unit of work
grants)."""


def _json_row(alias: str, table: Table, columns: tuple[str, ...]) -> str:
    """A row of `alias` as one JSON array of `columns`, decimals as text (read back by
    `_from_json_rows`)."""
    return "json_build_array(" + ", ".join(
        f"{alias}.{name}::text" if isinstance(table.c[name].type, Numeric) else f"{alias}.{name}"
        for name in columns) + ")"


def _operations_and_new_ids(lots: str) -> str:
    """Three of the lots' queries' values: the operation rows of `keys`, and `entry_ids` and
    `lot_ids` new ids from the ledger's and the lots' sequences."""
    return (
        "(SELECT json_agg(json_build_array(o.idempotency_key, o.kind, o.fingerprint, o.result))"
        " FROM operations o WHERE o.idempotency_key = ANY(CAST(%(keys)s AS text[]))),"
        " (SELECT array_agg(nextval('ledger_entries_id_seq')) FROM generate_series(1, %(entry_ids)s)),"
        f" (SELECT array_agg(nextval('{lots}_id_seq')) FROM generate_series(1, %(lot_ids)s))"
    )


@cache
def _drawable_lots_sql(shapes: Shapes) -> str:
    """One JSON array: the lots of the default credit type whose credits before them in
    draw-down order do not cover what the account may draw (and those past their expiry at
    `at`: rollover looks for them when a hold ends), the operation rows stored for the given
    keys, the new entry ids, the new lot ids, the given accounts' active holds past their TTL
    and the holds named by id.

    One value, not rows of columns: psycopg2 describes every column of a result and casts
    every value (a row of 23 columns beside the lots cost about 30 us of client CPU more
    than one JSON value, which `json.loads` reads in C)."""
    lots, holds, hold_columns = shapes.lots.name, shapes.holds.name, shapes.hold_columns
    hold_array = _json_row("r", shapes.holds, hold_columns)
    return (
        f"SELECT json_build_array((SELECT json_agg({_json_row('x', shapes.lots, shapes.lot_columns)})"
        " FROM (SELECT l.*, n.needed,"
        f" sum(l.remaining) OVER (PARTITION BY l.user_id ORDER BY {DRAW_ORDER}) - l.remaining"
        f" AS before FROM {lots} l"
        " JOIN unnest(CAST(%(users)s AS text[]), CAST(%(needed)s AS bigint[]))"
        " AS n(user_id, needed) ON l.user_id = n.user_id"
        f" WHERE l.remaining > 0 AND l.credit_type = '{DEFAULT_CREDIT_TYPE}') x"
        " WHERE x.before < x.needed OR x.expires_at <= CAST(%(at)s AS timestamp)),"
        f" {_operations_and_new_ids(lots)},"
        f" (SELECT json_agg({hold_array}) FROM {holds} r"
        " WHERE r.user_id = ANY(CAST(%(stale_users)s AS text[])) AND r.status = 'active'"
        " AND r.expires_at <= CAST(%(stale_at)s AS timestamp)),"
        f" (SELECT json_agg({hold_array}) FROM {holds} r"
        " WHERE r.id = ANY(CAST(%(hold_ids)s AS text[]))))"
    )


@cache
def _lock_and_read_sql(shapes: Shapes, naming_holds: bool, deducting: bool) -> str:
    """`lock_and_read`'s text: the lock (the accounts of the users and of the named holds'
    owners, in user order), then one statement answering one JSON array, as
    `_drawable_lots_sql` does: the lots of the default credit type in draw-down order whose
    credits before them do not cover what the account may draw (and those past their
    expiry, which rollover looks for when a hold ends), the operation rows of the keys, the
    new entry ids, the new lot ids, the locked accounts' active holds past their TTL, the
    named holds and the locked accounts (in user order).

    Planning is most of what the server spends on it, so it is kept to few joins, and
    without holds named (a reserve, a deduct) the holds' part is left out: what each account
    may draw is then sent as it is (as are the deducts' part when there are none)."""
    accounts, account_columns, holds, hold_columns = (shapes.accounts, shapes.account_columns, shapes.holds,
                                                      shapes.hold_columns)
    lots, lot_columns = shapes.lots.name, shapes.lot_columns
    users = "CAST(%(users)s AS text[])"
    if naming_holds:
        users += " || ARRAY(SELECT user_id FROM " + holds.name + " WHERE id = ANY(CAST(%(holds)s AS text[])))"
        needed = (
            f" WITH h AS (SELECT {', '.join(hold_columns)} FROM {holds.name}"
            " WHERE id = ANY(CAST(%(holds)s AS text[]))),"
            " n AS (SELECT user_id, sum(amount) AS needed FROM ("
            "SELECT h.user_id, COALESCE(c.amount, h.amount) AS amount"
            " FROM unnest(CAST(%(charged)s AS text[]), CAST(%(charges)s AS bigint[])) AS c(id, amount)"
            " JOIN h ON h.id = c.id"
            + (" UNION ALL SELECT * FROM unnest(CAST(%(deducting)s AS text[]),"
               " CAST(%(deducted)s AS bigint[]))" if deducting else "")
            + ") s GROUP BY user_id)"
        )
        locked = "CAST(%(users)s AS text[]) || ARRAY(SELECT user_id FROM h)"
        named = f"(SELECT json_agg({_json_row('r', holds, hold_columns)}) FROM h r)"
    else:
        needed = (
            " WITH n AS (SELECT * FROM unnest(CAST(%(deducting)s AS text[]), CAST(%(deducted)s AS bigint[]))"
            " AS d(user_id, needed))"
        )
        locked = users
        named = "NULL::json"
    hold_array = _json_row("r", holds, hold_columns)
    account_array = _json_row("a", accounts, account_columns)
    return (
        f"{KEYED_PLANS}; SELECT 1 FROM {accounts.name} WHERE user_id = ANY({users})"
        " ORDER BY user_id FOR UPDATE;"
        f"{needed}"
        f" SELECT json_build_array((SELECT json_agg({_json_row('x', shapes.lots, lot_columns)})"
        " FROM (SELECT l.*, n.needed,"
        f" sum(l.remaining) OVER (PARTITION BY l.user_id ORDER BY {DRAW_ORDER}) - l.remaining"
        f" AS before FROM {lots} l JOIN n ON l.user_id = n.user_id"
        f" WHERE l.remaining > 0 AND l.credit_type = '{DEFAULT_CREDIT_TYPE}') x"
        " WHERE x.before < x.needed OR x.expires_at <= CAST(%(at)s AS timestamp)),"
        f" {_operations_and_new_ids(lots)},"
        f" (SELECT json_agg({hold_array} ORDER BY r.id) FROM {holds.name} r"
        f" WHERE r.user_id = ANY({locked})"
        " AND r.status = 'active' AND r.expires_at <= CAST(%(stale_at)s AS timestamp)),"
        f" {named},"
        f" (SELECT json_agg({account_array} ORDER BY a.user_id) FROM {accounts.name} a"
        f" WHERE a.user_id = ANY({locked})))"
    )


@cache
def _lock_with_owners_sql(shapes: Shapes) -> str:
    """The accounts locked in user order (a CTE with FOR UPDATE), then one row per hold
    with its id, user and amount after the account columns (NULL there)."""
    accounts, columns, holds = shapes.accounts, shapes.account_columns, shapes.holds.name
    listed = ", ".join(columns)
    return (
        f"{KEYED_PLANS}; WITH o AS (SELECT id, user_id, amount FROM {holds}"
        " WHERE id = ANY(CAST(%(holds)s AS text[]))),"
        f" a AS (SELECT {listed} FROM {accounts.name} WHERE user_id = ANY("
        "CAST(%(users)s AS text[]) || ARRAY(SELECT user_id FROM o))"
        " ORDER BY user_id FOR UPDATE)"
        f" SELECT {listed}, NULL::text, NULL::text, NULL::bigint FROM a"
        f" UNION ALL SELECT {', '.join('NULL' for _ in columns)}, id, user_id, amount FROM o"
    )


@cache
def _owners_and_accounts_sql(holds: str, accounts: str) -> str:
    return (
        f"SELECT id, user_id, amount FROM {holds} WHERE id = ANY(CAST(%(holds)s AS text[]))"
        f" UNION ALL SELECT NULL, user_id, NULL FROM {accounts}"
        " WHERE user_id = ANY(CAST(%(users)s AS text[]))"
    )


def _aware(row: Sequence[Any], table: Table, columns: tuple[str, ...]) -> tuple[Any, ...]:
    """A row with its timestamp columns made aware UTC (the columns are stored naive UTC)."""
    values = list(row)
    for index in _stamp_positions(table, columns):
        values[index] = _utc(values[index])
    return tuple(values)


@cache
def _stamp_positions(table: Table, columns: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(index for index, name in enumerate(columns)
                 if isinstance(table.c[name].type, UtcDateTime))


def _from_json_rows(rows: list[list[Any]] | None, table: Table, columns: tuple[str, ...]) -> list[tuple[Any, ...]]:
    """Rows read as JSON arrays (`_json_row`): timestamps come as naive UTC ISO text, decimals
    as text."""
    stamps, decimals = _stamp_positions(table, columns), _decimal_positions(table, columns)
    for values in rows or ():
        for index in stamps:
            if values[index] is not None:
                values[index] = datetime.fromisoformat(values[index] + "+00:00")  # UTC itself
        for index in decimals:
            if values[index] is not None:
                values[index] = Decimal(values[index])
    return [tuple(values) for values in rows or ()]


@cache
def _decimal_positions(table: Table, columns: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(index for index, name in enumerate(columns) if isinstance(table.c[name].type, Numeric))


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.replace(tzinfo=UTC)


def _params(table: Table, rows: Sequence[dict[str, Any]], prefix: str) -> dict[str, str]:
    """A statement's rows as its parameters: one row as one JSON object (`_row`), more as
    one array literal per column (`_arrays`). `_insert` and `_update` read either."""
    if len(rows) == 1:
        return {prefix + "row": _row(rows[0])}
    return _arrays(table, rows, prefix)


def _row(row: dict[str, Any]) -> str:
    """One row as a JSON object, read on the server by `json_populate_record` into the
    table's row type: timestamps as naive UTC text, decimals as text.

    Most writes are of one row (a metered request writes a hold, an entry, an operation and
    an account), and binding one literal per column was a tenth of its CPU in the engine
    (38 parameters for a reserve, each adapted and escaped by the driver); one JSON encoding
    in C is a few microseconds (docs/benchmarks.md)."""
    return _json(row)


def _json_value(value: Any) -> Any:
    """What `json.dumps` cannot write itself: a timestamp (naive UTC text), a decimal (text,
    which NUMERIC reads back exactly)."""
    if isinstance(value, datetime):
        return _timestamp(value)
    return str(value)


_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_NON_STR_KEYS
"""Timestamps go to `_json_value` (naive UTC text, not orjson's own `+00:00` form); keys
that are not text are written as text, as `json.dumps` writes them."""

_json_beyond_orjson = json_encoder(default=_json_value)
"""What orjson refuses and `json.dumps` writes: integers beyond 64 bits, text with lone
surrogates, nesting deeper than 254 levels. Compact too, but with text beyond ASCII escaped
(`\\u00fc`), as a lone surrogate must be to reach the server; such a value reads back the same."""


def _json(value: Any) -> str:
    """JSON text of a row (`_row`) or of a JSON column's value (`_json_array`), one encoder
    for both, so that the columns (type `json`, which keeps a value's text as sent) hold the
    same text whether the row went alone or in a batch: compact, UTF-8 as it is.

    orjson writes a metered request's nine rows in a fifth of the time of the standard
    library's C encoder (0.7 against 3.5 microseconds for a ledger entry, docs/benchmarks.md);
    what it refuses goes to the standard library's."""
    try:
        return orjson.dumps(value, default=_json_value, option=_ORJSON_OPTIONS).decode()
    except orjson.JSONEncodeError:
        return _json_beyond_orjson(value)


def _arrays(table: Table, rows: Sequence[dict[str, Any]], prefix: str) -> dict[str, str]:
    """One PostgreSQL array literal per column (`{1,2}`, `{"a","b"}`), with the values each
    column type would have sent: naive UTC timestamps, JSON as text.

    A literal is one string that the server's array parser reads in C; a Python list would
    go out as `ARRAY[...]` with one SQL constant per value, which the server must parse
    and analyse one by one (measured: most of a 1,000-row INSERT's time). For thousands of
    rows the server reads these faster than the same rows as JSON (measured with
    `bench/run.py --only batch batch1000`: a fifth fewer deducts per second as JSON).
    """
    names = tuple(rows[0])
    return {
        prefix + name: convert([row[name] for row in rows])
        for name, convert in zip(names, _converters(table, names))
    }


@cache
def _converters(table: Table, names: tuple[str, ...]) -> tuple[Any, ...]:
    """For each column, the function from its values to its array literal: chosen once per
    table and columns."""
    chosen: list[Any] = []
    for name in names:
        column_type = table.c[name].type
        if isinstance(column_type, Boolean):
            chosen.append(_boolean_array)
        elif isinstance(column_type, Integer):
            chosen.append(_integer_array)
        elif isinstance(column_type, UtcDateTime):
            chosen.append(_timestamp_array)
        elif isinstance(column_type, JSON):
            chosen.append(_json_array)
        else:
            chosen.append(_text_values_array)
    return tuple(chosen)


def _integer_array(values: list[Any]) -> str:
    return "{" + ",".join("NULL" if value is None else str(int(value)) for value in values) + "}"


def _boolean_array(values: list[Any]) -> str:
    return "{" + ",".join("NULL" if value is None else "tf"[not value] for value in values) + "}"


def _timestamp_array(values: list[Any]) -> str:
    return text_array([_timestamp(value) for value in values])


def _json_array(values: list[Any]) -> str:
    return text_array([None if value is None else _json(value) for value in values])


def _text_values_array(values: list[Any]) -> str:
    return text_array([None if value is None else str(value) for value in values])


def _timestamp(value: datetime | None) -> str | None:
    """Naive UTC text."""
    if value is None:
        return None
    if value.tzinfo is UTC:  # the engine's own times
        return utc_text(value)
    return value.astimezone(UTC).replace(tzinfo=None).isoformat()


def text_array(values: list[str | None]) -> str:
    """Text elements double-quoted, escaped one by one only when some value needs it."""
    if not values:
        return "{}"
    if None not in values:
        joined = "\x1f".join(values)  # type: ignore[arg-type]
        if joined.count("\x1f") == len(values) - 1 and '"' not in joined and "\\" not in joined:
            return '{"' + joined.replace("\x1f", '","') + '"}'
    return "{" + ",".join("NULL" if value is None else _quoted(value) for value in values) + "}"


def _quoted(value: str) -> str:
    """An element of an array literal: double-quoted, with backslashes and quotes escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@cache
def _set_columns(names: tuple[str, ...], keys: tuple[str, ...]) -> tuple[str, ...]:
    """The columns an UPDATE sets: the rows' columns but the key."""
    return tuple(name for name in names if name not in keys)


def _unnest(table: Table, names: tuple[str, ...], prefix: str) -> str:
    return ", ".join(f"CAST(%({prefix}{name})s AS {_pg_type(table, name)}[])" for name in names)


@cache
def _insert(table: Table, names: tuple[str, ...], prefix: str, returning_id: bool, single: bool) -> str:
    return (
        f"INSERT INTO {table.name} ({', '.join(names)}) SELECT {_values(table, names, single)}"
        f" FROM {_source(table, names, prefix, single)}"
        + ("" if single else " ORDER BY v.position") + (" RETURNING id" if returning_id else "")
    )


@cache
def _update(table: Table, keys: tuple[str, ...], columns: tuple[str, ...], prefix: str, single: bool) -> str:
    assignments = ", ".join(f"{name} = v.{name}" for name in columns)
    return (
        f"UPDATE {table.name} SET {assignments} FROM {_source(table, (*keys, *columns), prefix, single)}"
        f" WHERE " + " AND ".join(f"{table.name}.{key} = v.{key}" for key in keys)
    )


def _source(table: Table, names: tuple[str, ...], prefix: str, single: bool) -> str:
    """The rows of `_params` as a relation `v` with the columns `names`."""
    if single:
        return f"json_populate_record(NULL::{table.name}, CAST(%({prefix}row)s AS json)) AS v"
    return f"unnest({_unnest(table, names, prefix)}) WITH ORDINALITY AS v({', '.join(names)}, position)"


def _values(table: Table, names: tuple[str, ...], single: bool) -> str:
    """The columns of `v` as the table takes them (JSON travels as text in an array)."""
    return ", ".join(
        f"v.{name}::json" if not single and isinstance(table.c[name].type, JSON) else f"v.{name}" for name in names
    )


def _insert_with_references(
    table: Table,
    rows: Sequence[dict[str, Any]],
    referencing: Table | None,
    referencing_rows: Sequence[dict[str, Any]],
    reference: str,
    reference_key: str,
    positions: Sequence[int | None],
    prefix: str,
) -> tuple[str, dict[str, str]]:
    """One statement: insert `rows` returning their ids (in order), and the referencing rows,
    each referencing one of the new ids by position (1-based in SQL: `row_number()` over
    the new ids, which the sequence gave out in the rows' order)."""
    if referencing is None or not referencing_rows:
        return _insert(table, tuple(rows[0]), prefix, True, len(rows) == 1), _params(table, rows, prefix)
    if not rows:
        return (
            _insert(referencing, tuple(referencing_rows[0]), prefix, False, len(referencing_rows) == 1),
            _params(referencing, referencing_rows, prefix),
        )
    names = tuple(rows[0])
    referencing_names = tuple(referencing_rows[0])
    params = _arrays(table, rows, prefix + "e_")
    params.update(_arrays(referencing, referencing_rows, prefix + "r_"))
    params[prefix + "r_position"] = (
        "{"
        + ",".join("NULL" if position is None else str(position + 1) for position in positions)
        + "}"
    )
    return _insert_referencing_sql(
        table, names, referencing, referencing_names, reference, reference_key, prefix
    ), params


@cache
def _insert_referencing_sql(
    table: Table,
    names: tuple[str, ...],
    referencing: Table,
    referencing_names: tuple[str, ...],
    reference: str,
    reference_key: str,
    prefix: str,
) -> str:
    values = ", ".join(
        f"COALESCE(v.{name}::json,"
        f" json_build_object('{reference_key}', (SELECT ids FROM n)[v.entry]))"
        if name == reference
        else f"v.{name}::json"
        if isinstance(referencing.c[name].type, JSON)
        else f"v.{name}"
        for name in referencing_names
    )
    unnest = _unnest(referencing, referencing_names, prefix + "r_")
    return (
        f"WITH e AS ({_insert(table, names, prefix + 'e_', True, False)}),"
        f" n AS (SELECT array_agg(id ORDER BY id) AS ids FROM e),"
        f" r AS (INSERT INTO {referencing.name} ({', '.join(referencing_names)}) SELECT {values}"
        f" FROM unnest({unnest}, CAST(%({prefix}r_position)s AS bigint[])) WITH ORDINALITY"
        f" AS v({', '.join(referencing_names)}, entry, position) ORDER BY v.position)"
        f" SELECT id FROM e ORDER BY id"
    )


def _pg_type(table: Table, name: str) -> str:
    column_type = table.c[name].type
    if isinstance(column_type, UtcDateTime):
        return "timestamp"
    if isinstance(column_type, Boolean):
        return "boolean"
    if isinstance(column_type, Integer):  # BigInteger is an Integer
        return "bigint"
    if isinstance(column_type, Numeric):  # sent as text, like the others
        return "numeric"
    return "text"


KEYED_PLANS = (
    "SET LOCAL enable_seqscan = off; SET LOCAL enable_hashjoin = off;"
    " SET LOCAL enable_mergejoin = off; SET LOCAL plan_cache_mode = force_generic_plan"
)
"""Sent with the lock that opens a write transaction on PostgreSQL: every later statement of
the writer reads or changes rows by key (a thousand at most), so it must probe the indexes.
The planner costs a hash join over the whole table as cheaper as soon as its statistics are
stale or the table is some hundred thousand rows; measured, the expiry of 200,000 lots then
read the whole lot table for every chunk of 1,000 (45 ms where the probes take 7).
Their prepared statements (`prepared`) keep one generic plan, made once per connection:
re-planning each run was most of the server's CPU per metered request."""


@cache
def _select(
    table: Table, columns: tuple[str, ...], key: str, where: str, order_by: str, for_update: bool
) -> str:
    return (
        (KEYED_PLANS + "; " if for_update else "")
        + f"SELECT {', '.join(columns)} FROM {table.name}"
        f" WHERE {key} = ANY(CAST(%({key})s AS {_pg_type(table, key)}[]))"
        + (f" AND {where}" if where else "")
        + (f" ORDER BY {order_by}" if order_by else "")
        + (" FOR UPDATE" if for_update else "")
    )
