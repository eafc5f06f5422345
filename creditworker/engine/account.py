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

from collections.abc import Collection, Iterable
from datetime import datetime
from typing import cast

from sqlalchemy import Table, select
from sqlalchemy.engine import Connection

from creditworker.engine.rules import Account, Hold, Lot, draw_order
from creditworker.storage.database import insert_if_absent
from creditworker.storage.tables import Account as AccountRow
from creditworker.storage.tables import Hold as HoldRow
from creditworker.storage.tables import Lot as LotRow

accounts_table = cast(Table, AccountRow.__table__)
lots_table = cast(Table, LotRow.__table__)
holds_table = cast(Table, HoldRow.__table__)


def create_missing(connection: Connection, user_ids: Collection[str], at: datetime) -> set[str]:
    """Create the accounts that do not exist yet (in sorted order, each without racing a
    concurrent creator); returns those this call created."""
    if not user_ids:
        return set()
    existing = set(connection.scalars(
        select(accounts_table.c.user_id).where(accounts_table.c.user_id.in_(sorted(user_ids)))
    ))
    return {
        user_id for user_id in sorted(set(user_ids) - existing)
        if insert_if_absent(connection, AccountRow, {
            "user_id": user_id, "balance": 0, "reserved": 0, "low_credit_alerted": False,
            "created_at": at, "updated_at": at,
        })
    }


def lock(connection: Connection, user_ids: Iterable[str]) -> dict[str, Account]:
    """The accounts that exist among `user_ids`, locked for the rest of the transaction."""
    wanted = sorted(set(user_ids))
    if not wanted:
        return {}
    columns = accounts_table.c
    rows = connection.execute(
        select(columns.user_id, columns.balance, columns.reserved, columns.low_credit_threshold,
               columns.low_credit_alerted, columns.overdraft_limit)
        .where(columns.user_id.in_(wanted)).order_by(columns.user_id).with_for_update()
    )
    return {row[0]: Account(row[0], row[1], row[2], row[3], bool(row[4]), row[5]) for row in rows}


LOT_COLUMNS = (lots_table.c.id, lots_table.c.user_id, lots_table.c.amount, lots_table.c.remaining,
               lots_table.c.priority, lots_table.c.expires_at, lots_table.c.source,
               lots_table.c.created_at, lots_table.c.idempotency_key)


def _lot(row: tuple[object, ...]) -> Lot:
    lot = Lot(*row)  # type: ignore[arg-type]
    lot.age = lot.id  # type: ignore[assignment]
    return lot


def load_live_lots(connection: Connection, accounts: Iterable[Account]) -> None:
    """Give each account every lot with credits left, in the draw-down order (one query)."""
    wanting = {account.user_id: account for account in accounts if not account.lots_loaded}
    if not wanting:
        return
    for account in wanting.values():
        account.lots, account.lots_loaded = [], True
    for row in connection.execute(
        select(*LOT_COLUMNS).where(lots_table.c.user_id.in_(sorted(wanting)), lots_table.c.remaining > 0)
    ):
        wanting[row[1]].lots.append(_lot(row))
    for account in wanting.values():
        account.lots.sort(key=draw_order)


def load_lots(connection: Connection, lot_ids: Collection[int]) -> list[Lot]:
    """The given lots as they are now (read after their accounts were locked), in id order."""
    if not lot_ids:
        return []
    return [_lot(row) for row in connection.execute(
        select(*LOT_COLUMNS).where(lots_table.c.id.in_(sorted(lot_ids))).order_by(lots_table.c.id)
    )]


def hold_owners(connection: Connection, hold_ids: Collection[str]) -> dict[str, str]:
    """The user of each existing hold, read before locking (to know which accounts to lock)."""
    if not hold_ids:
        return {}
    return dict(connection.execute(  # type: ignore[arg-type]
        select(holds_table.c.id, holds_table.c.user_id).where(holds_table.c.id.in_(sorted(hold_ids)))
    ).all())


def load_holds(connection: Connection, hold_ids: Collection[str]) -> dict[str, Hold]:
    """The given holds as they are now (read after their accounts were locked)."""
    if not hold_ids:
        return {}
    columns = holds_table.c
    return {
        row[0]: Hold(*row)  # type: ignore[arg-type]
        for row in connection.execute(
            select(columns.id, columns.user_id, columns.amount, columns.status, columns.expires_at,
                   columns.created_at, columns.idempotency_key, columns.committed_amount,
                   columns.finalized_at)
            .where(columns.id.in_(sorted(hold_ids))).order_by(columns.id)
        )
    }
