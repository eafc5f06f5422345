"""The invariants of a credit database, checked on a live database with set-based SQL.

Each check is one GROUP BY query, so an audit of millions of entries is a handful of table
scans rather than a Python loop over rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from creditworker.contract.credits import DEFAULT_CREDIT_TYPE, ReservationStatus
from creditworker.storage.tables import Account, Entry, Hold, Lot, Operation, TopupRow, TypeBalance


@dataclass(frozen=True)
class Problem:
    check: str
    user_id: str | None
    detail: str


@dataclass
class AuditReport:
    accounts_checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def audit(engine: Engine, *, allow_negative: bool = False) -> AuditReport:
    """Check every invariant; an empty `problems` list means the database is consistent."""
    report = AuditReport()
    with Session(engine) as session:
        report.accounts_checked = int(
            session.scalar(select(func.count()).select_from(Account)) or 0
        )
        for check in (
            _accounts_match_entries,
            _lots_match_balances,
            _lots_in_range,
            _holds_match_reserved,
            _hold_states,
            _entries_have_operations,
            _refunds_within_charge,
            _topups_granted_once,
        ):
            report.problems.extend(check(session, allow_negative))
    return report


Totals = dict[tuple[str, str], tuple[int, int]]


def _type_totals(session: Session) -> Totals:
    """(balance, reserved) per account and credit type: the default type's on `accounts`,
    every other type's in `credit_balances`."""
    totals: Totals = {
        (user_id, DEFAULT_CREDIT_TYPE): (balance, reserved)
        for user_id, balance, reserved in session.execute(
            select(Account.user_id, Account.balance, Account.reserved)).all()
    }
    totals.update(((user_id, credit_type), (balance, reserved)) for user_id, credit_type, balance, reserved
                  in session.execute(select(TypeBalance.user_id, TypeBalance.credit_type,
                                            TypeBalance.balance, TypeBalance.reserved)).all())
    return totals


def _sums(session: Session, *columns: Any, where: Any = None) -> dict[tuple[str, str], tuple[int, ...]]:
    """Sums of `columns` per (user_id, credit_type) of their table, in one GROUP BY."""
    table = columns[0].class_
    query = select(table.user_id, table.credit_type, *(func.sum(column) for column in columns))
    if where is not None:
        query = query.where(where)
    return {(user_id, credit_type): tuple(int(value or 0) for value in values)
            for user_id, credit_type, *values in session.execute(
                query.group_by(table.user_id, table.credit_type)).all()}


def _named(user_id: str, credit_type: str) -> str:
    return "" if credit_type == DEFAULT_CREDIT_TYPE else f"{credit_type}: "


def _accounts_match_entries(session: Session, allow_negative: bool) -> Iterator[Problem]:
    """Per account and credit type: the entries sum to its balance and reserved."""
    totals = _type_totals(session)
    entry_sums = _sums(session, Entry.amount, Entry.held)
    for user_id, credit_type in sorted(totals.keys() | entry_sums.keys()):
        balance, reserved = totals.get((user_id, credit_type), (0, 0))
        amount, held = entry_sums.get((user_id, credit_type), (0, 0))
        named = _named(user_id, credit_type)
        if amount != balance:
            yield Problem(
                "entries_sum_to_balance",
                user_id,
                f"{named}entries sum to {amount}, balance is {balance}",
            )
        if held != reserved:
            yield Problem(
                "holds_sum_to_reserved",
                user_id,
                f"{named}entry holds sum to {held}, reserved is {reserved}",
            )
        if balance < 0 and not allow_negative:
            yield Problem(
                "no_negative_balance",
                user_id,
                f"{named}balance is {balance} and the overage policy is reject",
            )
        if reserved < 0:
            yield Problem("no_negative_reserved", user_id, f"{named}reserved is {reserved}")


def _lots_match_balances(session: Session, _allow_negative: bool) -> Iterator[Problem]:
    """Per account and credit type: its lots hold what its balance says (none below zero)."""
    totals = _type_totals(session)
    lot_sums = _sums(session, Lot.remaining)
    for user_id, credit_type in sorted(totals.keys() | lot_sums.keys()):
        balance, _reserved = totals.get((user_id, credit_type), (0, 0))
        (remaining,) = lot_sums.get((user_id, credit_type), (0,))
        expected = max(balance, 0)
        if remaining != expected:
            yield Problem(
                "lots_sum_to_balance",
                user_id,
                f"{_named(user_id, credit_type)}lots hold {remaining}, expected {expected}",
            )


