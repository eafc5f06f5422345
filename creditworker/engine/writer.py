"""The one writer: a unit of work's decisions to set-based SQL, in the unit's transaction.

This is the only code that changes balances, lots and holds. Whatever the unit holds, it
writes in a fixed number of statements, one per table and kind of change: new lots (their
ids come back in order), new holds, changed holds, changed lots, changed accounts, ledger
entries (ids back in order), operation rows (an entry result is stored as its entry's
id), outbox events. A single operation is a unit of one; a batch of a thousand takes the same path.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table

from creditworker.contract.events import _Event
from creditworker.engine.account import accounts_table, balances_table, holds_table, lots_table
from creditworker.engine.results import draw_record
from creditworker.engine.rules import Account, Hold, Lot, Posting
from creditworker.engine.unit_of_work import OperationRecord, UnitOfWork
from creditworker.records.outbox import event_row
from creditworker.storage.backends import Script, backend_for
from creditworker.storage.tables import Entry, Operation, OutboxEvent
from creditworker.storage.transaction import commit_with_next_statement

entries_table = cast(Table, Entry.__table__)
operations_table = cast(Table, Operation.__table__)
outbox_table = cast(Table, OutboxEvent.__table__)


def write(uow: UnitOfWork) -> None:
    """Write everything `uow` decided; ids are set on its lots and postings.

    New lots go first (their ids are in the entries, the draws and the events), in a
    statement of their own unless the unit took their ids when it read; everything else is
    one backend `Script`, which the psycopg2 path sends in one round trip.
    """
    connection = uow.connection
    new_lots: dict[int, Lot] = {}
    changed_lots: dict[int, Lot] = {}
    new_holds: dict[str, Hold] = {}
    changed_holds: dict[str, Hold] = {}
    for posting in uow.postings:
        if posting.lot is not None:
            (changed_lots if posting.lot.id is not None else new_lots)[id(posting.lot)] = posting.lot
        for lot, _taken in posting.draws:
            (changed_lots if lot.id is not None else new_lots)[id(lot)] = lot
        if posting.hold is not None:
            (changed_holds if posting.hold.stored else new_holds)[posting.hold.id] = posting.hold

    fresh = list(new_lots.values())
    typed = bool(uow.touched_typed)  # else every row is of the default type: the column's default
    rolling = any(lot.rolls_over or lot.rolled_from is not None for lot in fresh)  # else the columns' defaults
    backend = backend_for(connection)
    script = backend.script(connection)
    if fresh and len(uow.lot_ids) >= len(fresh):  # ids taken when the unit read: the lots go in the script
        for lot, lot_id in zip(fresh, uow.lot_ids):
            lot.id = lot_id
        script.insert(lots_table, [{"id": lot.id, **_lot_row(lot, typed, rolling)} for lot in fresh])
    else:
        for lot, lot_id in zip(fresh, backend.insert_returning_ids(connection, lots_table,
                                                                   [_lot_row(lot, typed, rolling) for lot in fresh])):
            lot.id = lot_id
    script.delete(accounts_table, "user_id", uow.dropped_accounts)
    # Each kind of row only when there is some: most units of work have few kinds (a reserve
    # writes a hold, an account, an entry and an operation), and building an empty list is
    # a comprehension's frame all the same.
    if new_holds:
        script.insert(holds_table, [_hold_row(hold, typed) for hold in new_holds.values()])
        for hold in new_holds.values():
            hold.stored = True
    if changed_holds:
        script.update(holds_table, "id", [
            {"id": hold.id, "status": hold.status, "committed_amount": hold.committed_amount,
             "finalized_at": hold.finalized_at}
            for hold in changed_holds.values()
        ])
    if changed_lots:
        script.update(lots_table, "id", [{"id": lot.id, "remaining": lot.remaining}
                                         for lot in changed_lots.values()])
        script.update(lots_table, "id", [{"id": lot.id, "expires_at": lot.expires_at}
                                         for lot in changed_lots.values() if lot.expiry_changed])
    if uow.rollover_lots:
        script.update(lots_table, "id", [
            {"id": lot.id, "rolls_over": lot.rolls_over, "rollover_left": lot.rollover_left,
             "rollover_expires_at": lot.rollover_expires_at}
            for lot in {id(lot): lot for lot in uow.rollover_lots}.values()  # stored lots only
        ])
    at = uow.at
    if uow.touched_typed:
        _write_typed(script, list(uow.touched_typed.values()), at)
    script.update(accounts_table, "user_id", [
        {"user_id": account.user_id, "balance": account.balance, "reserved": account.reserved,
         "low_credit_threshold": account.low_credit_threshold,
         "low_credit_alerted": account.low_credit_alerted, "overdraft_limit": account.overdraft_limit,
         "pending_until": account.pending_until, "updated_at": at}
        for account in uow.touched.values()
    ])
    if uow.events:
        script.insert(outbox_table, [event_row(_built(event)) for event in uow.events])
    for (table, key), rows in uow.row_updates.items():
        script.update(table, key, rows)
    if len(uow.entry_ids) >= len(uow.postings) and uow.postings and not uow.uses_orm and not uow.after_write:
        _finish_with_known_ids(uow, script)
        return
    position = {id(posting): index for index, posting in enumerate(uow.postings)}
    entry_ids = script.finish(
        entries_table, [_entry_row(posting, typed) for posting in uow.postings],
        referencing=operations_table, reference="result", reference_key="entry_id",
        referencing_rows=[_operation_row(record, None if record.references_entry else record.source, at)
                          for record in uow.operations],
        positions=[position[id(record.source)] if record.references_entry else None for record in uow.operations],
    )
    for posting, entry_id in zip(uow.postings, entry_ids):
        posting.id = entry_id


def _finish_with_known_ids(uow: UnitOfWork, script: Script) -> None:
    """The entries get the ids the unit took from their sequence when it read (PostgreSQL):
    the script needs nothing back, so the transaction's COMMIT goes out with it."""
    typed = bool(uow.touched_typed)
    for posting, entry_id in zip(uow.postings, uow.entry_ids):
        posting.id = entry_id
    script.insert(entries_table, [{"id": posting.id, **_entry_row(posting, typed)} for posting in uow.postings])
    script.insert(operations_table, [
        _operation_row(record, {"entry_id": record.source.id} if isinstance(record.source, Posting)
                       else record.source, uow.at)
        for record in uow.operations
    ])
    commit_with_next_statement(uow.connection)
    script.finish(entries_table, [])


