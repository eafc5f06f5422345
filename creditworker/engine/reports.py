"""Reads over the ledger: a balance at any moment, and usage per period.

Both read what the ledger already holds: every entry has `balance_after`, every hold its
`created_at`, `finalized_at` and `expires_at`. Nothing here writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from creditworker.contract.credits import DEFAULT_CREDIT_TYPE, EntryKind, Granularity, UsagePeriod
from creditworker.storage.reports import period_start
from creditworker.storage.tables import Entry, Hold, Lot

USAGE_COLUMNS: dict[str, str] = {
    "add": "granted",
    "deduct": "consumed",
    "commit": "consumed",
    "expire": "expired",
    "void": "voided",
    "voided": "voided",
    "refund": "refunded",
    "refunded": "refunded",
}
"""Which column of a usage report an entry kind counts in (as a positive number of credits);
the one place to extend when the ledger gets a new kind. Kinds not named here (holds and
their releases, which move no balance) still show in `UsagePeriod.by_kind`."""


def balance_at(session: Session, user_id: str, at: datetime,
               credit_type: str = DEFAULT_CREDIT_TYPE) -> tuple[int, int]:
    """(balance, reserved) of an account's `credit_type` at `at`.

    The balance is `balance_after` of its last entry at or before `at` (one probe of the
    `(user_id, created_at, id)` index); reserved is what its holds held then: created at or
    before `at`, not yet committed or released, and not past their expiry (a hold past its
    TTL stops counting at once, as in the engine's reads now)."""
    balance = session.scalar(
        select(Entry.balance_after)
        .where(Entry.user_id == user_id, Entry.created_at <= at, Entry.credit_type == credit_type)
        .order_by(Entry.created_at.desc(), Entry.id.desc())
        .limit(1)
    )
    reserved = session.scalar(
        select(func.coalesce(func.sum(Hold.amount), 0)).where(
            Hold.user_id == user_id, Hold.credit_type == credit_type, Hold.created_at <= at,
            Hold.expires_at > at,
            or_(Hold.finalized_at.is_(None), Hold.finalized_at > at),
        )
    )
    return int(balance or 0), int(reserved or 0)


def pending_at(session: Session, user_id: str, at: datetime, credit_type: str | None = None) -> dict[str, int]:
    """Per credit type (or `credit_type`'s only), the credits of an account that were granted
    by `at` but not effective yet at `at` (in the balance, not available). The one answer for
    now and for a past moment.

    A grant not yet effective is drawn by nothing but the debt it paid off when it was made
    (its `add` entry's balance tells how much: `rules.grant`) and the voids and expiries of
    it, each a ledger entry of its own."""
    query = select(Lot.id, Lot.credit_type, Lot.amount, Entry.balance_after).outerjoin(
        Entry, and_(Entry.lot_id == Lot.id, Entry.kind == EntryKind.ADD.value),
    ).where(Lot.user_id == user_id, Lot.created_at <= at, Lot.effective_at > at)
    if credit_type is not None:
        query = query.where(Lot.credit_type == credit_type)
    waiting = session.execute(query).all()
    if not waiting:
        return {}
    taken = dict(session.execute(
        select(Entry.lot_id, func.sum(Entry.amount)).where(
            Entry.user_id == user_id, Entry.lot_id.in_([row.id for row in waiting]),
            Entry.kind.in_([EntryKind.VOID.value, EntryKind.EXPIRE.value]), Entry.created_at <= at,
        ).group_by(Entry.lot_id)
    ).all())
    pending: dict[str, int] = {}
    for lot_id, lot_type, amount, balance_after in waiting:
        debt_paid = 0 if balance_after is None else min(amount, max(0, amount - balance_after))
        pending[lot_type] = pending.get(lot_type, 0) + amount - debt_paid + int(taken.get(lot_id) or 0)
    return pending


def usage(
    session: Session, user_id: str | None, start: datetime, end: datetime,
    granularity: Granularity, credit_type: str | None = None,
) -> list[UsagePeriod]:
    """Per period of [start, end), the signed sum of `amount` per entry kind, in one query
    grouped by period and kind; one account's, or every account's when `user_id` is None;
    one credit type's, or all. A second query reads the draws of the window's deductions,
    commits and refunds, for what the consumed credits cost (`consumed_cost`)."""
    dialect = session.get_bind().dialect.name
    period = period_start(Entry.created_at, granularity, dialect).label("period")
    window = select(period, Entry.kind.label("kind"), Entry.amount.label("amount")).where(
        Entry.created_at >= start, Entry.created_at < end)
    if user_id is not None:
        window = window.where(Entry.user_id == user_id)
    if credit_type is not None:
        window = window.where(Entry.credit_type == credit_type)
    rows = window.subquery()  # grouped outside, so the period is one expression on every dialect
    totals = session.execute(
        select(rows.c.period, rows.c.kind, func.sum(rows.c.amount))
        .group_by(rows.c.period, rows.c.kind)
        .order_by(rows.c.period, rows.c.kind)
    )
    drawn = window.with_only_columns(period, Entry.kind, Entry.draws).where(
        Entry.kind.in_(COST_SIGN), Entry.draws.is_not(None))
    costs: dict[str, dict[str, Decimal]] = {}
    for when, kind, draws in session.execute(drawn):
        for draw in _json_list(draws):
            if "unit_cost" in draw:
                per_currency = costs.setdefault(str(when)[:10], {})
                value = Decimal(draw["unit_cost"]) * int(draw["amount"]) * COST_SIGN[kind]
                per_currency[draw["currency"]] = per_currency.get(draw["currency"], Decimal(0)) + value
    return periods(((str(when), kind, int(total)) for when, kind, total in totals), costs)


COST_SIGN = {"deduct": 1, "commit": 1, "refund": -1}
"""The entry kinds whose draws value consumption: a refund gives back what it cost."""


def _json_list(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    return list(json.loads(value) if isinstance(value, str | bytes) else value)


def periods(totals: Iterable[tuple[str, str, int]],
            costs: dict[str, dict[str, Decimal]] | None = None) -> list[UsagePeriod]:
    """Rows of (period as `YYYY-MM-DD`, kind, signed total) as one `UsagePeriod` each,
    oldest first; only periods that have entries appear. `costs`: what was consumed per
    period (`YYYY-MM-DD`) and currency."""
    by_period: dict[date, dict[str, int]] = {}
    for period, kind, total in totals:
        kinds = by_period.setdefault(date.fromisoformat(period[:10]), {})
        kinds[kind] = kinds.get(kind, 0) + total
    report = []
    for period, kinds in sorted(by_period.items()):
        columns: dict[str, int] = {}
        for kind, total in kinds.items():
            column = USAGE_COLUMNS.get(kind)
            if column is not None:
                columns[column] = columns.get(column, 0) + abs(total)
        cost = (costs or {}).get(period.isoformat(), {})
        report.append(UsagePeriod(period=period, by_kind=kinds, consumed_cost=cost, **columns))
    return report
