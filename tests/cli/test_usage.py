"""`creditworker usage` (CSV for finance) and `balance --at`, on every dialect."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.engine import Engine

from creditworker import CreditService
from tests.cli.test_cli import cli

T0 = datetime(2030, 5, 30, 12, tzinfo=UTC)


@pytest.fixture
def history(engine: Engine) -> CreditService:
    service = CreditService(engine)
    for user in ("ann", "bob"):
        service.add_credits(user, 100, now=T0)
        service.deduct_credits(user, 10, now=T0 + timedelta(days=1))
        service.deduct_credits(user, 5, now=T0 + timedelta(days=3))  # 2 June
    return service


def test_usage_over_every_account_as_csv_parsed_back(history: CreditService, database_url: str) -> None:
    code, out, err = cli(database_url, "usage", "2030-05-01", "2030-07-01", "--granularity", "month")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rows == [
        {"period": "2030-05-01", "granted": "200", "consumed": "20", "expired": "0", "voided": "0",
         "refunded": "0", "consumed_cost": ""},
        {"period": "2030-06-01", "granted": "0", "consumed": "10", "expired": "0", "voided": "0",
         "refunded": "0", "consumed_cost": ""},
    ]
    code, out, _ = cli(database_url, "usage", "2030-05-31", "2030-06-03", "--user", "ann")
    assert code == 0
    assert [(r["period"], r["consumed"]) for r in csv.DictReader(io.StringIO(out))] == [
        ("2030-05-31", "10"), ("2030-06-02", "5")]


@pytest.mark.parametrize(("args", "problem"), [
    (("usage", "2030-07-01", "2030-05-01"), "start must not be after end"),
    (("usage", "2030-05-01", "2030-07-01", "--granularity", "week"), "granularity"),
    (("usage", "2030-05-01", "2030-07-01", "--user", "nobody"), "unknown_user"),
])
def test_a_bad_usage_request_exits_non_zero_with_the_reason(
    history: CreditService, database_url: str, args: tuple[str, ...], problem: str
) -> None:
    code, out, err = cli(database_url, *args, "--json")
    assert code != 0 and problem in out + err


def test_balance_at_a_moment(history: CreditService, database_url: str) -> None:
    code, out, err = cli(database_url, "balance", "ann", "--at", "2030-06-01T00:00:00", "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert (shown["total"], shown["available"], shown["at"]) == (90, 90, "2030-06-01T00:00:00Z")


def test_usage_csv_values_consumption_and_takes_a_credit_type(engine: Engine, database_url: str) -> None:
    service = CreditService(engine)
    service.add_credits("cat", 10, cost_basis={"amount": "0.25", "currency": "USD"}, now=T0)
    service.add_credits("cat", 10, credit_type="images", now=T0)
    service.deduct_credits("cat", 4, now=T0)
    service.deduct_credits("cat", 3, credit_type="images", now=T0)
    code, out, err = cli(database_url, "usage", "2030-05-01", "2030-07-01", "--user", "cat")
    assert code == 0, err
    assert [(r["consumed"], r["consumed_cost"]) for r in csv.DictReader(io.StringIO(out))] == [("7", "1.00 USD")]
    code, out, err = cli(database_url, "usage", "2030-05-01", "2030-07-01", "--user", "cat", "--credit-type", "images")
    assert code == 0, err
    assert [(r["consumed"], r["consumed_cost"]) for r in csv.DictReader(io.StringIO(out))] == [("3", "")]
