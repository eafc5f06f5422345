"""A plan's rollover through the edges: the CLI, the console's plan forms, the gateway's
bodies and the producers' signatures (one SQLite file each; no worker needed)."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from creditworker import CreditService, SubscriptionService
from creditworker.cli.app import app
from creditworker.client.aio import AsyncCreditClient
from creditworker.client.sync import CreditClient
from creditworker.http.api.app import create_app
from creditworker.settings import Settings
from creditworker.storage.database import make_engine
from creditworker.storage.migrate import upgrade
from creditworker.storage.tables import Lot

ROLLOVER = ("rollover_max", "rollover_max_percent", "rollover_expires_after_periods")


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'creditworker.db'}"
    upgrade(make_engine(url))
    return url


def cli(database_url: str, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["--database-url", database_url, *args])
    return result.exit_code, result.stdout, result.stderr


def test_cli_creates_and_updates_a_plan_s_rollover(database_url: str) -> None:
    code, out, _ = cli(database_url, "plans", "create", "daily", "100", "--period", "daily",
                       "--rollover-max", "40", "--rollover-expires-after-periods", "2", "--json")
    assert code == 0
    plan = json.loads(out)
    assert (plan["rollover_max"], plan["rollover_max_percent"], plan["rollover_expires_after_periods"]) == (40, None, 2)
    code, out, _ = cli(database_url, "plans", "update", "daily", "--rollover-max-percent", "25", "--json")
    assert code == 0 and (json.loads(out)["rollover_max"], json.loads(out)["rollover_max_percent"]) == (None, 25)
    code, out, _ = cli(database_url, "plans", "list")
    assert code == 0 and "25% for 2 periods" in out


def test_cli_no_rollover_clears_the_rollover_fields_and_the_rest_stays(database_url: str) -> None:
    code, _out, err = cli(database_url, "plans", "create", "daily", "100", "--period", "daily", "--price", "3",
                          "--rollover-max-percent", "30", "--rollover-expires-after-periods", "2")
    assert code == 0, err
    update = ("plans", "update", "daily", "--no-rollover", "--idempotency-key", "clear-1", "--json")
    code, out, err = cli(database_url, *update)
    assert code == 0, err
    plan = json.loads(out)
    assert [plan[field] for field in ROLLOVER] == [None, None, None]
    assert (plan["credit_limit"], plan["price"], plan["name"]) == (100, "3.0000", "daily")
    assert cli(database_url, *update)[1] == out  # repeated with its key: the first answer
    code, out, _ = cli(database_url, "plans", "list")
    assert code == 0 and "30%" not in out
    # With no rollover, the period's allocation is not marked to roll: it expires as any lot.
    engine = make_engine(database_url)
    SubscriptionService(CreditService(engine)).assign_plan("ann", "daily")
    with Session(engine) as session:
        assert [(lot.amount, lot.rolls_over) for lot in session.scalars(select(Lot))] == [(100, False)]


def test_cli_no_rollover_with_a_rollover_option_is_refused_and_changes_nothing(database_url: str) -> None:
    assert cli(database_url, "plans", "create", "daily", "100", "--period", "daily", "--rollover-max", "40")[0] == 0
    code, _out, err = cli(database_url, "plans", "update", "daily", "--no-rollover", "--rollover-max", "10")
    assert code == 2 and "invalid_input" in err and "--no-rollover" in err
    plan = json.loads(cli(database_url, "plans", "list", "--json")[1])[0]
    assert plan["rollover_max"] == 40


@pytest.mark.parametrize("args", [
    ("--rollover-max", "-1"),
    ("--rollover-max-percent", "101"),
    ("--rollover-expires-after-periods", "0"),
    ("--rollover-max", "5", "--rollover-max-percent", "5"),
])
def test_cli_refuses_bad_rollover_with_exit_2_and_the_error_code(database_url: str, args: tuple[str, ...]) -> None:
    code, _out, err = cli(database_url, "plans", "create", "daily", "100", *args)
    assert code == 2 and "invalid_input" in err
    assert cli(database_url, "plans", "list", "--json")[1].strip() == "[]"


@pytest.fixture
def http(tmp_path: Path, database_url: str) -> TestClient:
    settings = Settings(database_url=database_url, data_dir=str(tmp_path / ".cw"), ledger_path=None)
    return TestClient(create_app(settings), follow_redirects=False)


def _form(http: TestClient, page: str, action: str, **fields: str) -> int:
    html = http.get(page).text
    form = re.search(rf'<form method="post" action="/console{re.escape(action)}".*?</form>', html, re.DOTALL)
    assert form is not None, action
    hidden = dict(re.findall(r'type="hidden" name="([^"]+)" value="([^"]*)"', form.group(0)))
    return http.post(f"/console{action}", data={**hidden, **fields}).status_code


def test_console_plan_forms_set_and_clear_the_rollover(http: TestClient, database_url: str) -> None:
    plans = SubscriptionService(CreditService(database_url))
    assert _form(http, "/console/plans", "/plans", name="team", credit_limit="1000", billing_period="daily",
                 price="0", currency="USD", rollover_max="", rollover_max_percent="30",
                 rollover_expires_after_periods="3", reason="new tier") == 303
    plan = plans.get_plan("team")
    assert (plan.rollover_max, plan.rollover_max_percent, plan.rollover_expires_after_periods) == (None, 30, 3)
    assert "30%, 3 period(s)" in http.get("/console/plans").text
    edit = f"/console/plans/edit?plan={plan.id}"
    assert 'name="rollover_max_percent" value="30"' in http.get(edit).text
    assert _form(http, edit, "/plans/edit", name="team", credit_limit="1000", price="0", currency="USD",
                 active="on", rollover_max="200", rollover_max_percent="", rollover_expires_after_periods="",
                 reason="cap in credits") == 303
    plan = plans.get_plan("team")
    assert (plan.rollover_max, plan.rollover_max_percent, plan.rollover_expires_after_periods) == (200, None, None)
    assert _form(http, edit, "/plans/edit", name="team", credit_limit="1000", price="0", currency="USD",
                 active="on", rollover_max="", rollover_max_percent="150", reason="typo") == 422
    assert plans.get_plan("team") == plan


@pytest.mark.parametrize("body", [
    {"rollover_max": -1}, {"rollover_max_percent": 101}, {"rollover_expires_after_periods": 0},
    {"rollover_max": 1, "rollover_max_percent": 1},
])
def test_gateway_refuses_bad_rollover_before_anything_is_queued(http: TestClient, body: dict[str, int]) -> None:
    created = http.post("/credits/plans", json={"name": "p", "credit_limit": 100, **body})
    assert created.status_code == 422 and created.json()["error"]["code"] == "invalid_input"
    changed = http.patch("/credits/plans/p", json=body)
    assert changed.status_code == 422 and changed.json()["error"]["code"] == "invalid_input"


def test_producers_take_the_rollover_fields() -> None:
    for method in (CreditClient.create_plan, AsyncCreditClient.create_plan):
        assert set(ROLLOVER) <= set(inspect.signature(method).parameters)
