"""The console's read-only SQL: pages of rows on the tables' indexes, never a whole history.

The engine's public reads cover balances and single records; the console also needs
paging with filters and prefix search, so it reads the tables directly with
plain SQLAlchemy Core `SELECT`s. It never writes: every change goes through the engine.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from creditworker.contract.credits import PROMOTIONAL_SOURCES, ReservationStatus
from creditworker.storage.tables import (
    Account,
    AutoTopupRuleRow,
    Entry,
    Hold,
    Lot,
    OutboxEvent,
    SubscriptionRow,
    TopupRow,
    TypeBalance,
)

LEDGER_PAGE = 50
CSV_CHUNK = 2000


def _escape_like(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def search_accounts(engine: Engine, prefix: str, limit: int = 50) -> list[dict[str, Any]]:
    """Accounts whose user id starts with `prefix`, in id order (a range on the primary key)."""
    query = (
        select(Account.user_id, Account.balance, Account.reserved, Account.updated_at)
        .where(Account.user_id.like(_escape_like(prefix) + "%", escape="\\"))
        .order_by(Account.user_id)
        .limit(limit)
    )
    with engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(query)]


def recent_accounts(engine: Engine, limit: int = 20) -> list[dict[str, Any]]:
    """The accounts with the newest ledger entries: the entries' primary key read backwards
    (accounts.updated_at has no index)."""
    with engine.connect() as connection:
        recent_ids = connection.execute(
            select(Entry.user_id, Entry.created_at).order_by(Entry.id.desc()).limit(limit * 20)
        ).all()
        seen: dict[str, datetime] = {}
        for user_id, created_at in recent_ids:
            if user_id not in seen:
                seen[user_id] = created_at
            if len(seen) >= limit:
                break
        if not seen:
            return []
        rows = connection.execute(
            select(Account.user_id, Account.balance, Account.reserved)
            .where(Account.user_id.in_(list(seen)))
        ).all()
    by_id = {row.user_id: dict(row._mapping) for row in rows}
    return [
        {**by_id[user_id], "updated_at": at} for user_id, at in seen.items() if user_id in by_id
    ]


def account_threshold(engine: Engine, user_id: str) -> int | None:
    with engine.connect() as connection:
        return connection.scalar(
            select(Account.low_credit_threshold).where(Account.user_id == user_id)
        )


def type_thresholds(engine: Engine, user_id: str) -> dict[str, int | None]:
    """The low-credit threshold of each credit type other than the default (migration 0012)."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(TypeBalance.credit_type, TypeBalance.low_credit_threshold)
            .where(TypeBalance.user_id == user_id)
        ).all()
    return {row.credit_type: row.low_credit_threshold for row in rows}


def topup_rules(engine: Engine, user_id: str) -> list[AutoTopupRuleRow]:
    """The account's auto top-up rules, one per credit type."""
    with engine.connect() as connection:
        return list(connection.execute(select(AutoTopupRuleRow.__table__)
                                       .where(AutoTopupRuleRow.user_id == user_id)
                                       .order_by(AutoTopupRuleRow.credit_type)).all())


def recent_topups(engine: Engine, user_id: str, limit: int = 10) -> list[TopupRow]:
    """The account's latest top-ups, newest first, whatever their state."""
    with engine.connect() as connection:
        return list(connection.execute(select(TopupRow.__table__).where(TopupRow.user_id == user_id)
                                       .order_by(TopupRow.id.desc()).limit(limit)).all())


def live_lots(engine: Engine, user_id: str, limit: int = 100) -> list[dict[str, Any]]:
    """Lots with credits left, by credit type, each in draw-down order (the (user_id,
    remaining) index)."""
    query = (
        select(Lot.id, Lot.amount, Lot.remaining, Lot.source, Lot.priority, Lot.expires_at,
               Lot.created_at, Lot.credit_type, Lot.effective_at, Lot.cost_basis_amount,
               Lot.cost_basis_currency)
        .where(Lot.user_id == user_id, Lot.remaining > 0)
        .order_by(Lot.credit_type, Lot.priority, Lot.expires_at.is_(None), Lot.expires_at,
                  Lot.source.not_in(sorted(PROMOTIONAL_SOURCES)), Lot.id)
        .limit(limit)
    )
    with engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(query)]


def active_holds(engine: Engine, user_id: str, limit: int = 100) -> list[dict[str, Any]]:
    """Active holds, soonest to expire first (the (status, expires_at) index: active holds
    are few, since each lives at most 7 days)."""
    query = (
        select(Hold.id, Hold.amount, Hold.expires_at, Hold.created_at, Hold.idempotency_key)
        .where(Hold.status == ReservationStatus.ACTIVE.value, Hold.user_id == user_id)
        .order_by(Hold.expires_at)
        .limit(limit)
    )
    with engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(query)]


