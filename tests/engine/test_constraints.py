"""CHECK constraints back the rules on SQLite, PostgreSQL and MariaDB: a row that breaks one
is refused by the database itself, whatever code wrote it."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from creditworker import CreditService
from creditworker.records.audit import audit
from creditworker.storage.tables import Account

BROKEN = {
    "lot remaining above its amount": "UPDATE credit_lots SET remaining = amount + 1",
    "lot remaining below zero": "UPDATE credit_lots SET remaining = -1",
    "reserved below zero": "UPDATE accounts SET reserved = -1",
    "available below zero without an allowed overage": "UPDATE accounts SET reserved = balance + 1",
    "a hold of nothing": "UPDATE reservations SET amount = 0",
}


@pytest.mark.parametrize("change", sorted(BROKEN))
def test_the_database_refuses_a_row_that_breaks_a_rule(service: CreditService, engine: Engine, change: str) -> None:
    service.add_credits("ann", 20)
    service.reserve_credits("ann", 5)
    # MariaDB reports a broken CHECK as an OperationalError
    with pytest.raises((IntegrityError, OperationalError)), engine.begin() as connection:
        connection.execute(text(BROKEN[change]))
    assert audit(engine).passed


def test_an_allowed_overage_raises_the_accounts_overdraft_limit_to_the_debt(engine: Engine) -> None:
    service = CreditService(engine, overage_policy="allow_negative")
    service.add_credits("ann", 10)
    hold = service.reserve_credits("ann", 10)
    service.commit_reservation(hold.id, 15)
    with engine.connect() as connection:
        limit: Any = connection.scalar(select(Account.overdraft_limit).where(Account.user_id == "ann"))
    assert limit == 5
    with pytest.raises((IntegrityError, OperationalError)), engine.begin() as connection:
        connection.execute(text("UPDATE accounts SET balance = balance - 1 WHERE user_id = 'ann'"))
    service.add_credits("ann", 5)
    assert service.get_user_credits_info("ann").total == 0
    assert audit(engine).passed
