"""The CLI reads like a good CLI's (issue 30): flags without fake values, the main commands
first, amounts as integers, whole values in piped tables, replays that say so, money in the
currency's normal form."""

from __future__ import annotations

import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from creditworker.cli.output import money


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real command, its output piped (as a script reads it)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CREDITWORKER_")}
    env["COLUMNS"] = "80"
    done = subprocess.run([sys.executable, "-m", "creditworker.cli", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_flags_show_no_value_and_up_comes_first(tmp_path: Path) -> None:
    top = run(tmp_path, "--help").stdout
    assert "<bool>" not in top and "--debug " in top
    commands = [line.split()[0] for line in top.split("Commands:")[1].splitlines() if line.strip()]
    assert commands[:2] == ["up", "serve"]
    for command in (["add"], ["up"], ["history"], ["plans", "create"]):
        assert "<bool>" not in run(tmp_path, *command, "--help").stdout, command


def test_add_and_deduct_show_the_amount_as_an_integer(tmp_path: Path) -> None:
    for command in ("add", "deduct"):
        assert "amount <int>" in run(tmp_path, command, "--help").stdout


def test_a_replayed_add_says_it_was_already_applied(tmp_path: Path) -> None:
    run(tmp_path, "db", "upgrade")
    first = run(tmp_path, "add", "carol", "250", "--idempotency-key", "grant-carol-1").stdout
    assert "added 250 to carol" in first and "already applied" not in first
    again = run(tmp_path, "add", "carol", "250", "--idempotency-key", "grant-carol-1").stdout
    assert "already applied" in again and "nothing new" in again
    assert "250" in run(tmp_path, "balance", "carol").stdout  # not 500


def test_a_piped_table_keeps_whole_values_past_80_columns(tmp_path: Path) -> None:
    run(tmp_path, "db", "upgrade")
    key = "a-long-idempotency-key-" + "x" * 80
    run(tmp_path, "add", "dave", "5", "--idempotency-key", key)
    assert key in run(tmp_path, "history", "dave").stdout


def test_plan_prices_print_in_the_currencys_normal_form(tmp_path: Path) -> None:
    run(tmp_path, "db", "upgrade")
    run(tmp_path, "plans", "create", "team", "5000", "--price", "199", "--currency", "EUR")
    run(tmp_path, "plans", "create", "tokyo", "10", "--price", "5000", "--currency", "JPY")
    listed = run(tmp_path, "plans", "list").stdout
    assert "199.00 EUR" in listed and "199.0000" not in listed
    assert "5000 JPY" in listed


@pytest.mark.parametrize(("amount", "currency", "shown"), [
    ("199.0000", "EUR", "199.00 EUR"), ("49.5", "USD", "49.50 USD"), ("5000.00", "JPY", "5000 JPY"),
    ("1.2340", "KWD", "1.234 KWD"), ("0.125", "USD", "0.125 USD"), ("0", "EUR", "0.00 EUR"),
])
def test_money_has_the_currencys_minor_unit(amount: str, currency: str, shown: str) -> None:
    assert money(Decimal(amount), currency) == shown
