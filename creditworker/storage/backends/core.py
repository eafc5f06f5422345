"""The SQLAlchemy Core path: SQLite, MariaDB/MySQL, and PostgreSQL on drivers other than psycopg2.

MariaDB inserts through SQLAlchemy Core's "insertmanyvalues" (one multi-row INSERT ...
RETURNING, sorted by parameter order where ids are needed); SQLite inserts with one
executemany and reads the consecutive new ids. Updates run one UPDATE with the driver's
executemany (in process on SQLite; a round trip per row on MariaDB, which has no multi-row
UPDATE form that SQLAlchemy Core writes). Each statement of a script runs when it is added.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from functools import cache
from typing import Any

from sqlalchemy import (
    BigInteger,
    Table,
    Text,
    bindparam,
    column,
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

from creditworker.contract.credits import DEFAULT_CREDIT_TYPE
from creditworker.storage.backends.base import (
    Folded,
    LockedRead,
    ReadAlong,
    Shapes,
    key_columns,
)

DEFAULT_TYPE_LIVE = f"remaining > 0 AND credit_type = '{DEFAULT_CREDIT_TYPE}'"
"""The live lots of an account's default credit type (what a lock loads with its row)."""


class Core:
    """The generic path (`base.Backend`), one SQLAlchemy Core statement at a time."""

    folds_reads = False

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect

    def script(self, connection: Connection) -> CoreScript:
        return CoreScript(self, connection)

    def insert_rows(
        self, connection: Connection, table: Table, rows: Sequence[dict[str, Any]]
    ) -> None:
        if rows:
            connection.execute(insert(table), rows)

    def insert_returning_ids(
        self, connection: Connection, table: Table, rows: Sequence[dict[str, Any]]
    ) -> list[int]:
        if not rows:
            return []
        if self.dialect == "sqlite":
            # SQLAlchemy would insert one row per statement to keep RETURNING in order. The
            # transaction holds SQLite's write lock (BEGIN IMMEDIATE), so one executemany's new
            # rowids are consecutive, ending at the last one.
            connection.execute(insert(table), rows)
            last = int(connection.exec_driver_sql("SELECT last_insert_rowid()").scalar_one())
            return list(range(last - len(rows) + 1, last + 1))
        statement = insert(table).returning(table.c.id, sort_by_parameter_order=True)
        return [row[0] for row in connection.execute(statement, rows)]

    def update_rows(
        self, connection: Connection, table: Table, key: str | tuple[str, ...], rows: Sequence[dict[str, Any]]
    ) -> None:
        """Set the columns named in `rows` on the row whose `key` column (or columns) match;
        one statement."""
        if not rows:
            return
        keys = key_columns(key)
        columns = tuple(name for name in rows[0] if name not in keys)
        connection.execute(
            _update_statement(table, keys, columns),
            [
                {f"_{name}": value for name, value in row.items()}
                for row in rows
            ],
        )

    def delete_rows(
        self, connection: Connection, table: Table, key: str, values: Collection[Any]
    ) -> None:
        if values:
            connection.execute(delete(table).where(table.c[key].in_(sorted(values))))

    def insert_absent(
        self, connection: Connection, table: Table, rows: Sequence[dict[str, Any]]
    ) -> list[tuple[Any, ...]]:
        if not rows:
            return []
        key = list(table.primary_key.columns)
        if self.dialect in ("postgresql", "sqlite"):
            statement = (
                postgresql.insert(table) if self.dialect == "postgresql" else sqlite.insert(table)
            )
            claimed = connection.execute(
                statement.on_conflict_do_nothing().returning(*key), list(rows)
            )
            return [tuple(row) for row in claimed]
        inserted = []  # MariaDB/MySQL: INSERT IGNORE reports a row count but no keys, so one by one
        for row in rows:
            if (
                connection.execute(mysql.insert(table).values(row).prefix_with("IGNORE")).rowcount
                == 1
            ):
                inserted.append(tuple(row[column.name] for column in key))
        return inserted

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
        if not values:
            return []
        statement = _select_statement(table, columns, key, where, order_by, for_update)
        return [tuple(row) for row in connection.execute(statement, {"wanted": sorted(set(values))})]

    def drawable_lots(
        self,
        connection: Connection,
        shapes: Shapes,
        needed: Mapping[str, int],
        along: ReadAlong,
        stale_users: Collection[str] = (),
    ) -> tuple[list[tuple[Any, ...]], Folded | None]:
        """Every live lot of the accounts' default credit type (no prefix here, and nothing
        read besides); another type's lots are read with its totals (`account.load_typed`)."""
        return self.rows_where_in(
            connection, shapes.lots, shapes.lot_columns, "user_id", needed, where=DEFAULT_TYPE_LIVE
        ), None

    def owners_and_accounts(
        self, connection: Connection, shapes: Shapes, hold_ids: Collection[str], user_ids: Collection[str]
    ) -> tuple[dict[str, tuple[str, int]], set[str] | None]:
        return {
            row[0]: (row[1], row[2])
            for row in self.rows_where_in(
                connection, shapes.holds, ("id", "user_id", "amount"), "id", hold_ids
            )
        }, None

    def lock_with_owners(
        self, connection: Connection, shapes: Shapes, user_ids: Collection[str], hold_ids: Collection[str]
    ) -> tuple[dict[str, tuple[str, int]], list[tuple[Any, ...]]]:
        columns = shapes.account_columns
        if self.dialect == "postgresql" and hold_ids:  # one round trip, as on psycopg2
            rows = connection.execute(
                _lock_with_owners_statement(shapes),
                {"users": sorted(set(user_ids)), "holds": sorted(set(hold_ids))},
            ).all()
            width = len(columns)
            owners = {
                row[width]: (row[width + 1], row[width + 2])
                for row in rows
                if row[width] is not None
            }
            return owners, [tuple(row[:width]) for row in rows if row[width] is None]
        owners, _ = self.owners_and_accounts(connection, shapes, hold_ids, ())
        users = {*user_ids, *(user_id for user_id, _amount in owners.values())}
        return owners, self.rows_where_in(
            connection, shapes.accounts, columns, "user_id", users, order_by="user_id", for_update=True
        )

    def lock_and_read(
        self,
        connection: Connection,
        shapes: Shapes,
        user_ids: Collection[str],
        deducted: Mapping[str, int],
        charges: Sequence[tuple[str, int | None]],
        along: ReadAlong,
    ) -> LockedRead | None:
        """Not here: the caller locks, then reads (`lock_with_owners`, `drawable_lots`)."""
        return None

    def keyset_page(self, engine: Engine, query: Select[Any]) -> list[tuple[Any, ...]]:
        """On PostgreSQL (any driver) the page must walk its index in order: when the
        planner's statistics say that few rows match (a table just filled, not analysed yet)
        it prefers reading the whole table and sorting it, and then every page reads every
        row (measured: a sweep of 200,000 lots grew quadratically)."""
        with engine.connect() as connection:
            if self.dialect == "postgresql":
                connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
                connection.exec_driver_sql("SET LOCAL enable_bitmapscan = off")
            return [tuple(row) for row in connection.execute(query)]


