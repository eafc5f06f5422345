"""The invariants of a credit database, checked on a live database with set-based SQL.

Each check is one GROUP BY query, so an audit of millions of entries is a handful of table
scans rather than a Python loop over rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from sqlalchemy import and_, func, or_, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from creditworker.contract.credits import ReservationStatus
from creditworker.storage.tables import Account, Entry, Hold, Lot, Operation


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
        ):
            report.problems.extend(check(session, allow_negative))
    return report


def _accounts_match_entries(session: Session, allow_negative: bool) -> Iterator[Problem]:
    entry_sums = (
        select(
            Entry.user_id,
            func.sum(Entry.amount).label("amount"),
            func.sum(Entry.held).label("held"),
        )
        .group_by(Entry.user_id)
        .subquery()
    )
    rows = session.execute(
        select(
            Account.user_id,
            Account.balance,
            Account.reserved,
            entry_sums.c.amount,
            entry_sums.c.held,
        ).outerjoin(entry_sums, entry_sums.c.user_id == Account.user_id)
    ).all()
    for user_id, balance, reserved, amount, held in rows:
        if int(amount or 0) != balance:
            yield Problem(
                "entries_sum_to_balance",
                user_id,
                f"entries sum to {int(amount or 0)}, balance is {balance}",
            )
        if int(held or 0) != reserved:
            yield Problem(
                "holds_sum_to_reserved",
                user_id,
                f"entry holds sum to {int(held or 0)}, reserved is {reserved}",
            )
        if balance < 0 and not allow_negative:
            yield Problem(
                "no_negative_balance",
                user_id,
                f"balance is {balance} and the overage policy is reject",
            )
        if reserved < 0:
            yield Problem("no_negative_reserved", user_id, f"reserved is {reserved}")


def _lots_match_balances(session: Session, _allow_negative: bool) -> Iterator[Problem]:
    lot_sums = (
        select(Lot.user_id, func.sum(Lot.remaining).label("remaining"))
        .group_by(Lot.user_id)
        .subquery()
    )
    for user_id, balance, remaining in session.execute(
        select(Account.user_id, Account.balance, lot_sums.c.remaining).outerjoin(
            lot_sums, lot_sums.c.user_id == Account.user_id
        )
    ).all():
        expected = max(balance, 0)
        if int(remaining or 0) != expected:
            yield Problem(
                "lots_sum_to_balance",
                user_id,
                f"lots hold {int(remaining or 0)}, expected {expected}",
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
    active_holds = (
        select(Hold.user_id, func.sum(Hold.amount).label("held"))
        .where(Hold.status == ReservationStatus.ACTIVE.value)
        .group_by(Hold.user_id)
        .subquery()
    )
    for user_id, reserved, held in session.execute(
        select(Account.user_id, Account.reserved, active_holds.c.held).outerjoin(
            active_holds, active_holds.c.user_id == Account.user_id
        )
    ).all():
        if int(held or 0) != reserved:
            yield Problem(
                "active_holds_sum_to_reserved",
                user_id,
                f"active holds {int(held or 0)}, reserved {reserved}",
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