def _operation_row(record: OperationRecord, result: Any, at: datetime) -> dict[str, Any]:
    return {"idempotency_key": record.key, "kind": record.kind, "fingerprint": record.fingerprint,
            "user_id": record.user_id, "result": result, "created_at": at}


def _entry_row(posting: Posting, typed: bool) -> dict[str, Any]:
    """The entry's row; `credit_type` only when the unit moved another type than the default
    (all rows of one statement name the same columns; left out, the column's default applies)."""
    row = {"user_id": posting.user_id, "kind": posting.kind, "amount": posting.amount, "held": posting.held,
            "balance_after": posting.balance_after, "reserved_after": posting.reserved_after,
            "lot_id": posting.lot.id if posting.lot is not None else None,
            "reservation_id": posting.hold.id if posting.hold is not None else None,
            "draws": _draws(posting.draws), "description": posting.description, "metadata": posting.metadata,
            "idempotency_key": posting.idempotency_key, "created_at": posting.created_at,
            "refund_of": posting.refund_of}
    if typed:
        row["credit_type"] = posting.credit_type
    return row


def _draws(draws: list[tuple[Lot, int]]) -> list[dict[str, Any]] | None:
    """`[{"lot_id": ..., "amount": ...}, ...]`, with a lot's cost basis where it has one."""
    if not draws:
        return None
    return [{"lot_id": lot.id, "amount": taken} if lot.unit_cost is None else draw_record(lot, taken)
            for lot, taken in draws]


def _built(event: _Event | Callable[[], _Event]) -> _Event:
    return event if isinstance(event, _Event) else event()


def _lot_row(lot: Lot, typed: bool, rolling: bool = False) -> dict[str, Any]:
    row = {"user_id": lot.user_id, "amount": lot.amount, "remaining": lot.remaining, "source": lot.source,
           "priority": lot.priority, "expires_at": lot.expires_at, "created_at": lot.created_at,
           "idempotency_key": lot.idempotency_key, "effective_at": lot.effective_at,
           "cost_basis_amount": lot.unit_cost, "cost_basis_currency": lot.currency}
    if typed:
        row["credit_type"] = lot.credit_type
    if rolling:
        row["rolls_over"] = lot.rolls_over
        row["rolled_from_lot_id"] = lot.rolled_from
    return row


def _hold_row(hold: Hold, typed: bool) -> dict[str, Any]:
    row = {"id": hold.id, "user_id": hold.user_id, "amount": hold.amount, "status": hold.status,
           "expires_at": hold.expires_at, "created_at": hold.created_at, "finalized_at": hold.finalized_at,
           "committed_amount": hold.committed_amount, "idempotency_key": hold.idempotency_key}
    if typed:
        row["credit_type"] = hold.credit_type
    return row


def _write_typed(script: Script, accounts: list[Account], at: datetime) -> None:
    """The totals of credit types other than the default (`credit_balances`, keyed by user and
    type), in the writer's script with the rest: written only by units of work that moved
    such a type (the default type's path writes nothing more than before types existed)."""
    new = [{**_typed_row(account, at), "created_at": at} for account in accounts if not account.stored]
    changed = [_typed_row(account, at) for account in accounts if account.stored]
    script.insert(balances_table, new)
    script.update(balances_table, ("user_id", "credit_type"), changed)
    for account in accounts:
        account.stored = True


def _typed_row(account: Account, at: datetime) -> dict[str, Any]:
    return {"user_id": account.user_id, "credit_type": account.credit_type, "balance": account.balance,
            "reserved": account.reserved, "overdraft_limit": account.overdraft_limit,
            "pending_until": account.pending_until, "low_credit_threshold": account.low_credit_threshold,
            "low_credit_alerted": account.low_credit_alerted, "updated_at": at}
