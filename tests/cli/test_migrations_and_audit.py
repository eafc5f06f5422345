"""Migrations produce exactly the models' tables; the audit catches each kind of tampering."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import Engine

from creditworker import CreditService
from creditworker.records.audit import audit
from creditworker.storage.database import make_engine
from creditworker.storage.migrate import alembic_config, current_revision, upgrade
from creditworker.storage.tables import Base


def test_migrated_schema_equals_the_models(engine: Engine) -> None:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_upgrade_twice_is_harmless(engine: Engine) -> None:
    upgrade(engine)
    assert current_revision(engine) is not None


def test_downgrade_to_base_and_back(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'roundtrip.db'}"
    engine = make_engine(url)
    upgrade(engine)
    head = current_revision(engine)
    command.downgrade(alembic_config(url), "base")
    assert current_revision(engine) is None
    upgrade(engine)
    assert current_revision(engine) == head


TAMPERING = {
    "entries_sum_to_balance": "UPDATE accounts SET balance = balance + 1 WHERE user_id = 'bob'",
    "lots_sum_to_balance": "UPDATE credit_lots SET remaining = remaining - 1 WHERE user_id = 'bob'",
    "active_holds_sum_to_reserved":
        "UPDATE reservations SET amount = amount + 1 WHERE user_id = 'bob'",
    "reservation_state": "UPDATE reservations SET status = 'bogus' WHERE user_id = 'bob'",
    "entry_has_operation": "DELETE FROM operations WHERE user_id = 'bob' AND kind = 'AddCredits'",
}


@pytest.mark.parametrize("check", sorted(TAMPERING))
def test_audit_names_the_tampered_account(engine: Engine, check: str) -> None:
    service = CreditService(engine)
    for user in ("ann", "bob"):
        service.add_credits(user, 20)
        service.reserve_credits(user, 5)
        service.deduct_credits(user, 3)
    assert audit(engine).passed
    with engine.begin() as connection:
        connection.execute(text(TAMPERING[check]))
    report = audit(engine)
    assert check in {problem.check for problem in report.problems}
    assert {problem.user_id for problem in report.problems} == {"bob"}


def test_negative_balance_fails_the_audit_only_under_the_reject_policy(engine: Engine) -> None:
    service = CreditService(engine, overage_policy="allow_negative")
    service.add_credits("ann", 10)
    hold = service.reserve_credits("ann", 10)
    service.commit_reservation(hold.id, 15)
    assert service.get_user_credits_info("ann").total == -5
    assert audit(engine, allow_negative=True).passed
    assert [p.check for p in audit(engine).problems] == ["no_negative_balance"]
