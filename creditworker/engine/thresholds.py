"""Low-credit thresholds per account and credit type: absolute, or a percentage of the last grant.

A percentage is a rule (`credit_alert_rules`, per account and type) turned into that type's
absolute `low_credit_threshold` whenever a grant of the type lands (and when the rule is set,
from the type's newest lot), so that evaluating alerts on every deduct reads nothing more
than it did. The rules are read once per unit of work, only by one that grants to an
account and type that have a threshold of their own. The default type's threshold and flag
live on `accounts`, every other type's on its `credit_balances` row (migration 0012).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from datetime import datetime
from typing import Protocol, cast

from sqlalchemy import Table, delete, insert, select, update
from sqlalchemy.engine import Connection

from creditworker.contract.credits import LowCreditThreshold, SetLowCreditThreshold
from creditworker.engine.rules import Account
from creditworker.storage.tables import CreditAlertRuleRow, Lot

rules_table = cast(Table, CreditAlertRuleRow.__table__)
lots_table = cast(Table, Lot.__table__)


class UnitOfWork(Protocol):
    """`UnitOfWork` as this module uses it (not imported: it imports this module)."""

    connection: Connection
    at: datetime

    def lock(self, user_ids: Iterable[str]) -> set[str]: ...

    def account(self, user_id: str, credit_type: str = ...) -> Account: ...

    def touch(self, account: Account) -> None: ...


def from_percent(percent: int, grant: int) -> int:
    """`percent` of `grant`, rounded up: 10% of 15 is 2, so a threshold is never 0 by rounding."""
    return -(-percent * grant // 100)


def percent_rules(connection: Connection, pairs: Collection[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """The percentage rules of the (user id, credit type) pairs given, in one query."""
    if not pairs:
        return {}
    wanted = set(pairs)
    rows = connection.execute(
        select(rules_table.c.user_id, rules_table.c.credit_type, rules_table.c.low_threshold_percent)
        .where(rules_table.c.user_id.in_(sorted({user_id for user_id, _type in wanted})),
               rules_table.c.credit_type.in_(sorted({credit_type for _user, credit_type in wanted})))).all()
    return {(row.user_id, row.credit_type): row.low_threshold_percent for row in rows
            if (row.user_id, row.credit_type) in wanted}


def set_low_threshold(request: SetLowCreditThreshold, uow: UnitOfWork, _key: str) -> LowCreditThreshold:
    """Set the threshold of one account in one credit type, re-arming that type's flag, in
    `uow` (`CreditService.set_low_credit_threshold` runs it once per idempotency key).

    An account with a rule always has a threshold (0 until its first grant of the type): a
    grant to an account and type without one needs no look at the rules (`UnitOfWork`)."""
    user_id, credit_type, percent = request.user_id, request.credit_type, request.percent
    uow.lock([user_id])
    account = uow.account(user_id, credit_type)
    _store_rule(uow.connection, user_id, credit_type, percent, uow.at)
    threshold = request.threshold
    if percent is not None:
        newest = uow.connection.scalar(
            select(lots_table.c.amount)
            .where(lots_table.c.user_id == user_id, lots_table.c.credit_type == credit_type)
            .order_by(lots_table.c.id.desc()).limit(1))
        threshold = from_percent(percent, int(newest)) if newest else 0  # 0: off until a grant
    account.low_credit_threshold = threshold
    account.low_credit_alerted = False
    uow.touch(account)
    return LowCreditThreshold(user_id=user_id, credit_type=credit_type, threshold=threshold, percent=percent)


def _store_rule(connection: Connection, user_id: str, credit_type: str, percent: int | None, at: datetime) -> None:
    """Keep the percentage rule, or drop it: an absolute threshold (or none) replaces it."""
    this_rule = (rules_table.c.user_id == user_id, rules_table.c.credit_type == credit_type)
    if percent is None:
        connection.execute(delete(rules_table).where(*this_rule))
        return
    changed = connection.execute(update(rules_table).where(*this_rule)
                                 .values(low_threshold_percent=percent, updated_at=at)).rowcount
    if not changed:
        connection.execute(insert(rules_table).values(user_id=user_id, credit_type=credit_type,
                                                      low_threshold_percent=percent, updated_at=at))
