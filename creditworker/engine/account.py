"""Accounts loaded locked, in sorted order, with their live lots and the holds a unit of work names.

A batch reads what it needs in a constant number of queries, never one per item: the
accounts in one `SELECT ... FOR UPDATE` (user id order, the order every multi-account
transaction uses, so two of them never wait on each other in a cycle), then their live
lots in one query. The lots are read by a second statement on purpose: under READ
COMMITTED a statement that waited for a lock still sees the snapshot it started with for
the rows it did not lock, so lots joined to the locked accounts could be what the previous
lock holder had already drawn. On PostgreSQL the two statements travel in one round trip
(`lock_and_read`): each statement of a multi-statement text takes its own snapshot, so the
read still starts after the lock is granted (tests/engine/test_concurrency.py holds it).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, cast

from sqlalchemy import Table, and_, bindparam, func, or_, select
from sqlalchemy.engine import Connection

from creditworker.contract.credits import DEFAULT_CREDIT_TYPE, ReservationStatus
from creditworker.engine.rules import Account, Hold, Lot, draw_order, is_pending
from creditworker.storage.backends import backend_for
from creditworker.storage.backends.base import ReadAlong, Shapes
from creditworker.storage.backends.core import DEFAULT_TYPE_LIVE
from creditworker.storage.database import insert_if_absent
from creditworker.storage.tables import Account as AccountRow
from creditworker.storage.tables import Hold as HoldRow
from creditworker.storage.tables import Lot as LotRow
from creditworker.storage.tables import TypeBalance

accounts_table = cast(Table, AccountRow.__table__)
lots_table = cast(Table, LotRow.__table__)
holds_table = cast(Table, HoldRow.__table__)
balances_table = cast(Table, TypeBalance.__table__)


def create_missing(connection: Connection, user_ids: Collection[str], at: datetime,
                   existing: Collection[str] | None = None) -> set[str]:
    """Create the accounts that do not exist yet (in sorted order, each without racing a
    concurrent creator); returns those this call created. `existing`: those of `user_ids`
    already read as existing (`before_lock`), else they are read here."""
    if not user_ids:
        return set()
    if existing is None:
        existing = {row[0] for row in backend_for(connection).rows_where_in(
            connection, accounts_table, ("user_id",), "user_id", user_ids)}
    return {
        user_id for user_id in sorted(set(user_ids) - existing)
        if insert_if_absent(connection, AccountRow, {
            "user_id": user_id, "balance": 0, "reserved": 0, "low_credit_alerted": False,
            "created_at": at, "updated_at": at,
        })
    }


ACCOUNT_COLUMNS = ("user_id", "balance", "reserved", "low_credit_threshold", "low_credit_alerted", "overdraft_limit",
                   "pending_until", "topup_threshold")


def lock(connection: Connection, user_ids: Iterable[str]) -> dict[str, Account]:
    """The accounts that exist among `user_ids`, locked for the rest of the transaction."""
    rows = backend_for(connection).rows_where_in(connection, accounts_table, ACCOUNT_COLUMNS, "user_id",
                                                 set(user_ids), order_by="user_id", for_update=True)
    return {row[0]: _account(row) for row in rows}


def _account(row: tuple[Any, ...]) -> Account:
    return Account(row[0], row[1], row[2], row[3], bool(row[4]), row[5], pending_until=row[6],
                   topup_threshold=row[7])


def lock_with_owners(connection: Connection, user_ids: Iterable[str], hold_ids: Collection[str],
                     ) -> tuple[dict[str, HoldOwner], dict[str, Account]]:
    """`hold_owners`, and `lock` of `user_ids` and those owners: one round trip where the
    backend can (a commit or release needs no read of its own before the lock)."""
    owners, rows = backend_for(connection).lock_with_owners(connection, SHAPES, set(user_ids), hold_ids)
    return ({hold_id: HoldOwner(*owner) for hold_id, owner in owners.items()},
            {row[0]: _account(row) for row in rows})


LOT_COLUMNS = ("id", "user_id", "amount", "remaining", "priority", "expires_at", "source", "created_at",
               "idempotency_key", "credit_type", "effective_at", "cost_basis_amount", "cost_basis_currency")



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
    the backend may send only the lots a draw can reach (`Backend.drawable_lots`: the
    psycopg2 path sends the prefix of the draw-down order that covers it). Lots granted
    later in the unit of work only add to what is there, so the prefix stays enough.

    In the same statement that path reads the operation rows of `operation_keys` and takes
    `entry_ids` ids from the ledger's sequence and `lot_ids` from the lots': round trips
    saved. None: it did not (the Core path, or no `drawing`); the caller reads the
    operations itself, and the writer gets ids as it inserts.
    With `stale_at`, that statement also reads the holds of `stale_users` past their TTL
    (`stale_holds`) and the holds `hold_ids` names (`holds`).
    """
    wanting = {account.user_id: account for account in accounts if not account.lots_loaded}
    backend = backend_for(connection)
    prefetched: Prefetched | None = None
    if drawing is not None:
        needed = {user_id: max(0, drawing.get(user_id, 0)) for user_id in wanting}
        along = ReadAlong(operation_keys, entry_ids, lot_ids, hold_ids, stale_at, stale_holds=stale_at is not None)
        rows, folded = backend.drawable_lots(connection, SHAPES, needed, along, stale_users)
        if folded is not None:
            prefetched = Prefetched(
                folded.operations, folded.entry_ids, folded.lot_ids,
                None if folded.stale_holds is None else [Hold(*row) for row in folded.stale_holds],  # type: ignore[arg-type]
                [Hold(*row) for row in folded.holds])  # type: ignore[arg-type]
    elif wanting:
        rows = backend.rows_where_in(connection, lots_table, LOT_COLUMNS, "user_id", wanting, where=DEFAULT_TYPE_LIVE)
    else:
        return None
    _give_lots(wanting, rows)
    return prefetched


