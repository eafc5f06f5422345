"""Rollover of unused plan credits, at a period's boundary and when a hold ends after it.

A plan with a rollover limit (`rollover_max` credits or `rollover_max_percent` of the
allocation) marks each period's allocation lot `rolls_over`: the expiry sweep leaves such a
lot alone, so that the allocation, not the sweep, decides it, however late the allocation
runs. At the boundary, in the allocation's own unit of work (before the new period is
granted), `rules.roll_over` moves what is free of it, up to the limit, into a new lot linked
to its source and expires the rest (`rollover_forfeited`); what a hold still backs stays on
the source with what may still roll, and rolls (or expires at once) when the hold ends:
released or committed (`after_hold`), or by the expiry sweep (`roll_held`) after a hold
ran out or once other credits back it (holds are not tied to lots: the new period's grant
frees the source's credits). Clearing `rolls_over` in the same transaction is what makes a boundary roll once.

Which plan decides at a boundary: the one in force during the period that ends (an upgrade
takes effect at once, so its rule decides; a downgrade only at the boundary, so the old
plan's does). Rolled lots are left as they are by any plan change. A subscription that
ends rolls nothing: its allocation lots lose `rolls_over` and expire as any lot does.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from datetime import datetime
from typing import cast

from sqlalchemy import Connection, Table, select

from creditworker.contract.credits import DEFAULT_CREDIT_TYPE, EntryKind
from creditworker.contract.events import CreditsExpired
from creditworker.contract.periods import period_start
from creditworker.engine import account as accounts
from creditworker.engine import rules
from creditworker.engine.unit_of_work import UnitOfWork, new_event_id
from creditworker.storage.tables import Lot as LotRow
from creditworker.storage.tables import PlanRow, SubscriptionRow

lots_table = cast(Table, LotRow.__table__)
plans_table = cast(Table, PlanRow.__table__)
subscriptions_table = cast(Table, SubscriptionRow.__table__)


def rolls(plan: PlanRow) -> bool:
    """True when the plan rolls anything over (a limit above zero)."""
    return bool(plan.rollover_max or plan.rollover_max_percent)


def mark(lot: rules.Lot, plan: PlanRow, period_end: datetime) -> None:
    """A new allocation lot rolls over at its boundary when its plan says so and it lives
    until the boundary (a `validity_days` shorter or longer than the period opts out)."""
    lot.rolls_over = rolls(plan) and lot.expires_at == period_end


def rolling_sources(uow: UnitOfWork, user_ids: Collection[str]) -> dict[str, list[rules.Lot]]:
    """Each user's allocation lots waiting for their boundary (one query for all). Spent
    ones too: their flag is cleared at the boundary, so that a refund after it gives back
    credits that expire, not credits that wait for the next boundary."""
    if not user_ids:
        return {}
    ids = list(uow.connection.scalars(select(lots_table.c.id).where(
        lots_table.c.user_id.in_(list(user_ids)), lots_table.c.rolls_over.is_(True),
        lots_table.c.credit_type == DEFAULT_CREDIT_TYPE)))
    found: dict[str, list[rules.Lot]] = {}
    for lot in _shared(uow, accounts.load_lots(uow.connection, ids)):
        found.setdefault(lot.user_id, []).append(lot)
    return found


def rolling_credits(connection: Connection, lots: Iterable[rules.Lot]) -> dict[int, int]:
    """Of `lots`, those that roll over (`rolls_over`): how many of each one's credits would roll
    at the boundary if nothing else changed (no more draws, holds ended), so that a reminder
    announces only the rest as expiring (tests/subscriptions/test_rollover_reminders.py).

    As the boundary decides it: the limit of the plan in force (the subscription's `plan_id`),
    shared by the user's allocation lots in the order they were granted; none when the
    subscription ends at the period's end, or has ended."""
    ids = [lot.id for lot in lots if lot.id is not None and lot.credit_type == DEFAULT_CREDIT_TYPE]
    if not ids:
        return {}
    # `rolls_over` is not among the columns a loaded lot carries: read it for these lots.
    users = set(connection.scalars(select(lots_table.c.user_id).where(
        lots_table.c.id.in_(ids), lots_table.c.rolls_over.is_(True))))
    if not users:
        return {}
    limits = {row.user_id: row for row in connection.execute(select(
        subscriptions_table.c.user_id, subscriptions_table.c.cancel_at_period_end,
        plans_table.c.rollover_max, plans_table.c.rollover_max_percent,
    ).join(plans_table, plans_table.c.id == subscriptions_table.c.plan_id).where(
        subscriptions_table.c.user_id.in_(sorted(users)), subscriptions_table.c.status == "active"))}
    sources: dict[str, list[tuple[int, int, int]]] = {}
    for lot_id, user_id, amount, remaining in connection.execute(select(
            lots_table.c.id, lots_table.c.user_id, lots_table.c.amount, lots_table.c.remaining).where(
            lots_table.c.user_id.in_(sorted(users)), lots_table.c.rolls_over.is_(True),
            lots_table.c.credit_type == DEFAULT_CREDIT_TYPE).order_by(lots_table.c.id)):
        sources.setdefault(user_id, []).append((lot_id, amount, remaining))
    rolling: dict[int, int] = {}
    for user_id, own in sources.items():
        plan = limits.get(user_id)
        if plan is None or plan.cancel_at_period_end:
            left = 0
        elif plan.rollover_max is not None:
            left = plan.rollover_max
        else:
            left = sum(amount for _id, amount, _left in own) * (plan.rollover_max_percent or 0) // 100
        for lot_id, _amount, remaining in own:
            rolling[lot_id] = min(max(remaining, 0), left)
            left -= rolling[lot_id]
    return rolling


def at_boundary(uow: UnitOfWork, subscription_id: int, user_id: str, plan: PlanRow, anchor_at: datetime,
                period_index: int, sources: list[rules.Lot]) -> None:
    """Roll the allocation of period `period_index` (under `plan`, anchored at `anchor_at`)
    into the next: rolled credits expire `rollover_expires_after_periods` periods after the
    boundary (one if unset)."""
    if not sources:
        return
    boundary = period_start(anchor_at, plan.billing_period, period_index + 1)
    expires_at = period_start(anchor_at, plan.billing_period,
                              period_index + 1 + (plan.rollover_expires_after_periods or 1))
    limit = rules.rollover_limit(sources, max_credits=plan.rollover_max, max_percent=plan.rollover_max_percent)
    key = f"subscription:{subscription_id}:rollover:{boundary.isoformat()}"
    postings = rules.roll_over(uow.account(user_id), sources, limit, at=uow.at, key=key, expires_at=expires_at)
    _post(uow, postings, key, user_id)
    uow.rollover_lots.extend(sources)


def forgo(uow: UnitOfWork, sources: Iterable[rules.Lot]) -> None:
    """The subscription ended: its allocation lots expire as any lot does, nothing rolls."""
    for lot in sources:
        lot.rolls_over = False
        uow.rollover_lots.append(lot)


def after_hold(uow: UnitOfWork, account: rules.Account, key: str) -> None:
    """A hold ended (released or committed): credits it backed on a source past its boundary
    roll now (under the source's `rollover_left`) or expire at once, under the hold's key.

    With the account's lots loaded (a commit), a source would be among them (its expiry is
    past, and the lots' read sends every lot past its expiry besides the prefix a draw can
    reach, even for a commit that draws nothing): no query unless one is."""
    at = uow.at
    if account.lots_loaded and not any(lot.expires_at is not None and lot.expires_at <= at
                                       for lot in account.lots):
        return
    found = list(uow.connection.execute(select(
        lots_table.c.id, lots_table.c.rollover_left, lots_table.c.rollover_expires_at).where(
        lots_table.c.user_id == account.user_id, lots_table.c.credit_type == account.credit_type,
        lots_table.c.rollover_left.is_not(None), lots_table.c.remaining > 0)))
    if not found:
        return
    bookkeeping = {row[0]: (row[1], row[2]) for row in found}
    sources = _with_bookkeeping(uow, _shared(uow, accounts.load_lots(uow.connection, list(bookkeeping))),
                                bookkeeping)
    for posting in roll_held(account, [source for source in sources if source.rollover_left is not None],
                             at=at, key=key):
        _post_one(uow, posting)  # under the hold's own operation
    uow.rollover_lots.extend(sources)


def roll_held(account: rules.Account, sources: list[rules.Lot], *, at: datetime, key: str) -> list[rules.Posting]:
    """What of each source (past its boundary, `rollover_left` set) no hold backs any more
    rolls up to what is left of its limit, into a lot that expires when the first did."""
    postings: list[rules.Posting] = []
    for source in sources:
        assert source.rollover_left is not None and source.rollover_expires_at is not None
        postings.extend(rules.roll_over(account, [source], source.rollover_left, at=at, key=key,
                                        expires_at=source.rollover_expires_at))
    return postings


def held_sources(uow: UnitOfWork, lots: list[rules.Lot]) -> list[rules.Lot]:
    """Of `lots` (loaded by a sweep), the sources past their boundary, with their bookkeeping."""
    ids = [lot.id for lot in lots if lot.id is not None]
    if not ids:
        return []
    bookkeeping = {row[0]: (row[1], row[2]) for row in uow.connection.execute(select(
        lots_table.c.id, lots_table.c.rollover_left, lots_table.c.rollover_expires_at).where(
        lots_table.c.id.in_(ids), lots_table.c.rollover_left.is_not(None)))}
    return _with_bookkeeping(uow, [lot for lot in lots if lot.id in bookkeeping], bookkeeping)


def _with_bookkeeping(uow: UnitOfWork, sources: list[rules.Lot],
                      bookkeeping: dict[int, tuple[int | None, datetime | None]]) -> list[rules.Lot]:
    """The stored bookkeeping on lots this unit of work has not changed yet (what it
    changed, it knows better than the database)."""
    changed = {id(lot) for lot in uow.rollover_lots}
    for source in sources:
        if id(source) not in changed:
            source.rollover_left, source.rollover_expires_at = bookkeeping[cast(int, source.id)]
    return sources


def record(uow: UnitOfWork, postings: list[rules.Posting], key: str, user_id: str) -> None:
    """Post a sweep's roll under its own system operation (so the entries have one)."""
    _post(uow, postings, key, user_id)


def _post(uow: UnitOfWork, postings: list[rules.Posting], key: str, user_id: str) -> None:
    """The postings under one system operation; what was forfeited is `credits.expired`,
    as the expiry sweep says it."""
    if not postings:
        return
    uow.record_system_operation(key, "RollOver", user_id)
    for posting in postings:
        _post_one(uow, posting)


def _post_one(uow: UnitOfWork, posting: rules.Posting) -> None:
    uow.post(posting)
    if posting.kind == EntryKind.EXPIRE and posting.lot is not None and posting.lot.id is not None:
        uow.emit(CreditsExpired(event_id=new_event_id(), occurred_at=uow.at, user_id=posting.user_id,
                                lot_id=posting.lot.id, amount=-posting.amount, credit_type=posting.credit_type))


def _shared(uow: UnitOfWork, lots: list[rules.Lot]) -> list[rules.Lot]:
    """The unit of work's own objects for lots it loaded already (one object per lot, or
    the writer would write two versions of it)."""
    loaded: dict[int | None, rules.Lot] = {lot.id: lot for lot in uow.rollover_lots}
    for account in uow.accounts.values():
        if account.lots_loaded:
            loaded.update((lot.id, lot) for lot in account.lots)
    return [loaded.get(lot.id, lot) for lot in lots]
