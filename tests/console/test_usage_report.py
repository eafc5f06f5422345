"""The account page's chart and its usage CSV come from the engine's usage report
(`get_usage`): the same figures per day as `creditworker usage`, written by the same code."""

from __future__ import annotations

import csv
import html
import io
import re
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient

from creditworker import CreditService
from tests.console.test_actions import console  # noqa: F401 - the fixture is used by name

T0 = datetime(2030, 5, 30, 12, tzinfo=UTC)


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_the_usage_csv_has_one_row_per_day_with_entries(
    console: tuple[TestClient, CreditService],  # noqa: F811 - the fixture
) -> None:
    http, credits = console
    grant = credits.add_credits("ann", 100, cost_basis={"amount": "0.05", "currency": "USD"}, now=T0)
    charge = credits.deduct_credits("ann", 30, now=T0 + timedelta(days=1))
    credits.refund_deduction(charge.id, amount=10, reason="failed export", now=T0 + timedelta(days=1))
    assert grant.lot_id is not None
    credits.void_lot(grant.lot_id, amount=5, reason="chargeback", now=T0 + timedelta(days=3))
    credits.add_credits("ann", 7, credit_type="images", now=T0 + timedelta(days=3))
    credits.add_credits("bob", 1000, now=T0)  # another account's entries are not in ann's file

    answer = http.get("/console/account/usage.csv",
                      params={"user_id": "ann", "start": "2030-05-30", "end": "2030-06-03"})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/csv")
    assert 'filename="usage-ann-2030-05-30-2030-06-03.csv"' in answer.headers["content-disposition"]
    assert csv_rows(answer.text) == [
        {"period": "2030-05-30", "granted": "100", "consumed": "0", "expired": "0", "voided": "0",
         "refunded": "0", "consumed_cost": ""},
        {"period": "2030-05-31", "granted": "0", "consumed": "30", "expired": "0", "voided": "0",
         "refunded": "10", "consumed_cost": "1.00 USD"},  # 20 credits net at 0.05
        {"period": "2030-06-02", "granted": "7", "consumed": "0", "expired": "0", "voided": "5",
         "refunded": "0", "consumed_cost": ""},
    ]
    images = http.get("/console/account/usage.csv", params={
        "user_id": "ann", "start": "2030-05-01", "end": "2030-07-01", "granularity": "month",
        "credit_type": "images"})
    assert images.status_code == 200
    assert [(row["period"], row["granted"]) for row in csv_rows(images.text)] == [("2030-06-01", "7")]


def test_the_chart_draws_the_usage_report_and_links_its_csv(
    console: tuple[TestClient, CreditService],  # noqa: F811 - the fixture
) -> None:
    http, credits = console
    grant = credits.add_credits("cleo", 120)
    charge = credits.deduct_credits("cleo", 40)
    credits.refund_deduction(charge.id, amount=15, reason="outage")
    assert grant.lot_id is not None
    credits.void_lot(grant.lot_id, amount=25, reason="fraud")

    page = http.get("/console/account", params={"user_id": "cleo", "days": "7"})
    assert page.status_code == 200
    today = datetime.now(UTC).date().isoformat()
    titles = re.findall(r'<rect class="bar (\w+)"[^>]*><title>([^<]+)</title>', page.text)
    assert sorted(titles) == sorted([
        ("granted", f"{today}: granted 120"), ("consumed", f"{today}: consumed 40"),
        ("voided", f"{today}: voided 25"), ("refunded", f"{today}: refunded 15"),
    ])
    link = re.search(r'id="usage-csv" href="(/console/account/usage\.csv\?[^"]+)"', page.text)
    assert link is not None
    exported = http.get(html.unescape(link.group(1)))
    assert exported.status_code == 200
    assert csv_rows(exported.text) == [
        {"period": today, "granted": "120", "consumed": "40", "expired": "0", "voided": "25",
         "refunded": "15", "consumed_cost": ""},
    ]


@pytest.mark.parametrize(("params", "status", "problem"), [
    ({"user_id": "nobody"}, 404, "no account"),
    ({"user_id": "ann", "start": "30 May"}, 422, "not a date"),
    ({"user_id": "ann", "start": "2030-07-01", "end": "2030-05-01"}, 422, "start must not be after end"),
    ({"user_id": "ann", "granularity": "week"}, 422, "granularity"),
    ({"user_id": "ann", "credit_type": "no spaces"}, 422, "credit_type"),
    ({"user_id": "ann", "end": "0001-01-02"}, 422, "calendar"),
])
def test_a_bad_usage_request_is_a_clear_error_page(
    console: tuple[TestClient, CreditService],  # noqa: F811 - the fixture
    params: dict[str, str], status: int, problem: str,
) -> None:
    http, credits = console
    credits.add_credits("ann", 10)
    answer = http.get("/console/account/usage.csv", params=params)
    assert answer.status_code == status
    assert problem in html.unescape(answer.text)
