"""Ledger records: refused operations (`error`) and sweep runs (`system`) stored in the
database, and `creditworker ledger` to read them."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from creditworker import CreditService, SubscriptionService
from creditworker.cli.app import app
from creditworker.contract.errors import InsufficientCredits
from creditworker.storage.tables import Entry, Hold, Lot, Operation

runner = CliRunner()
NOW = datetime(2030, 1, 1, tzinfo=UTC)


def counts(engine: Engine) -> tuple[int, ...]:
    with engine.connect() as connection:
        return tuple(connection.scalar(select(func.count()).select_from(table))
                     for table in (Entry, Lot, Hold, Operation))


def test_a_refusal_is_stored_as_an_error_record_and_changes_nothing_else(
    service: CreditService, engine: Engine, ledger_path: Path
) -> None:
    service.add_credits("alice", 10, now=NOW)
    before = counts(engine)
    with pytest.raises(InsufficientCredits):
        service.deduct_credits("alice", 50, idempotency_key="too-much", now=NOW)
    outcomes = service.apply_batch([{"op": "deduct", "user_id": "nobody", "amount": 1},
                                    {"op": "add", "user_id": "alice", "amount": 0}])
    assert [outcome.ok for outcome in outcomes] == [False, False]
    assert counts(engine) == before

    records = service.get_ledger_records(kind="error")
    assert sorted((r.operation, r.code, r.user_id) for r in records) == [
        ("DeductCredits", "insufficient_credits", "alice"),
        ("DeductCredits", "unknown_user", "nobody"),
        ("batch:add", "invalid_input", "alice"),  # refused before the batch ran
    ]
    refused = next(r for r in records if r.code == "insufficient_credits")
    assert refused.details["request"]["idempotency_key"] == "too-much"
    assert refused.details["error"]["details"]["requested"] == 50
    assert service.get_ledger_records(kind="error", user_id="nobody")[0].code == "unknown_user"
    assert ledger_path.read_text().count('"record": "error"') == 3


def test_sweeps_and_allocation_write_system_records_of_what_they_did(
    service: CreditService, ledger_path: Path
) -> None:
    service.add_credits("bob", 5, expires_at=NOW + timedelta(days=2), now=NOW)
    service.reserve_credits("bob", 2, ttl_seconds=60, now=NOW)
    reminded = service.send_expiry_reminders(now=NOW + timedelta(days=1, hours=1))
    assert reminded >= 1
    assert service.release_stale_reservations(now=NOW + timedelta(days=1)) == 1
    assert service.expire_credits(now=NOW + timedelta(days=3)) == 1
    assert service.expire_credits(now=NOW + timedelta(days=3)) == 0  # did nothing: no record
    plans = SubscriptionService(service)
    plan = plans.create_plan("basic", credit_limit=100)
    plans.assign_plan("carol", plan.id, now=NOW)
    granted = plans.allocate_due(now=NOW + timedelta(days=40))
    assert granted >= 1

    system = service.get_ledger_records(kind="system")
    assert [(r.operation, r.details) for r in reversed(system)][:4] == [
        ("send_expiry_reminders", {"reminded": reminded}),
        ("release_stale_reservations", {"released": 1}),
        ("expire_credits", {"expired": 1}),
        ("allocate", {"granted": granted, "subscriptions": 1}),
    ]
    assert ledger_path.read_text().count('"record": "system"') == 4


def test_the_ledger_command_lists_records_by_kind(
    service: CreditService, database_url: str
) -> None:
    service.add_credits("dave", 1, now=NOW)
    with pytest.raises(InsufficientCredits):
        service.deduct_credits("dave", 9)
    service.add_credits("dave", 1, expires_at=NOW + timedelta(hours=1), now=NOW)
    service.expire_credits(now=NOW + timedelta(days=1))

    ledger = ["--database-url", database_url, "ledger"]
    errors = runner.invoke(app, [*ledger, "--kind", "error", "--json"])
    assert errors.exit_code == 0, errors.output
    assert [(r["kind"], r["code"]) for r in json.loads(errors.stdout)] == [
        ("error", "insufficient_credits")]
    system = runner.invoke(app, [*ledger, "--kind", "system"])
    assert system.exit_code == 0 and "expire_credits" in system.stdout
    assert "expired 1" in system.stdout
    both = json.loads(runner.invoke(app, [*ledger, "--json"]).stdout)
    assert {r["kind"] for r in both} == {"error", "system"}
    bad = runner.invoke(app, ["--database-url", database_url, "ledger", "--kind", "nope"])
    assert bad.exit_code == 2 and "invalid_input" in bad.output
