"""Accounts loaded locked, in sorted order, with their live lots and the holds a unit of work names.

A batch reads what it needs in a constant number of queries, never one per item: the
accounts in one `SELECT ... FOR UPDATE` (user id order, the order every multi-account
transaction uses, so two of them never wait on each other in a cycle), then their live
lots in one query. The lots are read by a second statement on purpose: under READ
COMMITTED a statement that waited for a lock still sees the snapshot it started with for
the rows it did not lock, so lots joined to the locked accounts could be what the previous
lock holder had already drawn.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NamedTuple, cast

from sqlalchemy import Table, and_, bindparam, or_, select
from sqlalchemy.engine import Connection

from creditworker.contract import ReservationStatus
from creditworker.engine.rules import Account, Hold, Lot, draw_order
from creditworker.storage import bulk
from creditworker.storage.database import insert_if_absent
from creditworker.storage.tables import Account as AccountRow
from creditworker.storage.tables import Hold as HoldRow
from creditworker.storage.tables import Lot as LotRow

accounts_table = cast(Table, AccountRow.__table__)
lots_table = cast(Table, LotRow.__table__)
holds_table = cast(Table, HoldRow.__table__)


def create_missing(connection: Connection, user_ids: Collection[str], at: datetime,
                   existing: Collection[str] | None = None) -> set[str]:
    """Create the accounts that do not exist yet (in sorted order, each without racing a
    concurrent creator); returns those this call created. `existing`: those of `user_ids`
    already read as existing (`before_lock`), else they are read here."""
    if not user_ids:
        return set()
    if existing is None:
        existing = {row[0] for row in bulk.rows_where_in(connection, accounts_table, ("user_id",), "user_id", user_ids)}
    return {
        user_id for user_id in sorted(set(user_ids) - existing)
        if insert_if_absent(connection, AccountRow, {
            "user_id": user_id, "balance": 0, "reserved": 0, "low_credit_alerted": False,
            "created_at": at, "updated_at": at,
        })
    }


ACCOUNT_COLUMNS = ("user_id", "balance", "reserved", "low_credit_threshold", "low_credit_alerted", "overdraft_limit")


def lock(connection: Connection, user_ids: Iterable[str]) -> dict[str, Account]:
    """The accounts that exist among `user_ids`, locked for the rest of the transaction."""
    rows = bulk.rows_where_in(connection, accounts_table, ACCOUNT_COLUMNS, "user_id", set(user_ids),
                              order_by="user_id", for_update=True)
    return {row[0]: Account(row[0], row[1], row[2], row[3], bool(row[4]), row[5]) for row in rows}


LOT_COLUMNS = ("id", "user_id", "amount", "remaining", "priority", "expires_at", "source", "created_at",
               "idempotency_key")


def _lot(row: tuple[object, ...]) -> Lot:
    lot = Lot(*row)  # type: ignore[arg-type]
    lot.age = lot.id  # type: ignore[assignment]
    return lot


@dataclass(slots=True)
class Prefetched:
    """What the lot query of a unit of work read besides the lots (PostgreSQL)."""

    operations: list[tuple[str, str, str, Any]]
    """The stored operation rows of the keys asked for: `(key, kind, fingerprint, result)`."""
    entry_ids: list[int]
    """Ledger entry ids taken from their sequence for this transaction, ascending."""
    lot_ids: list[int]
    """Lot ids taken from their sequence for this transaction, ascending."""
    stale_holds: list[Hold] | None
    """The active holds past their TTL of the accounts asked for (None: none asked for)."""
    holds: list[Hold]
    """The holds asked for by id, as they are after the lock."""


def load_live_lots(connection: Connection, accounts: Iterable[Account],
                   drawing: Mapping[str, int] | None = None, *,
                   operation_keys: Collection[str] = (), entry_ids: int = 0, lot_ids: int = 0,
                   stale_at: datetime | None = None, stale_users: Collection[str] = (),
                   hold_ids: Collection[str] = ()) -> Prefetched | None:
    """Give each account its lots with credits left, in the draw-down order (one query).

    With `drawing` (at most how much each account's draws may take in this unit of work),
    PostgreSQL sends only the lots that come first in the draw-down order until they cover
    that much: the lots a draw can reach. Lots granted later in the unit of work only add
    to what is there, so the prefix stays enough. Other databases send every live lot.

    In the same statement, PostgreSQL reads the operation rows of `operation_keys` and takes
    `entry_ids` ids from the ledger's sequence and `lot_ids` from the lots' (after the
    accounts' lock, so in the order their transactions hold it): round trips saved. None: it did not (other databases, or no
    `drawing`); the caller reads the operations itself, and the writer gets ids as it inserts.
    With `stale_at`, it also reads the holds of `stale_users` past their TTL (`stale_holds`),
    and it reads the holds `hold_ids` names (`holds`).
    """
    wanting = {account.user_id: account for account in accounts if not account.lots_loaded}
    for account in wanting.values():
        account.lots, account.lots_loaded = [], True
    prefetched: Prefetched | None = None
    if drawing is not None and bulk.pg_arrays(connection):
        rows, prefetched = _lots_prefix(connection, {user_id: max(0, drawing.get(user_id, 0)) for user_id in wanting},
                                        operation_keys, entry_ids, lot_ids, stale_at, stale_users, hold_ids)
    elif wanting:
        rows = bulk.rows_where_in(connection, lots_table, LOT_COLUMNS, "user_id", wanting, where="remaining > 0")
    else:
        return None
    for row in rows:
        wanting[row[1]].lots.append(_lot(row))  # type: ignore[index]
    for account in wanting.values():
        if len(account.lots) > 1:
            account.lots.sort(key=draw_order)
    return prefetched


_PREFIX = (
    "SELECT {columns}, NULL::json, NULL::bigint[], NULL::bigint[], NULL::json, NULL::json FROM (SELECT l.*, n.needed, sum(l.remaining) OVER"
    " (PARTITION BY l.user_id ORDER BY l.priority, l.expires_at IS NULL, l.expires_at, l.id) - l.remaining"
    " AS before FROM credit_lots l JOIN unnest(CAST(%(users)s AS text[]), CAST(%(needed)s AS bigint[]))"
    " AS n(user_id, needed) ON l.user_id = n.user_id WHERE l.remaining > 0) x WHERE x.before < x.needed"
    " UNION ALL SELECT {nulls}, (SELECT json_agg(json_build_array(o.idempotency_key, o.kind, o.fingerprint,"
    " o.result)) FROM operations o WHERE o.idempotency_key = ANY(CAST(%(keys)s AS text[]))),"
    " (SELECT array_agg(nextval('ledger_entries_id_seq')) FROM generate_series(1, %(entry_ids)s)),"
    " (SELECT array_agg(nextval('credit_lots_id_seq')) FROM generate_series(1, %(lot_ids)s)),"
    " (SELECT json_agg(json_build_array({hold_columns})) FROM reservations r"
    " WHERE r.user_id = ANY(CAST(%(stale_users)s AS text[])) AND r.status = 'active'"
    " AND r.expires_at <= CAST(%(stale_at)s AS timestamp)),"
    " (SELECT json_agg(json_build_array({hold_columns})) FROM reservations r"
    " WHERE r.id = ANY(CAST(%(hold_ids)s AS text[])))"
).format(columns=", ".join(LOT_COLUMNS), nulls=", ".join("NULL" for _ in LOT_COLUMNS),
         hold_columns=", ".join("r." + column for column in ("id", "user_id", "amount", "status", "expires_at",
                                                            "created_at", "idempotency_key", "committed_amount",
                                                            "finalized_at")))
"""The lots in draw-down order (as `rules.draw_order` sorts them) whose credits before them
do not cover what the account may draw; then one row whose lot columns are NULL, with the
operation rows stored for the given keys (JSON), the new entry ids, the new lot ids, the
given accounts' active holds past their TTL (JSON) and the holds named by id (JSON). Holds
read here, after the accounts' lock, are as the lock holder left them."""


def _lots_prefix(connection: Connection, needed: Mapping[str, int], operation_keys: Collection[str],
                 entry_ids: int, lot_ids: int, stale_at: datetime | None, stale_users: Collection[str],
                 hold_ids: Collection[str]) -> tuple[list[tuple[object, ...]], Prefetched]:
    users = sorted(user_id for user_id, amount in needed.items() if amount > 0)
    asking = stale_at is not None and bool(stale_users)
    rows = connection.exec_driver_sql(_PREFIX, {
        "users": bulk.text_array(users), "needed": "{" + ",".join(str(needed[user]) for user in users) + "}",
        "keys": bulk.text_array(sorted(set(operation_keys))), "entry_ids": entry_ids, "lot_ids": lot_ids,
        "stale_users": bulk.text_array(sorted(stale_users) if asking else []),
        "stale_at": _naive(stale_at) if asking else None, "hold_ids": bulk.text_array(sorted(set(hold_ids))),
    }).fetchall()
    lots = [(*row[:5], _utc(row[5]), row[6], _utc(row[7]), row[8]) for row in rows if row[0] is not None]
    extra = next(row for row in rows if row[0] is None)
    stale = [_hold_from_json(hold) for hold in extra[-2] or ()] if asking else None
    return lots, Prefetched([tuple(operation) for operation in extra[-5] or ()],  # type: ignore[misc]
                            sorted(extra[-4] or ()), sorted(extra[-3] or ()), stale,
                            [_hold_from_json(hold) for hold in extra[-1] or ()])


def _naive(at: datetime) -> str:
    return at.astimezone(timezone.utc).replace(tzinfo=None).isoformat()


def _stamp(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def _hold_from_json(row: list[Any]) -> Hold:
    return Hold(row[0], row[1], row[2], row[3], _stamp(row[4]), _stamp(row[5]), row[6],  # type: ignore[arg-type]
                row[7], _stamp(row[8]))


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.replace(tzinfo=timezone.utc)


def load_lots(connection: Connection, lot_ids: Collection[int]) -> list[Lot]:
    """The given lots as they are now (read after their accounts were locked), in id order."""
    return [_lot(row) for row in bulk.rows_where_in(connection, lots_table, LOT_COLUMNS, "id", lot_ids, order_by="id")]


class HoldOwner(NamedTuple):
    """Who a hold belongs to and how much it holds: neither ever changes, so they may be read
    before the accounts are locked (to know which to lock, and how much a commit may draw)."""

    user_id: str
    amount: int


def hold_owners(connection: Connection, hold_ids: Collection[str]) -> dict[str, HoldOwner]:
    """The owner and amount of each existing hold, read before locking."""
    return {row[0]: HoldOwner(row[1], row[2])
            for row in bulk.rows_where_in(connection, holds_table, ("id", "user_id", "amount"), "id", hold_ids)}


_BEFORE_LOCK = (
    "SELECT id, user_id, amount FROM reservations WHERE id = ANY(CAST(%(holds)s AS text[]))"
    " UNION ALL SELECT NULL, user_id, NULL FROM accounts WHERE user_id = ANY(CAST(%(users)s AS text[]))"
)


def before_lock(connection: Connection, hold_ids: Collection[str], user_ids: Collection[str],
                ) -> tuple[dict[str, HoldOwner], set[str] | None]:
    """`hold_owners`, and which of `user_ids` have an account (for `create_missing`; None: not
    read). PostgreSQL reads both in one statement when it needs both."""
    if not hold_ids or not user_ids or not bulk.pg_arrays(connection):
        return hold_owners(connection, hold_ids), None
    rows = connection.exec_driver_sql(_BEFORE_LOCK, {
        "holds": bulk.text_array(sorted(set(hold_ids))), "users": bulk.text_array(sorted(set(user_ids))),
    }).fetchall()
    return ({row[0]: HoldOwner(row[1], row[2]) for row in rows if row[0] is not None},
            {row[1] for row in rows if row[0] is None})


HOLD_COLUMNS = ("id", "user_id", "amount", "status", "expires_at", "created_at", "idempotency_key",
                "committed_amount", "finalized_at")


def load_holds(connection: Connection, hold_ids: Collection[str]) -> dict[str, Hold]:
    """The given holds as they are now (read after their accounts were locked)."""
    return {row[0]: Hold(*row) for row in bulk.rows_where_in(  # type: ignore[arg-type]
        connection, holds_table, HOLD_COLUMNS, "id", hold_ids, order_by="id")}


_STALE_HOLDS = (
    select(*(holds_table.c[column] for column in HOLD_COLUMNS))
    .where(holds_table.c.user_id.in_(bindparam("users", expanding=True)),
           holds_table.c.status == ReservationStatus.ACTIVE.value,
           holds_table.c.expires_at <= bindparam("at", type_=holds_table.c.expires_at.type))
    .order_by(holds_table.c.id)
)


def stale_holds(connection: Connection, user_ids: Collection[str], at: datetime) -> list[Hold]:
    """The active holds of `user_ids` past their TTL at `at`, read after their accounts were
    locked: they no longer count, and the unit of work releases them with their entries."""
    if not user_ids:
        return []
    return [Hold(*row) for row in connection.execute(_STALE_HOLDS, {"users": sorted(user_ids), "at": at})]


_HOLDS_AND_STALE = (
    select(*(holds_table.c[column] for column in HOLD_COLUMNS))
    .where(or_(holds_table.c.id.in_(bindparam("ids", expanding=True)),
               and_(holds_table.c.user_id.in_(bindparam("users", expanding=True)),
                    holds_table.c.status == ReservationStatus.ACTIVE.value,
                    holds_table.c.expires_at <= bindparam("at", type_=holds_table.c.expires_at.type))))
    .order_by(holds_table.c.id)
)


def load_holds_and_stale(connection: Connection, hold_ids: Collection[str], user_ids: Collection[str],
                         at: datetime) -> tuple[dict[str, Hold], list[Hold]]:
    """`load_holds` and `stale_holds` in one statement: the named holds, and the active holds
    of `user_ids` past their TTL (a hold may be both: it is one object)."""
    if not hold_ids:
        return {}, stale_holds(connection, user_ids, at)
    named = set(hold_ids)
    holds = [Hold(*row) for row in connection.execute(  # type: ignore[arg-type]
        _HOLDS_AND_STALE, {"ids": sorted(named), "users": sorted(user_ids), "at": at})]
    stale = [hold for hold in holds if hold.user_id in user_ids and hold.status == ReservationStatus.ACTIVE.value
             and hold.expires_at <= at]
    return {hold.id: hold for hold in holds if hold.id in named}, stale
