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
from collections.abc import Sequence
from datetime import datetime, timezone
from functools import cache, lru_cache
from typing import Any

from sqlalchemy import JSON, Boolean, Integer, Table, bindparam, insert, text, update
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import TextClause

from creditworker.storage.tables import UtcDateTime


def insert_rows(connection: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert `rows` (all naming the same columns)."""
    if not rows:
        return
    if connection.dialect.name == "postgresql":
        connection.execute(_unnest_insert(table, tuple(rows[0]), False), _pg_arrays(connection, table, rows))
        return
    connection.execute(insert(table), list(rows))


def insert_returning_ids(connection: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> list[int]:
    """Insert `rows` and return their new ids, in the order of `rows`."""
    if not rows:
        return []
    if connection.dialect.name == "postgresql":
        # The sequence numbers the rows in the order the SELECT produces them (ORDER BY
        # the array position): sorted, the returned ids are the ids of `rows` in order.
        result = connection.execute(_unnest_insert(table, tuple(rows[0]), True), _pg_arrays(connection, table, rows))
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
    if connection.dialect.name == "postgresql":
        connection.execute(_unnest_update(table, key, columns), _pg_arrays(connection, table, rows))
        return
    statement = update(table).where(table.c[key] == bindparam(f"_{key}")).values(
        {name: bindparam(f"_{name}") for name in columns}
    )
    connection.execute(statement, [{f"_{name}": value for name, value in row.items()} for row in rows])


def _pg_arrays(connection: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The arrays of `rows` as the driver takes them: literals for psycopg2, lists for
    asyncpg (which prepares the statement and checks each parameter against `type[]`)."""
    if connection.dialect.driver != "asyncpg":
        return _arrays(table, rows)
    arrays: dict[str, Any] = {}
    for name in rows[0]:
        column_type = table.c[name].type
        values = [row[name] for row in rows]
        if isinstance(column_type, UtcDateTime):
            arrays[name] = [None if value is None else value.astimezone(timezone.utc).replace(tzinfo=None)
                            for value in values]
        elif isinstance(column_type, JSON):
            arrays[name] = [None if value is None else json.dumps(value) for value in values]
        elif isinstance(column_type, (Integer, Boolean)):
            arrays[name] = values
        else:
            arrays[name] = [None if value is None else str(value) for value in values]
    return arrays


def _arrays(table: Table, rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """One PostgreSQL array literal per column (`{1,2}`, `{"a","b"}`), with the values each
    column type would have sent: naive UTC timestamps, JSON as text.

    A literal is one string that the server's array parser reads in C; a Python list would
    go out as `ARRAY[...]` with one SQL constant per value, which the server must parse
    and analyse one by one (measured: most of a 1,000-row INSERT's time).
    """
    arrays: dict[str, str] = {}
    for name in rows[0]:
        column_type = table.c[name].type
        values = [row[name] for row in rows]
        if isinstance(column_type, Integer):
            arrays[name] = "{" + ",".join("NULL" if value is None else str(int(value)) for value in values) + "}"
        elif isinstance(column_type, Boolean):
            arrays[name] = "{" + ",".join("NULL" if value is None else "tf"[not value] for value in values) + "}"
        elif isinstance(column_type, UtcDateTime):
            arrays[name] = _text_array([_timestamp(value) for value in values])
        elif isinstance(column_type, JSON):
            arrays[name] = _text_array([None if value is None else json.dumps(value) for value in values])
        else:
            arrays[name] = _text_array([None if value is None else str(value) for value in values])
    return arrays


@lru_cache(maxsize=256)
def _timestamp(value: datetime | None) -> str | None:
    """Naive UTC text (a batch's rows mostly share one timestamp: converted once)."""
    return None if value is None else value.astimezone(timezone.utc).replace(tzinfo=None).isoformat()


def _text_array(values: list[str | None]) -> str:
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


def _unnest(table: Table, names: tuple[str, ...]) -> str:
    return ", ".join(f"CAST(:{name} AS {_pg_type(table, name)}[])" for name in names)


@cache
def _unnest_insert(table: Table, names: tuple[str, ...], returning_id: bool) -> TextClause:
    values = ", ".join(
        f"v.{name}::json" if isinstance(table.c[name].type, JSON) else f"v.{name}" for name in names
    )
    return text(
        f"INSERT INTO {table.name} ({', '.join(names)}) SELECT {values}"
        f" FROM unnest({_unnest(table, names)}) WITH ORDINALITY AS v({', '.join(names)}, position)"
        f" ORDER BY v.position" + (" RETURNING id" if returning_id else "")
    )


@cache
def _unnest_update(table: Table, key: str, columns: tuple[str, ...]) -> TextClause:
    names = (key, *columns)
    assignments = ", ".join(f"{name} = v.{name}" for name in columns)
    return text(
        f"UPDATE {table.name} SET {assignments} FROM unnest({_unnest(table, names)}) AS v({', '.join(names)})"
        f" WHERE {table.name}.{key} = v.{key}"
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