def load_lots(connection: Connection, lot_ids: Collection[int]) -> list[Lot]:
    """The given lots as they are now (read after their accounts were locked), in id order."""
    return [_lot(row) for row in backend_for(connection).rows_where_in(
        connection, lots_table, LOT_COLUMNS, "id", lot_ids, order_by="id")]


class HoldOwner(NamedTuple):
    """Who a hold belongs to and how much it holds: neither ever changes, so they may be read
    before the accounts are locked (to know which to lock, and how much a commit may draw)."""

    user_id: str
    amount: int


@dataclass(frozen=True, slots=True)
class Drawing:
    """At most what each account's draws may take in a unit of work: its deducts, and what
    its commits charge (None: the hold's amount, known once the hold is read). Called with
    the holds' owners it answers in Python; a backend that reads the holds in its lock's
    round trip computes the same in SQL from the fields."""

    deducted: Mapping[str, int]
    charges: tuple[tuple[str, int | None], ...]
    """(hold id, amount charged or None), one per commit; a release's is 0."""

    def __call__(self, holds: Mapping[str, HoldOwner]) -> dict[str, int]:
        most = dict(self.deducted)
        for hold_id, amount in self.charges:
            hold = holds.get(hold_id)
            if hold is not None:
                most[hold.user_id] = most.get(hold.user_id, 0) + (hold.amount if amount is None else amount)
        return most


@dataclass(slots=True)
class Locked:
    """What `lock_and_read` gave: the locked accounts (with their lots), the named holds and
    what the lot query reads besides."""

    accounts: dict[str, Account]
    holds: dict[str, Hold]
    prefetched: Prefetched


