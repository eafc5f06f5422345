"""Many rows in one statement: the set-based inserts and updates of the writer, per dialect.

PostgreSQL gets every table's rows in one statement over `unnest` of one array per column
(`INSERT ... SELECT FROM unnest(...)`, `UPDATE ... FROM unnest(...)`): the statement's text
never changes, so it is compiled once, and a thousand rows travel as a handful of array
parameters instead of thousands of bound values (measured: see the engine's notes in the
README). MariaDB inserts through SQLAlchemy Core's "insertmanyvalues" (one multi-row
INSERT ... RETURNING, sorted by parameter order where ids are needed); SQLite inserts with
one executemany and reads the consecutive new ids. Elsewhere updates run one UPDATE with
the driver's executemany (in process on SQLite; a round trip per row on MariaDB, which has
no multi-row UPDATE form that SQLAlchemy Core writes).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from datetime import datetime, timezone
from functools import cache, lru_cache
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Integer,
    Table,
    bindparam,
    delete,
    insert,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql import ColumnElement, Select

from creditworker.storage.tables import UtcDateTime


def pg_arrays(connection: Connection) -> bool:
    """PostgreSQL through psycopg2: the fast path of this module, raw SQL with array literals
    and several statements in one round trip. Other PostgreSQL drivers (asyncpg, under
    `AsyncCreditService`) prepare each statement and take no multi-statement text, so they get
    the generic SQLAlchemy Core path, like MariaDB."""
    return connection.dialect.name == "postgresql" and connection.dialect.driver == "psycopg2"


class Script:
    """The writer's statements, in order. On PostgreSQL they are sent together, in one round
    trip, when `finish` runs (the statements of a batch do not depend on each other's
    results; `finish` returns the new ids of its own INSERT). Elsewhere each statement runs
    when it is added, as SQLAlchemy Core statements."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.pg = pg_arrays(connection)
        self.sql: list[str] = []
        self.params: dict[str, str] = {}

    def _add(self, sql: str, params: dict[str, str]) -> None:
        self.sql.append(sql)
        self.params.update(params)

    def insert(self, table: Table, rows: Sequence[dict[str, Any]]) -> None:
        """Insert `rows` (all naming the same columns)."""
        if not rows:
            return
        if self.pg:
            prefix = f"s{len(self.sql)}_"
            self._add(_pg_insert(table, tuple(rows[0]), prefix, False), _arrays(table, rows, prefix))
        else:
            self.connection.execute(insert(table), list(rows))

    def update(self, table: Table, key: str, rows: Sequence[dict[str, Any]]) -> None:
        """Set the columns named in `rows` (all rows name the same ones) on the row whose `key`
        column matches."""
        if not rows:
            return
        if self.pg:
            prefix = f"s{len(self.sql)}_"
            self._add(_pg_update(table, key, tuple(name for name in rows[0] if name != key), prefix),
                      _arrays(table, rows, prefix))
        else:
            update_rows(self.connection, table, key, rows)

    def delete(self, table: Table, key: str, values: Collection[Any]) -> None:
        """Delete the rows whose `key` column is one of `values`."""
        if not values:
            return
        if self.pg:
            prefix = f"s{len(self.sql)}_"
            self._add(f"DELETE FROM {table.name} WHERE {key} = ANY(CAST(%({prefix}{key})s AS {_pg_type(table, key)}[]))",
                      _arrays(table, [{key: value} for value in sorted(values)], prefix))
        else:
            self.connection.execute(delete(table).where(table.c[key].in_(sorted(values))))

    def finish(self, table: Table, rows: Sequence[dict[str, Any]], *, referencing: Table | None = None,
               referencing_rows: Sequence[dict[str, Any]] = (), reference: str = "", reference_key: str = "",
               positions: Sequence[int | None] = ()) -> list[int]:
        """Run what is pending, then insert `rows` into `table` and return their new ids in
        order; then insert `referencing_rows` into `referencing`, where the row at `i` whose
        `positions[i]` is not None gets `{reference_key: the id of rows[positions[i]]}` as its
        `reference` column (its own value there is ignored).

        On PostgreSQL all of it is one round trip: the pending statements, then one statement
        whose data-modifying CTEs insert both tables (the referencing rows join the new ids).
        """
        if self.pg:
            ids: list[int] = []
            if rows or referencing_rows:
                sql, params = _pg_insert_with_references(
                    table, rows, referencing, referencing_rows, reference, reference_key, positions,
                    f"s{len(self.sql)}_")
                self._add(sql, params)
            if self.sql:
                result = self.connection.exec_driver_sql(";\n".join(self.sql), self.params)
                if rows:
                    ids = sorted(row[0] for row in result)
            self.sql, self.params = [], {}
            return ids
        ids = insert_returning_ids(self.connection, table, rows)
        if referencing is not None and referencing_rows:
            self.insert(referencing, [
                row if position is None else {**row, reference: {reference_key: ids[position]}}
                for row, position in zip(referencing_rows, positions)
            ])
        return ids


