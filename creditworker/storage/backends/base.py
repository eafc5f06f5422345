"""What a storage path offers the engine: set-based reads and writes by key, in one protocol."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, Protocol

from sqlalchemy import Table
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql import Select


def key_columns(key: str | tuple[str, ...]) -> tuple[str, ...]:
    """A key of one column or several, as a tuple of column names."""
    return (key,) if isinstance(key, str) else key


@dataclass(frozen=True, slots=True)
class Shapes:
    """The tables a unit of work locks and reads, and the columns it reads of each (rows
    come back as tuples of these columns, in this order)."""

    accounts: Table
    account_columns: tuple[str, ...]
    lots: Table
    lot_columns: tuple[str, ...]
    holds: Table
    hold_columns: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ReadAlong:
    """What a unit of work asks its lots' query to read besides the lots, where the path
    can read it in the same statement (`Backend.folds_reads`; answered as `Folded`)."""

    operation_keys: Collection[str] = ()
    """The keys whose stored operation rows to read."""
    entry_ids: int = 0
    """How many new ledger entry ids to take from their sequence."""
    lot_ids: int = 0
    """How many new lot ids to take from their sequence."""
    hold_ids: Collection[str] = ()
    """The holds to read by id, as they are after the accounts' lock."""
    at: datetime | None = None
    """The unit of work's moment: lots past their expiry then come too (rollover looks for
    them when a hold ends), and holds past their TTL then are stale."""
    stale_holds: bool = False
    """Whether to read the active holds past their TTL at `at` (of the locked accounts, or
    of the users `drawable_lots` names)."""


class Folded(NamedTuple):
    """What a backend's lot query read besides the lots, in the same statement."""

    operations: list[Any]
    """The stored operation rows of the keys asked for: `(key, kind, fingerprint, result)`."""
    entry_ids: list[int]
    """New ledger entry ids taken from their sequence, ascending."""
    lot_ids: list[int]
    """New lot ids taken from their sequence, ascending."""
    stale_holds: list[tuple[Any, ...]] | None
    """The active holds past their TTL of the accounts asked for (None: none asked for)."""
    holds: list[tuple[Any, ...]]
    """The holds asked for by id, as they are after the accounts' lock."""


class LockedRead(NamedTuple):
    """What one lock-and-read round trip gave: the locked accounts, the lots their draws can
    reach and what `Folded` holds."""

    accounts: list[tuple[Any, ...]]
    """The locked accounts' rows in user order, as they are after the lock."""
    lots: list[tuple[Any, ...]]
    """The live lots of the default credit type that come first in the draw-down order until
    they cover what each account may draw (pending grants counted as lots: the caller reads
    all the lots of an account with one)."""
    folded: Folded


class Script(Protocol):
    """A writer's statements, in order; a backend may hold them until `finish`."""

    def insert(self, table: Table, rows: Sequence[dict[str, Any]]) -> None:
        """Insert `rows` (all naming the same columns)."""

    def update(self, table: Table, key: str | tuple[str, ...], rows: Sequence[dict[str, Any]]) -> None:
        """Set the columns named in `rows` on the row whose `key` column (or columns) match."""

    def delete(self, table: Table, key: str, values: Collection[Any]) -> None:
        """Delete the rows whose `key` column is one of `values`."""

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
        """Run what is pending, insert `rows` into `table` and return their new ids in order;
        then insert `referencing_rows` into `referencing`, where the row at `i` whose
        `positions[i]` is not None gets `{reference_key: the id of rows[positions[i]]}` as its
        `reference` column."""


class Backend(Protocol):
    """One storage path. Every method reads or writes many rows in a constant number of
    statements; timestamps come back aware UTC, JSON parsed."""

    dialect: str

    def script(self, connection: Connection) -> Script:
        """A writer's script on `connection`."""

    def insert_returning_ids(
        self, connection: Connection, table: Table, rows: Sequence[dict[str, Any]]
    ) -> list[int]:
        """Insert `rows` and return their new ids, in the order of `rows`."""

    def insert_absent(
        self, connection: Connection, table: Table, rows: Sequence[dict[str, Any]]
    ) -> list[tuple[Any, ...]]:
        """Insert the rows whose primary key is not taken yet; the keys this call inserted
        (of two callers racing for a key, exactly one gets it, and the other does not fail)."""

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
        """`columns` of the rows whose `key` is one of `values` (and that meet the SQL
        condition `where`), as tuples."""

    folds_reads: bool
    """Whether `drawable_lots` also reads, in its one statement, what a unit of work needs
    besides the lots (`Folded`): worth calling even for a unit of work that draws nothing."""

    def drawable_lots(
        self,
        connection: Connection,
        shapes: Shapes,
        needed: Mapping[str, int],
        along: ReadAlong,
        stale_users: Collection[str] = (),
    ) -> tuple[list[tuple[Any, ...]], Folded | None]:
        """The live lots (credits left) of the accounts in `needed` that a draw of at most
        `needed[user]` can reach, as `lot_columns` tuples; and, if this path read it in the same
        statement (`folds_reads`), what `along` asks (stale holds: of `stale_users`), else None."""

    def owners_and_accounts(
        self, connection: Connection, shapes: Shapes, hold_ids: Collection[str], user_ids: Collection[str]
    ) -> tuple[dict[str, tuple[str, int]], set[str] | None]:
        """The user and amount of each existing hold, and which of `user_ids` have an account
        (None: not read; the caller reads them when it needs them)."""

    def lock_with_owners(
        self, connection: Connection, shapes: Shapes, user_ids: Collection[str], hold_ids: Collection[str]
    ) -> tuple[dict[str, tuple[str, int]], list[tuple[Any, ...]]]:
        """The user and amount of each existing hold of `hold_ids`, and the accounts of
        `user_ids` and of those holds' owners locked in user order (`account_columns` tuples)."""

    def lock_and_read(
        self,
        connection: Connection,
        shapes: Shapes,
        user_ids: Collection[str],
        deducted: Mapping[str, int],
        charges: Sequence[tuple[str, int | None]],
        along: ReadAlong,
    ) -> LockedRead | None:
        """Lock the accounts of `user_ids` and of the holds `along.hold_ids` names (in user
        order), then read, after the lock, what `lock_with_owners` and `drawable_lots` read
        (each account's draws may take its `deducted` plus its holds' `charges`, None being
        the hold's amount; stale holds: of the locked accounts), in one round trip; None
        where this path cannot (the caller locks, then reads)."""

    def keyset_page(self, engine: Engine, query: Select[Any]) -> list[tuple[Any, ...]]:
        """A page of a keyset scan, in a short transaction of its own, walking its index."""