def lock_and_read(connection: Connection, user_ids: Collection[str], hold_ids: Collection[str],
                  drawing: Drawing, *, operation_keys: Collection[str], entry_ids: int, lot_ids: int,
                  at: datetime, stale: bool) -> Locked | None:
    """`lock_with_owners` (or `lock`) then `load_live_lots` for `drawing`, in one round trip
    where the backend can (`Backend.lock_and_read`); None where it cannot. With `stale`,
    the active holds past their TTL at `at` of the locked accounts. An account with a grant
    not yet effective gets all its live lots, in a query of its own."""
    read = backend_for(connection).lock_and_read(
        connection, SHAPES, user_ids, drawing.deducted, drawing.charges,
        ReadAlong(operation_keys, entry_ids, lot_ids, hold_ids, at, stale_holds=stale))
    if read is None:
        return None
    locked = {row[0]: _account(row) for row in read.accounts}
    _give_lots(locked, read.lots)
    waiting = {user_id: account for user_id, account in locked.items()
               if account.pending_until is not None and account.pending_until > at}
    if waiting:  # a prefix of the draw-down order may be a pending lot: read them all (rare)
        _give_lots(waiting, backend_for(connection).rows_where_in(
            connection, lots_table, LOT_COLUMNS, "user_id", waiting, where=DEFAULT_TYPE_LIVE))
    folded = read.folded
    holds = [Hold(*row) for row in folded.holds]  # type: ignore[arg-type]
    return Locked(locked, {hold.id: hold for hold in holds}, Prefetched(
        folded.operations, folded.entry_ids, folded.lot_ids,
        None if folded.stale_holds is None else [Hold(*row) for row in folded.stale_holds],  # type: ignore[arg-type]
        holds))


def _give_lots(wanting: Mapping[str, Account], rows: Iterable[tuple[Any, ...]]) -> None:
    """Give each of `wanting` its lots among `rows`, in the draw-down order."""
    for account in wanting.values():
        account.lots, account.lots_loaded = [], True
    for row in rows:
        wanting[row[1]].lots.append(_lot(row))
    for account in wanting.values():
        if len(account.lots) > 1:
            account.lots.sort(key=draw_order)


def hold_owners(connection: Connection, hold_ids: Collection[str]) -> dict[str, HoldOwner]:
    """The owner and amount of each existing hold, read before locking."""
    return {row[0]: HoldOwner(row[1], row[2]) for row in backend_for(connection).rows_where_in(
        connection, holds_table, ("id", "user_id", "amount"), "id", hold_ids)}


def before_lock(connection: Connection, hold_ids: Collection[str], user_ids: Collection[str],
                ) -> tuple[dict[str, HoldOwner], set[str] | None]:
    """`hold_owners`, and which of `user_ids` have an account (for `create_missing`; None: not
    read). A backend may read both in one statement when it needs both."""
    owners, existing = backend_for(connection).owners_and_accounts(connection, SHAPES, hold_ids, user_ids)
    return {hold_id: HoldOwner(*owner) for hold_id, owner in owners.items()}, existing


HOLD_COLUMNS = ("id", "user_id", "amount", "status", "expires_at", "created_at", "idempotency_key",
                "committed_amount", "finalized_at", "credit_type")
SHAPES = Shapes(accounts_table, ACCOUNT_COLUMNS, lots_table, LOT_COLUMNS, holds_table, HOLD_COLUMNS)
"""What the backends' lock and lot queries read, in these columns."""


def load_holds(connection: Connection, hold_ids: Collection[str]) -> dict[str, Hold]:
    """The given holds as they are now (read after their accounts were locked)."""
    return {row[0]: Hold(*row) for row in backend_for(connection).rows_where_in(  # type: ignore[arg-type]
        connection, holds_table, HOLD_COLUMNS, "id", hold_ids, order_by="id")}


_STALE_HOLDS = (
    select(*(holds_table.c[column] for column in HOLD_COLUMNS))
    .where(holds_table.c.user_id.in_(bindparam("users", expanding=True)),
           holds_table.c.status == ReservationStatus.ACTIVE.value,
           holds_table.c.expires_at <= bindparam("at", type_=holds_table.c.expires_at.type))
    .order_by(holds_table.c.id)
)


