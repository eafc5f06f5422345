"""Sweeps over many accounts: expiry, stale holds and reminders, in chunks, through the writer.

Each chunk is one unit of work: it finds its rows with a cheap unlocked scan, locks their
accounts in one sorted query, re-reads the rows under the locks (one query: what the scan
saw may be stale), decides each with the rules and leaves the writing to the writer. No
sweep holds locks over a whole table, and two sweeps running at once do each row once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import Any, cast

from sqlalchemy import Table, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from creditworker.contract.credits import ReservationStatus
from creditworker.contract.events import CreditsExpired, CreditsExpiring
from creditworker.engine import account as accounts
from creditworker.engine import rollover, rules
from creditworker.engine.unit_of_work import UnitOfWork, new_event_id
from creditworker.storage.backends import after, backend_for
from creditworker.storage.tables import ExpiryReminder, Hold, Lot

reminders_table = cast(Table, ExpiryReminder.__table__)

RunChunk = Callable[[Callable[[UnitOfWork], int]], int]
"""Runs one chunk's unit of work in its own transaction and writes what it decided (the
service's `run`, at the sweep's time): a sweep is given it, not the service."""

SWEEP_CHUNK = 1000
"""Rows a sweep handles per transaction, so no sweep holds locks over a whole table."""


def _scan(engine: Engine, query: Any) -> list[Any]:
    with Session(engine) as session:
        return list(session.scalars(query))


_LOT_KEY = (Lot.__table__.c.expires_at, Lot.__table__.c.id)
"""Sweeps over lots page through the (expires_at, id) index, each page after the last."""


def expire_lots(engine: Engine, run: RunChunk, at: datetime) -> int:
    """Expire every lot past its expiry; returns the number of expiry entries written.

    An allocation lot that rolls over at its boundary (`rolls_over`) is the allocation's to
    decide, however late it runs (engine/rollover.py); a source past its boundary whose hold
    ended rolls what it may and expires the rest."""
    written = 0
    last = None
    while True:
        rows = backend_for(engine).keyset_page(engine, select(Lot.expires_at, Lot.id, Lot.user_id)
                               .where(Lot.expires_at <= at, Lot.remaining > 0, Lot.rolls_over.is_(False),
                                      *after(_LOT_KEY, last))
                               .order_by(*_LOT_KEY).limit(SWEEP_CHUNK))
        if not rows:
            return written
        last = rows[-1][:2]
        owners = {row[2] for row in rows}  # a lot's owner never changes: the unlocked scan may read it
        written += run(partial(_expire_lot_chunk, lot_ids=[row[1] for row in rows], owners=owners))


def _expire_lot_chunk(uow: UnitOfWork, lot_ids: list[int], owners: set[str]) -> int:
    uow.lock(owners)
    by_account: dict[tuple[str, str], list[rules.Lot]] = defaultdict(list)
    loaded = accounts.load_lots(uow.connection, lot_ids)
    for lot in loaded:
        by_account[(lot.user_id, lot.credit_type)].append(lot)
    sources = {id(lot) for lot in rollover.held_sources(uow, loaded)}
    written = 0
    for user_id, credit_type in sorted(by_account):
        lots = [lot for lot in by_account[(user_id, credit_type)] if id(lot) not in sources]
        held = [lot for lot in by_account[(user_id, credit_type)] if id(lot) in sources]
        if held:
            account = uow.account(user_id, credit_type)
            for source in held:
                key = f"system:rollover:{source.id}:{uow.at:%Y%m%dT%H%M%S%f}:{source.remaining}"
                rollover.record(uow, rollover.roll_held(account, [source], at=uow.at, key=key), key, user_id)
            uow.rollover_lots.extend(held)
        for posting in rules.expire(uow.account(user_id, credit_type), lots, at=uow.at):
            uow.post(posting)
            uow.record_system_operation(posting.idempotency_key, "ExpireLot", user_id)
            assert posting.lot is not None and posting.lot.id is not None
            uow.emit(CreditsExpired(event_id=new_event_id(), occurred_at=uow.at, user_id=user_id,
                                    lot_id=posting.lot.id, amount=-posting.amount, credit_type=credit_type))
            written += 1
    return written


def expire_holds(engine: Engine, run: RunChunk, at: datetime) -> int:
    """Expire every active hold past its TTL; returns how many were released."""
    released = 0
    after_id = ""
    while True:
        hold_ids: list[str] = _scan(engine, select(Hold.id)
                                    .where(Hold.status == ReservationStatus.ACTIVE.value, Hold.expires_at <= at,
                                           Hold.id > after_id)
                                    .order_by(Hold.id).limit(SWEEP_CHUNK))
        if not hold_ids:
            return released
        after_id = hold_ids[-1]
        released += run(partial(_expire_hold_chunk, hold_ids=hold_ids))


def _expire_hold_chunk(uow: UnitOfWork, hold_ids: list[str]) -> int:
    uow.lock((), hold_ids=hold_ids)
    released = 0
    for hold_id in sorted(uow.holds):
        released += uow.expire_hold(uow.holds[hold_id])
    return released


def remind(engine: Engine, run: RunChunk, at: datetime, days: Sequence[int]) -> int:
    """Queue a credits.expiring event per lot entering a reminder window (`days` before its
    expiry, ascending); returns how many."""
    if not days:
        return 0
    horizon = at + timedelta(days=days[-1])
    sent = 0
    last = (at, 2**62)  # after every lot that expires at `at` or before
    while True:
        rows = backend_for(engine).keyset_page(engine, select(Lot.expires_at, Lot.id)
                               .where(Lot.expires_at <= horizon, Lot.remaining > 0, *after(_LOT_KEY, last))
                               .order_by(*_LOT_KEY).limit(SWEEP_CHUNK))
        if not rows:
            return sent
        last = rows[-1]
        sent += run(partial(_remind_chunk, lot_ids=[row[1] for row in rows], days=days))


def _remind_chunk(uow: UnitOfWork, lot_ids: list[int], days: Sequence[int]) -> int:
    """A plan allocation that rolls over is announced for what will not roll (`remaining`),
    with what will (`rolls_over`); one that rolls whole is not announced: it does not expire.
    Such a lot is not claimed either, so a later sweep sees it again should that change."""
    due: dict[tuple[int, int], rules.Lot] = {}
    loaded = accounts.load_lots(uow.connection, lot_ids)
    rolling = rollover.rolling_credits(uow.connection, loaded)
    for lot in loaded:
        expiring = lot.remaining - rolling.get(cast(int, lot.id), 0)
        day = None if lot.expires_at is None or expiring <= 0 else reminder_day(days, lot.expires_at - uow.at)
        if day is not None and lot.id is not None:
            due[(lot.id, day)] = lot
    claimed = backend_for(uow.connection).insert_absent(uow.connection, reminders_table, [
        {"lot_id": lot_id, "days_before": day, "sent_at": uow.at} for lot_id, day in due
    ])
    for lot_id, day in sorted(claimed):
        lot = due[(lot_id, day)]
        assert lot.expires_at is not None
        rolls = rolling.get(lot_id, 0)
        uow.emit(CreditsExpiring(event_id=new_event_id(), occurred_at=uow.at, user_id=lot.user_id, lot_id=lot_id,
                                 remaining=lot.remaining - rolls, expires_at=lot.expires_at, days_before=day,
                                 credit_type=lot.credit_type, rolls_over=rolls))
    return len(claimed)


def reminder_day(days: Sequence[int], left: timedelta) -> int | None:
    """The smallest reminder day whose window the lot has entered."""
    for day in days:
        if left <= timedelta(days=day):
            return day
    return None
