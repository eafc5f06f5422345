"""Low-credit thresholds as a percentage of the last grant (`credit_alert_rules`).

A rule is turned into the account's absolute `low_credit_threshold` whenever a grant lands
(and when the rule is set, from the account's newest lot), so that evaluating alerts on
every deduct reads nothing more than it did. The rules are read once per unit of work, only
by one that grants to an account that has a threshold of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from datetime import datetime
from typing import Any, Protocol, cast

from sqlalchemy import Table, delete, insert, select, update
from sqlalchemy.engine import Connection

from creditworker.contract.errors import ValidationFailed
from creditworker.storage.tables import CreditAlertRuleRow, Lot

rules_table = cast(Table, CreditAlertRuleRow.__table__)
lots_table = cast(Table, Lot.__table__)
DEFAULT_TYPE = "credits"


class RunsUnits(Protocol):
    """`CreditService` as this module uses it (not imported: the service imports this module)."""

    def run(self, decide: Callable[[Any], Any], *, now: datetime | None = None) -> Any: ...


def from_percent(percent: int, grant: int) -> int:
    """`percent` of `grant`, rounded up: 10% of 15 is 2, so a threshold is never 0 by rounding."""
    return -(-percent * grant // 100)


def percent_rules(connection: Connection, user_ids: Collection[str]) -> dict[str, int]:
    if not user_ids:
        return {}
    rows = connection.execute(
        select(rules_table.c.user_id, rules_table.c.low_threshold_percent)
        .where(rules_table.c.user_id.in_(sorted(user_ids)), rules_table.c.credit_type == DEFAULT_TYPE)).all()
    return {row.user_id: row.low_threshold_percent for row in rows}


def drop_rule(connection: Connection, user_id: str) -> None:
    """An absolute threshold replaces a percentage rule."""
    connection.execute(delete(rules_table).where(rules_table.c.user_id == user_id,
                                                 rules_table.c.credit_type == DEFAULT_TYPE))


def set_low_threshold_percent(service: RunsUnits, user_id: str, percent: int | None) -> int | None:
    """Make the account's low threshold `percent` of its last grant (None: drop the rule and
    the threshold, so the service default applies); returns the threshold it now has (0
    before any grant).

    An account with a rule always has a threshold (0 until its first grant): a grant to an
    account without one needs no look at the rules (`UnitOfWork`)."""
    if percent is not None and (isinstance(percent, bool) or not isinstance(percent, int) or not 0 < percent <= 100):
        raise ValidationFailed("percent must be a whole number from 1 to 100, or None", percent=percent)

    def decide(uow: Any) -> int | None:  # a UnitOfWork
        uow.lock([user_id])
        account = uow.account(user_id)
        _store_rule(uow.connection, user_id, percent, uow.at)
        threshold = None
        if percent is not None:
            newest = uow.connection.scalar(select(lots_table.c.amount).where(lots_table.c.user_id == user_id)
                                           .order_by(lots_table.c.id.desc()).limit(1))
            threshold = from_percent(percent, int(newest)) if newest else 0  # 0: off until a grant
        account.low_credit_threshold = threshold
        account.low_credit_alerted = False
        uow.touch(account)
        return threshold

    return service.run(decide)


def _store_rule(connection: Connection, user_id: str, percent: int | None, at: datetime) -> None:
    if percent is None:
        drop_rule(connection, user_id)
        return
    changed = connection.execute(
        update(rules_table).where(rules_table.c.user_id == user_id, rules_table.c.credit_type == DEFAULT_TYPE)
        .values(low_threshold_percent=percent, updated_at=at)).rowcount
    if not changed:
        connection.execute(insert(rules_table).values(user_id=user_id, credit_type=DEFAULT_TYPE,
                                                      low_threshold_percent=percent, updated_at=at))
