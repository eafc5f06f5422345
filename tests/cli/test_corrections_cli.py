"""`creditworker correct void | refund | expiry` against real databases."""

from __future__ import annotations

import json

from sqlalchemy.engine import Engine

from tests.cli.test_cli import cli


def test_corrections_from_the_command_line(engine: Engine, database_url: str) -> None:
    code, out, _ = cli(database_url, "add", "ann", "100", "--json")
    lot_id = json.loads(out)["lot_id"]
    code, out, _ = cli(database_url, "deduct", "ann", "40", "--json")
    entry_id = json.loads(out)["id"]
    code, out, err = cli(database_url, "correct", "refund", str(entry_id), "failed export",
                         "--amount", "10", "--json")
    assert code == 0, err
    assert (json.loads(out)["kind"], json.loads(out)["balance_after"]) == ("refund", 70)
    code, out, err = cli(database_url, "correct", "expiry", str(lot_id), "2099-01-01T00:00:00", "--json")
    assert code == 0, err
    assert json.loads(out)["metadata"]["expires_at"].startswith("2099-01-01T00:00:00")
    code, out, err = cli(database_url, "correct", "void", str(lot_id), "chargeback")
    assert code == 0, err
    assert "voided 70" in out
    code, _, err = cli(database_url, "correct", "void", str(lot_id), "chargeback")
    assert code == 2 and "insufficient_credits" in err
    code, _, err = cli(database_url, "correct", "refund", str(entry_id + 1000), "x")
    assert code == 2 and "unknown_entry" in err
    code, _, err = cli(database_url, "correct", "void", str(lot_id), "x", "--amount", "-5")
    assert code == 2 and "invalid_input" in err
    code, out, _ = cli(database_url, "balance", "ann", "--json")
    assert json.loads(out)["total"] == 0