def stale_holds(connection: Connection, user_ids: Collection[str], at: datetime,
                credit_type: str | None = None) -> list[Hold]:
    """The active holds of `user_ids` (of `credit_type`, or of every type) past their TTL at
    `at`, read after their accounts were locked: they no longer count, and the unit of work
    releases them with their entries."""
    if not user_ids:
        return []
    found = [Hold(*row) for row in connection.execute(_STALE_HOLDS, {"users": sorted(user_ids), "at": at})]
    return found if credit_type is None else [hold for hold in found if hold.credit_type == credit_type]


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


_TYPE_BALANCES = (
    select(balances_table.c.user_id, balances_table.c.credit_type, balances_table.c.balance,
           balances_table.c.reserved, balances_table.c.overdraft_limit, balances_table.c.pending_until,
           balances_table.c.low_credit_threshold, balances_table.c.low_credit_alerted)
    .where(balances_table.c.user_id.in_(bindparam("users", expanding=True)),
           balances_table.c.credit_type.in_(bindparam("types", expanding=True)))
)
_TYPE_LOTS = (
    select(*(lots_table.c[column] for column in LOT_COLUMNS))
    .where(lots_table.c.user_id.in_(bindparam("users", expanding=True)),
           lots_table.c.credit_type.in_(bindparam("types", expanding=True)), lots_table.c.remaining > 0)
)


def load_typed(connection: Connection, pairs: Collection[tuple[str, str]], at: datetime) -> list[Account]:
    """Accounts' totals in other credit types than the default, with those types' live lots,
    for the (user id, type) pairs given (two queries): read under the lock their `accounts`
    rows hold, which every writer of their rows takes. A type an account never held starts
    at zero (`stored` False: the writer inserts its row)."""
    parameters = {"users": sorted({user_id for user_id, _type in pairs}),
                  "types": sorted({credit_type for _user, credit_type in pairs})}
    found: dict[tuple[str, str], Account] = {}
    for (user_id, credit_type, balance, reserved, overdraft_limit, pending_until, threshold,
         alerted) in connection.execute(_TYPE_BALANCES, parameters):
        if (user_id, credit_type) in pairs:
            found[(user_id, credit_type)] = Account(user_id, balance, reserved, threshold, bool(alerted),
                                                    overdraft_limit, credit_type=credit_type,
                                                    pending_until=pending_until)
    for user_id, credit_type in pairs:
        if (user_id, credit_type) not in found:
            found[(user_id, credit_type)] = Account(user_id, 0, 0, None, False, credit_type=credit_type,
                                                    stored=False)
    for account in found.values():
        account.lots, account.lots_loaded = [], True
    for row in connection.execute(_TYPE_LOTS, parameters):
        account = found.get((row[1], row[9]))  # user_id, credit_type
        if account is not None:
            account.lots.append(_lot(tuple(row)))
    for account in found.values():
        account.lots.sort(key=draw_order)
        account.pending = sum(lot.remaining for lot in account.lots if is_pending(lot, at))
    return list(found.values())


_PENDING = (
    select(lots_table.c.user_id, func.sum(lots_table.c.remaining))
    .where(lots_table.c.user_id.in_(bindparam("users", expanding=True)),
           lots_table.c.credit_type == DEFAULT_CREDIT_TYPE, lots_table.c.remaining > 0,
           lots_table.c.effective_at > bindparam("at", type_=lots_table.c.effective_at.type))
    .group_by(lots_table.c.user_id)
)


def count_pending(connection: Connection, accounts: Collection[Account], at: datetime) -> None:
    """Set `pending` of locked accounts whose `pending_until` is still ahead of `at` (only
    they can have a grant not yet effective; the others read nothing here)."""
    waiting = {account.user_id: account for account in accounts
               if account.pending_until is not None and account.pending_until > at}
    if not waiting:
        return
    for account in waiting.values():
        account.pending = 0
    for user_id, pending in connection.execute(_PENDING, {"users": sorted(waiting), "at": at}):
        waiting[user_id].pending = int(pending or 0)