@cache
def _lock_with_owners_statement(shapes: Shapes) -> Any:
    """PostgreSQL: the holds' owners read in the statement that locks the accounts in user
    order (a CTE with FOR UPDATE), one row per hold after the account rows."""
    accounts, columns, holds = shapes.accounts, shapes.account_columns, shapes.holds
    listed = ", ".join(columns)
    nulls = ", ".join("NULL" for _ in columns)
    return (
        text(
            f"WITH o AS (SELECT id, user_id, amount FROM {holds.name} WHERE id = ANY(:holds)),"
            f" a AS (SELECT {listed} FROM {accounts.name}"
            " WHERE user_id = ANY(:users || ARRAY(SELECT user_id FROM o))"
            " ORDER BY user_id FOR UPDATE)"
            f" SELECT {listed}, CAST(NULL AS text), CAST(NULL AS text), CAST(NULL AS bigint) FROM a"
            f" UNION ALL SELECT {nulls}, id, user_id, amount FROM o"
        )
        .bindparams(
            bindparam("holds", type_=postgresql.ARRAY(Text)),
            bindparam("users", type_=postgresql.ARRAY(Text)),
        )
        .columns(
            *(accounts.c[name] for name in columns),
            column("hold_id", Text),
            column("hold_user_id", Text),
            column("hold_amount", BigInteger),
        )
    )


@cache
def _update_statement(table: Table, keys: tuple[str, ...], columns: tuple[str, ...]) -> Any:
    """Built once per shape: building a Core statement costs more than running a cached one."""
    return (
        update(table)
        .where(*(table.c[key] == bindparam(f"_{key}") for key in keys))
        .values({name: bindparam(f"_{name}") for name in columns})
    )


@cache
def _select_statement(
    table: Table, columns: tuple[str, ...], key: str, where: str, order_by: str, for_update: bool
) -> Any:
    """Built once per shape (the values are an expanding parameter)."""
    statement = select(*(table.c[name] for name in columns)).where(
        table.c[key].in_(bindparam("wanted", expanding=True))
    )
    if where:
        statement = statement.where(text(where))
    if order_by:
        statement = statement.order_by(text(order_by))
    if for_update:
        statement = statement.with_for_update()
    return statement


class CoreScript:
    """Each statement runs when it is added."""

    def __init__(self, backend: Core, connection: Connection) -> None:
        self.backend = backend
        self.connection = connection

    def insert(self, table: Table, rows: Sequence[dict[str, Any]]) -> None:
        self.backend.insert_rows(self.connection, table, rows)

    def update(self, table: Table, key: str | tuple[str, ...], rows: Sequence[dict[str, Any]]) -> None:
        self.backend.update_rows(self.connection, table, key, rows)

    def delete(self, table: Table, key: str, values: Collection[Any]) -> None:
        self.backend.delete_rows(self.connection, table, key, values)

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
        ids = self.backend.insert_returning_ids(self.connection, table, rows)
        if referencing is not None and referencing_rows:
            self.insert(
                referencing,
                [
                    row if position is None else {**row, reference: {reference_key: ids[position]}}
                    for row, position in zip(referencing_rows, positions)
                ],
            )
        return ids


def after(
    columns: Sequence[ColumnElement[Any]], last: Sequence[Any] | None
) -> list[ColumnElement[bool]]:
    """The condition of the next keyset page: `columns` (the index's order) after `last`."""
    if last is None:
        return []
    return [
        tuple_(*columns)
        > tuple_(
            *(bindparam(None, value, type_=column.type) for column, value in zip(columns, last))
        )
    ]