def insert_rows(connection: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert `rows` (all naming the same columns)."""
    if not rows:
        return
    if pg_arrays(connection):
        connection.exec_driver_sql(_pg_insert(table, tuple(rows[0]), "", False), _arrays(table, rows, ""))
        return
    connection.execute(insert(table), list(rows))


def insert_returning_ids(connection: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> list[int]:
    """Insert `rows` and return their new ids, in the order of `rows`."""
    if not rows:
        return []
    if pg_arrays(connection):
        # The sequence numbers the rows in the order the SELECT produces them (ORDER BY
        # the array position): sorted, the returned ids are the ids of `rows` in order.
        result = connection.exec_driver_sql(_pg_insert(table, tuple(rows[0]), "", True), _arrays(table, rows, ""))
        return sorted(row[0] for row in result)
    if connection.dialect.name == "sqlite":
        # SQLAlchemy would insert one row per statement to keep RETURNING in order. The
        # transaction holds SQLite's write lock (BEGIN IMMEDIATE), so one executemany's new
        # rowids are consecutive, ending at the last one.
        connection.execute(insert(table), list(rows))
        last = int(connection.exec_driver_sql("SELECT last_insert_rowid()").scalar_one())
        return list(range(last - len(rows) + 1, last + 1))
    statement = insert(table).returning(table.c.id, sort_by_parameter_order=True)
    return [row[0] for row in connection.execute(statement, list(rows))]


def insert_absent(connection: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Insert the rows whose primary key is not taken yet; returns the primary keys of those
    this call inserted. Safe under concurrency: of two callers racing for a key, exactly one
    gets it back, and the other does not fail."""
    if not rows:
        return []
    key = [column for column in table.primary_key.columns]
    if connection.dialect.name in ("postgresql", "sqlite"):
        statement = (postgresql.insert(table) if connection.dialect.name == "postgresql" else sqlite.insert(table))
        claimed = connection.execute(statement.on_conflict_do_nothing().returning(*key), list(rows))
        return [tuple(row) for row in claimed]
    inserted = []  # MariaDB/MySQL: INSERT IGNORE reports a row count but no keys, so one by one
    for row in rows:
        if connection.execute(mysql.insert(table).values(row).prefix_with("IGNORE")).rowcount == 1:
            inserted.append(tuple(row[column.name] for column in key))
    return inserted


def update_rows(connection: Connection, table: Table, key: str, rows: Sequence[dict[str, Any]]) -> None:
    """Set the columns named in `rows` (all rows name the same ones) on the row whose `key`
    column matches; one statement per call."""
    if not rows:
        return
    columns = tuple(name for name in rows[0] if name != key)
    if pg_arrays(connection):
        connection.exec_driver_sql(_pg_update(table, key, columns, ""), _arrays(table, rows, ""))
        return
    connection.execute(_core_update(table, key, columns),
                       [{f"_{name}": value for name, value in row.items()} for row in rows])


@cache
def _core_update(table: Table, key: str, columns: tuple[str, ...]) -> Any:
    """Built once: building a Core statement costs more than running a cached one."""
    return update(table).where(table.c[key] == bindparam(f"_{key}")).values(
        {name: bindparam(f"_{name}") for name in columns}
    )


def _arrays(table: Table, rows: Sequence[dict[str, Any]], prefix: str) -> dict[str, str]:
    """One PostgreSQL array literal per column (`{1,2}`, `{"a","b"}`), with the values each
    column type would have sent: naive UTC timestamps, JSON as text.

    A literal is one string that the server's array parser reads in C; a Python list would
    go out as `ARRAY[...]` with one SQL constant per value, which the server must parse
    and analyse one by one (measured: most of a 1,000-row INSERT's time). The converter of
    each column is chosen once per table and columns (most writes are of one row, where
    choosing it was most of the work).
    """
    names = tuple(rows[0])
    return {prefix + name: convert([row[name] for row in rows])
            for name, convert in zip(names, _converters(table, names))}


@cache
def _converters(table: Table, names: tuple[str, ...]) -> tuple[Any, ...]:
    """For each column, the function from its values to its array literal."""
    chosen = []
    for name in names:
        column_type = table.c[name].type
        if isinstance(column_type, Boolean):  # before Integer: a Boolean is no Integer, but be sure
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


def _json(value: Any) -> str:
    """JSON text; a value that is already JSON text (`Json`) goes as it is."""
    return value if isinstance(value, Json) else json.dumps(value)


class Json(str):
    """JSON text made by the caller (cheaper than a dict to dump), for a JSON column."""


@lru_cache(maxsize=256)
def _timestamp(value: datetime | None) -> str | None:
    """Naive UTC text (a batch's rows mostly share one timestamp: converted once)."""
    return None if value is None else value.astimezone(timezone.utc).replace(tzinfo=None).isoformat()


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


def _unnest(table: Table, names: tuple[str, ...], prefix: str) -> str:
    return ", ".join(f"CAST(%({prefix}{name})s AS {_pg_type(table, name)}[])" for name in names)


def _values(table: Table, names: tuple[str, ...]) -> str:
    return ", ".join(f"v.{name}::json" if isinstance(table.c[name].type, JSON) else f"v.{name}" for name in names)


@cache
def _pg_insert(table: Table, names: tuple[str, ...], prefix: str, returning_id: bool) -> str:
    return (
        f"INSERT INTO {table.name} ({', '.join(names)}) SELECT {_values(table, names)}"
        f" FROM unnest({_unnest(table, names, prefix)}) WITH ORDINALITY AS v({', '.join(names)}, position)"
        f" ORDER BY v.position" + (" RETURNING id" if returning_id else "")
    )


@cache
def _pg_update(table: Table, key: str, columns: tuple[str, ...], prefix: str) -> str:
    names = (key, *columns)
    assignments = ", ".join(f"{name} = v.{name}" for name in columns)
    return (
        f"UPDATE {table.name} SET {assignments} FROM unnest({_unnest(table, names, prefix)}) AS v({', '.join(names)})"
        f" WHERE {table.name}.{key} = v.{key}"
    )


def _pg_insert_with_references(
    table: Table, rows: Sequence[dict[str, Any]], referencing: Table | None,
    referencing_rows: Sequence[dict[str, Any]], reference: str, reference_key: str,
    positions: Sequence[int | None], prefix: str,
) -> tuple[str, dict[str, str]]:
    """One statement: insert `rows` returning their ids (in order), and the referencing rows,
    each referencing one of the new ids by position (1-based in SQL: `row_number()` over
    the new ids, which the sequence gave out in the rows' order)."""
    if referencing is None or not referencing_rows:
        return _pg_insert(table, tuple(rows[0]), prefix, True), _arrays(table, rows, prefix)
    if not rows:
        return (_pg_insert(referencing, tuple(referencing_rows[0]), prefix, False),
                _arrays(referencing, referencing_rows, prefix))
    names = tuple(rows[0])
    referencing_names = tuple(referencing_rows[0])
    params = _arrays(table, rows, prefix + "e_")
    params.update(_arrays(referencing, referencing_rows, prefix + "r_"))
    params[prefix + "r_position"] = "{" + ",".join(
        "NULL" if position is None else str(position + 1) for position in positions) + "}"
    return _pg_insert_referencing_sql(table, names, referencing, referencing_names, reference, reference_key,
                                      prefix), params


@cache
def _pg_insert_referencing_sql(table: Table, names: tuple[str, ...], referencing: Table,
                               referencing_names: tuple[str, ...], reference: str, reference_key: str,
                               prefix: str) -> str:
    values = ", ".join(
        f"COALESCE(v.{name}::json, json_build_object('{reference_key}', (SELECT ids FROM n)[v.entry]))"
        if name == reference
        else f"v.{name}::json" if isinstance(referencing.c[name].type, JSON) else f"v.{name}"
        for name in referencing_names
    )
    unnest = _unnest(referencing, referencing_names, prefix + "r_")
    return (
        f"WITH e AS ({_pg_insert(table, names, prefix + 'e_', True)}),"
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
    return "text"


def rows_where_in(
    connection: Connection, table: Table, columns: tuple[str, ...], key: str, values: Collection[Any], *,
    where: str = "", order_by: str = "", for_update: bool = False,
) -> list[tuple[Any, ...]]:
    """`columns` of the rows whose `key` is one of `values` (and that meet the SQL condition
    `where`), as tuples; timestamps are aware UTC, JSON is parsed.

    On PostgreSQL the values travel as one array literal (`key = ANY(...)`), and the
    statement text is the same whatever their number; elsewhere it is an expanding IN."""
    if not values:
        return []
    wanted = sorted(set(values))
    if pg_arrays(connection):
        rows = connection.exec_driver_sql(
            _pg_select(table, columns, key, where, order_by, for_update), _arrays(table, [{key: v} for v in wanted], "")
        ).fetchall()
        stamps = [index for index, name in enumerate(columns) if isinstance(table.c[name].type, UtcDateTime)]
        if not stamps:
            return [tuple(row) for row in rows]
        result = []
        for row in rows:
            row = list(row)
            for index in stamps:
                if row[index] is not None:
                    row[index] = row[index].replace(tzinfo=timezone.utc)
            result.append(tuple(row))
        return result
    statement = _core_select(table, columns, key, where, order_by, for_update)
    return [tuple(row) for row in connection.execute(statement, {"wanted": wanted})]


@cache
def _core_select(table: Table, columns: tuple[str, ...], key: str, where: str, order_by: str,
                 for_update: bool) -> Any:
    """Built once per shape (the values are an expanding parameter)."""
    statement = select(*(table.c[name] for name in columns)).where(
        table.c[key].in_(bindparam("wanted", expanding=True)))
    if where:
        statement = statement.where(text(where))
    if order_by:
        statement = statement.order_by(text(order_by))
    if for_update:
        statement = statement.with_for_update()
    return statement


KEYED_PLANS = "SET LOCAL enable_seqscan = off; SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off"
"""Sent with the lock that opens a write transaction on PostgreSQL: every later statement of
the writer reads or changes rows by key (a thousand at most), so it must probe the indexes.
The planner costs a hash join over the whole table as cheaper as soon as its statistics are
stale or the table is some hundred thousand rows; measured, the expiry of 200,000 lots then
read the whole lot table for every chunk of 1,000 (45 ms where the probes take 7)."""


@cache
def _pg_select(table: Table, columns: tuple[str, ...], key: str, where: str, order_by: str, for_update: bool) -> str:
    return (
        (KEYED_PLANS + "; " if for_update else "")
        + f"SELECT {', '.join(columns)} FROM {table.name}"
        f" WHERE {key} = ANY(CAST(%({key})s AS {_pg_type(table, key)}[]))"
        + (f" AND {where}" if where else "")
        + (f" ORDER BY {order_by}" if order_by else "")
        + (" FOR UPDATE" if for_update else "")
    )


def keyset_page(engine: Engine, query: Select[Any]) -> list[tuple[Any, ...]]:
    """A page of a keyset scan (`after` the last key of the previous page, in index order),
    in a short transaction of its own. On PostgreSQL it must walk its index in order: when
    the planner's statistics say that few rows match (a table just filled, not analysed
    yet) it prefers reading the whole table and sorting it, and then every page reads
    every row (measured: a sweep of 200,000 lots grew quadratically)."""
    with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
            connection.exec_driver_sql("SET LOCAL enable_bitmapscan = off")
        return [tuple(row) for row in connection.execute(query)]


def after(columns: Sequence[ColumnElement[Any]], last: Sequence[Any] | None) -> list[ColumnElement[bool]]:
    """The condition of the next keyset page: `columns` (the index's order) after `last`."""
    if last is None:
        return []
    return [tuple_(*columns) > tuple_(*(bindparam(None, value, type_=column.type)
                                        for column, value in zip(columns, last)))]
