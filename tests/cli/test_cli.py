"""The `creditworker` command, run as a real subprocess and in process against real databases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from creditworker import CreditService
from creditworker.cli.app import app

runner = CliRunner()


def cli(database_url: str, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["--database-url", database_url, *args])
    return result.exit_code, result.stdout, result.stderr


def test_console_script_runs_the_quickstart_on_a_fresh_sqlite_file(tmp_path: Path) -> None:
    env = {**os.environ, "CREDITWORKER_DATABASE_URL": f"sqlite:///{tmp_path / 'cw.db'}",
           "CREDITWORKER_LEDGER_PATH": str(tmp_path / "ledger.jsonl")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["creditworker", *args], check=False, env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)

    assert run("db", "upgrade").returncode == 0
    assert run("add", "alice", "100").returncode == 0
    assert run("deduct", "alice", "30").returncode == 0
    shown = run("balance", "alice", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["available"] == 70
    lines = (tmp_path / "ledger.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["add", "deduct"]


def test_add_deduct_balance_and_history_as_json(engine: Engine, database_url: str) -> None:
    assert cli(database_url, "add", "ann", "50", "--idempotency-key", "grant-1", "--json")[0] == 0
    code, out, _ = cli(database_url, "deduct", "ann", "20", "--json")
    assert code == 0 and json.loads(out)["balance_after"] == 30
    code, out, _ = cli(database_url, "balance", "ann", "--json")
    shown = json.loads(out)
    assert (shown["total"], shown["reserved"], shown["available"]) == (30, 0, 30)
    code, out, _ = cli(database_url, "history", "ann", "--json", "--kind", "add")
    assert [(e["kind"], e["idempotency_key"]) for e in json.loads(out)] == [("add", "grant-1")]
    code, out, _ = cli(database_url, "history", "ann", "--limit", "1")
    assert code == 0 and "deduct" in out


def test_history_of_one_credit_type(engine: Engine, database_url: str) -> None:
    service = CreditService(engine)
    service.add_credits("uma", 50)
    service.add_credits("uma", 9, credit_type="images")
    service.deduct_credits("uma", 4, credit_type="images")
    code, out, err = cli(database_url, "history", "uma", "--credit-type", "images", "--json")
    assert code == 0, err
    assert [(entry["kind"], entry["amount"], entry["credit_type"]) for entry in json.loads(out)] == [
        ("deduct", -4, "images"), ("add", 9, "images")]
    code, out, _ = cli(database_url, "history", "uma", "--json")
    assert len(json.loads(out)) == 3
    code, out, err = cli(database_url, "history", "uma", "--credit-type", "Bad Type")
    assert code == 2 and "invalid_input" in out + err


def test_credit_type_option_on_add_deduct_and_balance(engine: Engine, database_url: str) -> None:
    assert cli(database_url, "add", "tia", "50", "--json")[0] == 0
    assert cli(database_url, "add", "tia", "9", "--credit-type", "images", "--json")[0] == 0
    code, out, _ = cli(database_url, "deduct", "tia", "4", "--credit-type", "images", "--json")
    assert code == 0 and (json.loads(out)["credit_type"], json.loads(out)["balance_after"]) == ("images", 5)
    code, out, _ = cli(database_url, "balance", "tia", "--credit-type", "images", "--json")
    assert (json.loads(out)["credit_type"], json.loads(out)["total"]) == ("images", 5)
    code, out, _ = cli(database_url, "balance", "tia")
    assert code == 0 and "images" in out and "every credit type" in out
    code, out, err = cli(database_url, "deduct", "tia", "6", "--credit-type", "images")
    assert code == 2 and "insufficient_credits" in out + err
    code, out, err = cli(database_url, "add", "tia", "1", "--credit-type", "Bad Type")
    assert code == 2 and "invalid_input" in out + err
    assert CreditService(engine).get_user_credits_info("tia").total == 50
    code, out, err = cli(database_url, "add", "tia", "5", "--effective-at", "2099-01-01T00:00:00",
                         "--cost-basis", "0.02 USD", "--json")
    assert code == 0, out + err
    info = CreditService(engine).get_user_credits_info("tia")
    assert (info.total, info.pending, info.available) == (55, 5, 50)
    code, out, err = cli(database_url, "add", "tia", "5", "--cost-basis", "0.02 dollars")
    assert code == 2 and "invalid_input" in out + err


@pytest.mark.parametrize(
    ("args", "code_name"),
    [
        (("deduct", "ann", "-5"), "invalid_input"),
        (("deduct", "ann", "1.5"), "invalid_input"),
        (("deduct", "ann", "0"), "invalid_input"),
        (("add", "ann", "99999999999999999"), "invalid_input"),
        (("deduct", "ann", "1000"), "insufficient_credits"),
        (("deduct", "nobody", "1"), "unknown_user"),
        (("balance", "nobody"), "unknown_user"),
        (("add", "ann", "5", "--idempotency-key", "used"), "idempotency_conflict"),
    ],
)
def test_refused_commands_exit_2_with_the_error_code_and_change_nothing(
    engine: Engine, database_url: str, args: tuple[str, ...], code_name: str
) -> None:
    service = CreditService(engine)
    service.add_credits("ann", 10, idempotency_key="used")
    code, _out, err = cli(database_url, *args)
    assert code == 2
    assert f"error: {code_name}:" in err
    assert service.get_user_credits_info("ann").total == 10
    assert len(service.get_history("ann")) == 1


def test_json_errors_are_machine_readable(engine: Engine, database_url: str) -> None:
    code, _out, err = cli(database_url, "balance", "nobody", "--json")
    assert code == 2 and json.loads(err)["error"]["code"] == "unknown_user"


def test_audit_passes_then_names_a_tampered_account(engine: Engine, database_url: str) -> None:
    service = CreditService(engine)
    service.add_credits("ann", 10)
    service.add_credits("bob", 10)
    hold = service.reserve_credits("bob", 4)
    service.commit_reservation(hold.id, 3)
    code, out, _ = cli(database_url, "audit")
    assert code == 0 and "audit passed: 2 accounts checked" in out
    with engine.begin() as connection:
        connection.execute(text("UPDATE accounts SET balance = balance + 1 WHERE user_id = 'bob'"))
    code, out, _ = cli(database_url, "audit", "--json")
    report = json.loads(out)
    assert code == 1 and not report["passed"]
    assert {p["user_id"] for p in report["problems"]} == {"bob"}
    assert {p["check"] for p in report["problems"]} >= {"entries_sum_to_balance",
                                                         "lots_sum_to_balance"}


def test_schema_prints_ddl_per_dialect_and_json_schemas() -> None:
    for dialect in ("postgresql", "sqlite", "mysql"):
        result = runner.invoke(app, ["schema", "--dialect", dialect])
        assert result.exit_code == 0
        for table in ("accounts", "credit_lots", "reservations", "ledger_entries", "operations",
                      "outbox_events"):
            assert f"CREATE TABLE {table}" in result.stdout
    assert "utf8mb4_bin" in runner.invoke(app, ["schema", "--dialect", "mysql"]).stdout
    schemas = json.loads(runner.invoke(app, ["schema", "--json"]).stdout)
    assert {"AddCredits", "LedgerEntry", "Reservation", "CreditsInfo", "CreditsLow"} <= set(schemas)
    assert schemas["DeductCredits"]["properties"]["amount"]["exclusiveMinimum"] == 0
    bad = runner.invoke(app, ["schema", "--dialect", "oracle"])
    assert bad.exit_code == 2


def test_schema_json_has_every_request_and_result_model_plans_and_batches_included() -> None:
    """Drift: it once left out plans, subscriptions and batches (now derived from the registry)."""
    schemas = json.loads(runner.invoke(app, ["schema", "--json"]).stdout)
    assert {"CreatePlan", "UpdatePlan", "DeletePlan", "Plan", "AssignPlan", "Subscription",
            "SubmitBatch", "BatchOutcome", "AllocateSubscriptions", "DeletedPlan"} <= set(schemas)
    assert schemas["UpdatePlan"]["properties"]["idempotency_key"]


def test_module_entry_point_prints_help() -> None:
    result = subprocess.run([sys.executable, "-m", "creditworker.cli", "--help"],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "audit" in result.stdout


def test_plans_commands_manage_plans_and_subscriptions(engine: Engine, database_url: str) -> None:
    code, out, _ = cli(database_url, "plans", "create", "basic", "100", "--price", "9.99",
                       "--period", "daily", "--json")
    assert code == 0 and json.loads(out)["credit_limit"] == 100
    code, out, _ = cli(database_url, "plans", "create", "pro", "300", "--period", "daily", "--json")
    pro_id = json.loads(out)["id"]
    code, out, _ = cli(database_url, "plans", "assign", "ann", "basic", "--json")
    assert code == 0 and json.loads(out)["status"] == "active"
    assert CreditService(engine).get_user_credits_info("ann").total == 100
    code, out, _ = cli(database_url, "plans", "change", "ann", "pro", "--json")
    assert code == 0 and json.loads(out)["plan_id"] == pro_id
    assert CreditService(engine).get_user_credits_info("ann").total > 100  # prorated upgrade
    code, out, _ = cli(database_url, "plans", "subscription", "ann")
    assert code == 0 and f"plan {pro_id}, active" in out
    code, out, _ = cli(database_url, "plans", "list", "--json")
    assert [p["name"] for p in json.loads(out)] == ["basic", "pro"]
    code, _out, err = cli(database_url, "plans", "delete", "pro")
    assert code == 2 and "error: plan_in_use:" in err and "deactivated" in err
    code, out, _ = cli(database_url, "plans", "list", "--json")
    assert [p["name"] for p in json.loads(out)] == ["basic"]
    code, out, _ = cli(database_url, "plans", "remove", "ann", "--now", "--json")
    assert code == 0 and json.loads(out)["status"] == "ended"
    code, out, _ = cli(database_url, "plans", "allocate", "--json")
    assert code == 0 and json.loads(out) == {"granted": 0}


def test_plan_update_and_delete_repeated_with_a_key_answer_as_the_first_time(
    engine: Engine, database_url: str
) -> None:
    """The CLI offers the key the registry's plan writes take (it once had none for these)."""
    created = cli(database_url, "plans", "create", "basic", "10", "--inactive",
                  "--idempotency-key", "c-1")
    assert created[0] == 0
    update = ("plans", "update", "basic", "--price", "5", "--active", "--idempotency-key", "u-1")
    first = cli(database_url, *update, "--json")
    again = cli(database_url, *update, "--json")
    assert first[0] == again[0] == 0 and json.loads(first[1]) == json.loads(again[1])
    assert json.loads(first[1])["active"] and Decimal(json.loads(first[1])["price"]) == 5
    code, _out, err = cli(database_url, "plans", "update", "basic", "--price", "6",
                          "--idempotency-key", "u-1")
    assert code == 2 and "error: idempotency_conflict:" in err
    for _ in range(2):
        code, out, err = cli(database_url, "plans", "delete", "basic", "--idempotency-key", "d-1",
                             "--json")
        assert (code, json.loads(out)) == (0, {"deleted": "basic"}), err
    assert cli(database_url, "plans", "delete", "basic")[0] == 2  # without the key: it is gone


@pytest.mark.parametrize(
    ("args", "code_name"),
    [
        (("plans", "create", "x", "-5"), "invalid_input"),
        (("plans", "create", "x", "5", "--period", "weekly"), "invalid_input"),
        (("plans", "create", "x", "5", "--price", "abc"), "invalid_input"),
        (("plans", "assign", "ann", "gold"), "unknown_plan"),
        (("plans", "change", "ann", "basic"), "unknown_user"),
        (("plans", "subscription", "ann"), "unknown_subscription"),
        (("plans", "update", "basic", "--name", "basic"), None),
    ],
)
def test_refused_plan_commands_exit_2_with_the_error_code(
    engine: Engine, database_url: str, args: tuple[str, ...], code_name: str | None
) -> None:
    assert cli(database_url, "plans", "create", "basic", "10")[0] == 0
    code, _out, err = cli(database_url, *args)
    if code_name is None:  # renaming a plan to its own name is allowed
        assert code == 0
        return
    assert code == 2 and f"error: {code_name}:" in err