def _lots_in_range(session: Session, _allow_negative: bool) -> Iterator[Problem]:
    for lot_id, user_id, amount, remaining in session.execute(
        select(Lot.id, Lot.user_id, Lot.amount, Lot.remaining).where(
            or_(Lot.remaining < 0, Lot.remaining > Lot.amount)
        )
    ).all():
        yield Problem(
            "lot_remaining_in_range", user_id, f"lot {lot_id} has {remaining} of {amount}"
        )


def _holds_match_reserved(session: Session, _allow_negative: bool) -> Iterator[Problem]:
    """Per account and credit type: its active holds add up to its reserved."""
    totals = _type_totals(session)
    held_sums = _sums(session, Hold.amount, where=Hold.status == ReservationStatus.ACTIVE.value)
    for user_id, credit_type in sorted(totals.keys() | held_sums.keys()):
        _balance, reserved = totals.get((user_id, credit_type), (0, 0))
        (held,) = held_sums.get((user_id, credit_type), (0,))
        if held != reserved:
            yield Problem(
                "active_holds_sum_to_reserved",
                user_id,
                f"{_named(user_id, credit_type)}active holds {held}, reserved {reserved}",
            )


def _hold_states(session: Session, _allow_negative: bool) -> Iterator[Problem]:
    statuses = [status.value for status in ReservationStatus]
    active = ReservationStatus.ACTIVE.value
    for hold_id, user_id, status in session.execute(
        select(Hold.id, Hold.user_id, Hold.status).where(
            or_(
                Hold.status.not_in(statuses),
                and_(Hold.status == active, Hold.finalized_at.is_not(None)),
                and_(Hold.status != active, Hold.finalized_at.is_(None)),
            )
        )
    ).all():
        yield Problem(
            "reservation_state",
            user_id,
            f"reservation {hold_id} is {status!r} with an inconsistent final time",
        )


def _entries_have_operations(session: Session, _allow_negative: bool) -> Iterator[Problem]:
    for user_id, key in session.execute(
        select(Entry.user_id, Entry.idempotency_key)
        .outerjoin(Operation, Operation.idempotency_key == Entry.idempotency_key)
        .where(Operation.idempotency_key.is_(None))
        .distinct()
    ).all():
        yield Problem("entry_has_operation", user_id, f"entry key {key!r} has no operation row")


def _refunds_within_charge(session: Session, _allow_negative: bool) -> Iterator[Problem]:
    """No deduction or commit is refunded above what it charged, across all its refunds."""
    refunded = (
        select(Entry.refund_of, func.sum(Entry.amount).label("refunded"))
        .where(Entry.refund_of.is_not(None))
        .group_by(Entry.refund_of)
        .subquery()
    )
    for entry_id, user_id, amount, total in session.execute(
        select(Entry.id, Entry.user_id, Entry.amount, refunded.c.refunded)
        .join(refunded, refunded.c.refund_of == Entry.id)
        .where(refunded.c.refunded > -Entry.amount)
    ).all():
        yield Problem(
            "refund_within_charge", user_id, f"entry {entry_id} charged {-amount}, refunded {total}"
        )


def _topups_granted_once(session: Session, _allow_negative: bool) -> Iterator[Problem]:
    """Auto top-ups (issue 29): a succeeded top-up has exactly one lot of its credits, under
    its idempotency key; a `top_up` lot belongs to a succeeded top-up (paid for, once)."""
    granted = {key: (user_id, int(count), int(amount or 0)) for key, user_id, count, amount in session.execute(
        select(Lot.idempotency_key, Lot.user_id, func.count(), func.sum(Lot.amount))
        .where(Lot.source == "top_up").group_by(Lot.idempotency_key, Lot.user_id)).all()}
    for key, user_id, credits, state in session.execute(
            select(TopupRow.idempotency_key, TopupRow.user_id, TopupRow.credits, TopupRow.state)).all():
        lots = granted.pop(key, None)
        if state == "succeeded" and (lots is None or lots[1:] != (1, credits)):
            found = "no lot" if lots is None else f"{lots[1]} lots of {lots[2]} credits"
            yield Problem("topup_granted_once", user_id, f"top-up {key} succeeded for {credits} credits: {found}")
        elif state != "succeeded" and lots is not None:
            yield Problem("topup_granted_once", user_id, f"top-up {key} is {state} but was granted")
    for key, (user_id, _count, _amount) in sorted(granted.items()):
        yield Problem("topup_granted_once", user_id, f"a top_up lot under {key} has no top-up")