@dataclass(frozen=True)
class LedgerFilter:
    """Which entries of one account a ledger page or export shows."""

    user_id: str
    kinds: Sequence[str] = ()
    since: datetime | None = None
    until: datetime | None = None

    def where(self) -> list[Any]:
        clauses: list[Any] = [Entry.user_id == self.user_id]
        if self.kinds:
            clauses.append(Entry.kind.in_(list(self.kinds)))
        if self.since is not None:
            clauses.append(Entry.created_at >= self.since)
        if self.until is not None:
            clauses.append(Entry.created_at < self.until)
        return clauses


_ENTRY_COLUMNS = (
    Entry.id, Entry.kind, Entry.amount, Entry.held, Entry.balance_after, Entry.reserved_after,
    Entry.lot_id, Entry.reservation_id, Entry.description, Entry.idempotency_key,
    Entry.created_at,
)


@dataclass(frozen=True)
class LedgerPage:
    entries: list[dict[str, Any]]
    older_than: int | None
    """Pass as `before` for the next (older) page; None on the last page."""
    newer_than: int | None
    """Pass as `after` for the previous (newer) page; None on the newest page."""


def ledger_page(
    engine: Engine, wanted: LedgerFilter, *, before: int | None = None, after: int | None = None,
    size: int = LEDGER_PAGE,
) -> LedgerPage:
    """One page, newest first, by keyset on the (user_id, id) index: the same cost on the
    first page as on the thousandth."""
    clauses = wanted.where()
    if after is not None:
        query = select(*_ENTRY_COLUMNS).where(*clauses, Entry.id > after)
        query = query.order_by(Entry.id.asc()).limit(size + 1)
    else:
        if before is not None:
            clauses.append(Entry.id < before)
        query = select(*_ENTRY_COLUMNS).where(*clauses).order_by(Entry.id.desc()).limit(size + 1)
    with engine.connect() as connection:
        rows = [dict(row._mapping) for row in connection.execute(query)]
    more = len(rows) > size
    rows = rows[:size]
    if after is not None:
        rows.reverse()
        older = rows[-1]["id"] if rows else None
        newer = rows[0]["id"] if rows and more else None
    else:
        older = rows[-1]["id"] if rows and more else None
        newer = rows[0]["id"] if rows and before is not None else None
    return LedgerPage(entries=rows, older_than=older, newer_than=newer)


def ledger_rows(engine: Engine, wanted: LedgerFilter) -> Iterator[dict[str, Any]]:
    """Every matching entry, oldest first, in chunks (for the CSV export)."""
    last_id = 0
    while True:
        query = (
            select(*_ENTRY_COLUMNS).where(*wanted.where(), Entry.id > last_id)
            .order_by(Entry.id).limit(CSV_CHUNK)
        )
        with engine.connect() as connection:
            rows = [dict(row._mapping) for row in connection.execute(query)]
        yield from rows
        if len(rows) < CSV_CHUNK:
            return
        last_id = rows[-1]["id"]


def subscriber_counts(engine: Engine) -> dict[int, int]:
    """Active subscriptions per plan id."""
    query = (
        select(SubscriptionRow.plan_id, func.count())
        .where(SubscriptionRow.status == "active")
        .group_by(SubscriptionRow.plan_id)
    )
    with engine.connect() as connection:
        return {int(plan_id): int(count) for plan_id, count in connection.execute(query)}


@dataclass(frozen=True)
class OutboxState:
    unpublished: int
    oldest_unpublished_at: datetime | None

    def lag_seconds(self, now: datetime) -> float:
        if self.oldest_unpublished_at is None:
            return 0.0
        return max(0.0, (now - self.oldest_unpublished_at).total_seconds())


def outbox_state(engine: Engine) -> OutboxState:
    """Unpublished events and the oldest one (the (published_at, id) index)."""
    pending = OutboxEvent.published_at.is_(None)
    with engine.connect() as connection:
        oldest = connection.scalar(
            select(OutboxEvent.created_at).where(pending).order_by(OutboxEvent.id).limit(1)
        )
        count = connection.scalar(select(func.count()).select_from(OutboxEvent).where(pending))
    return OutboxState(unpublished=int(count or 0), oldest_unpublished_at=oldest)


def recent_events(engine: Engine, limit: int = 20) -> list[dict[str, Any]]:
    query = (
        select(OutboxEvent.id, OutboxEvent.routing_key, OutboxEvent.payload,
               OutboxEvent.created_at, OutboxEvent.published_at)
        .order_by(OutboxEvent.id.desc()).limit(limit)
    )
    with engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(query)]
