"""Auto top-ups at the edges: the gateway's routes and the `creditworker topups` commands
(the producers' methods are checked against the registry in tests/worker/test_operations.py
and run through a real worker in tests/e2e/test_topups_e2e.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from creditworker import CreditService
from creditworker.cli.app import app as cli_app
from creditworker.engine.payments import ScriptedProvider
from creditworker.http import get_credit_service, router


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """The edges translate; the engine's tests run every dialect."""
    return sqlite_url


@pytest.fixture
def http(service: CreditService) -> Iterator[TestClient]:
    app = FastAPI()
    app.include_router(router)
    app.dependency_overrides[get_credit_service] = lambda: service
    with TestClient(app) as client:
        yield client


def test_the_gateway_sets_shows_lists_completes_and_removes(http: TestClient, service: CreditService,
                                                             tmp_path: Path) -> None:
    service.add_credits("alice", 500)
    empty = http.get("/credits/topups/rules/alice")
    assert (empty.status_code, empty.json()) == (200, None)
    rule = http.put("/credits/topups/rules/alice", json={"threshold": 100, "target": 1000, "unit_price": "0.01"})
    assert rule.status_code == 200, rule.text
    assert (rule.json()["threshold"], rule.json()["target"]) == (100, 1000)
    assert http.get("/credits/topups/rules/alice").json()["id"] == rule.json()["id"]

    assert http.post("/credits/deduct", json={"user_id": "alice", "amount": 450}).status_code == 200
    (topup,) = http.get("/credits/topups", params={"user_id": "alice"}).json()
    assert (topup["state"], topup["credits"], topup["cost"]) == ("requested", 950, "9.500000000000")
    refused = http.post(f"/credits/topups/{topup['id']}/complete", json={"succeeded": True})
    assert (refused.status_code, refused.json()["error"]["code"]) == (409, "topup_not_pending")

    provider = ScriptedProvider(tmp_path / "payments")
    provider.script("pending")
    service._payment_provider = provider
    service.charge_topup(topup["id"])
    assert http.get("/credits/topups", params={"state": "pending"}).json()[0]["id"] == topup["id"]
    done = http.post(f"/credits/topups/{topup['id']}/complete", json={"succeeded": True, "reference": "pi_1"})
    assert done.status_code == 200, done.text
    assert (done.json()["state"], done.json()["provider_reference"]) == ("succeeded", "pi_1")
    assert http.get("/credits/balance/alice").json()["available"] == 1000

    removed = http.delete("/credits/topups/rules/alice")
    assert removed.json() == {"user_id": "alice", "credit_type": "credits", "removed": True}
    assert http.get("/credits/topups/rules/alice").json() is None


@pytest.mark.parametrize("body", [
    {"threshold": 100},
    {"threshold": 100, "amount": 10, "target": 500},
    {"threshold": -1, "amount": 10},
    {"threshold": 100, "amount": 10, "max_per_month": "5"},
])
def test_the_gateway_refuses_a_bad_rule_and_stores_nothing(http: TestClient, service: CreditService,
                                                           body: dict) -> None:
    service.add_credits("alice", 500)
    refused = http.put("/credits/topups/rules/alice", json=body)
    assert (refused.status_code, refused.json()["error"]["code"]) == (422, "invalid_input")
    assert http.get("/credits/topups/rules/alice").json() is None


def test_the_gateway_says_which_top_up_is_unknown(http: TestClient) -> None:
    missing = http.post("/credits/topups/77/complete", json={"succeeded": False})
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "unknown_topup")
    assert http.get("/credits/topups", params={"state": "lost"}).status_code == 422


def cli(database_url: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli_app, ["--database-url", database_url, *args])
    return result.exit_code, result.stdout + result.stderr


def test_the_cli_sets_shows_lists_completes_and_removes(service: CreditService, database_url: str,
                                                        tmp_path: Path) -> None:
    service.add_credits("alice", 50)
    code, out = cli(database_url, "topups", "set", "alice", "100", "--amount", "200", "--unit-price", "0.5",
                    "--max-per-month", "300")
    assert code == 0, out
    assert "below 100, buy 200 credits at 0.50 USD a credit, at most 300.00 USD a month; enabled" in out
    code, out = cli(database_url, "topups", "show", "alice", "--json")
    assert code == 0 and json.loads(out)["amount"] == 200
    code, out = cli(database_url, "topups", "list", "--json")
    (topup,) = json.loads(out)
    assert (topup["state"], topup["credits"], topup["cost"]) == ("requested", 200, "100.000000000000")
    code, out = cli(database_url, "topups", "list")
    assert code == 0 and "requested" in out and "100.00 USD" in out

    provider = ScriptedProvider(tmp_path / "payments")
    provider.script("pending")
    CreditService(service.engine, payment_provider=provider).charge_topup(topup["id"])
    code, out = cli(database_url, "topups", "complete", str(topup["id"]), "--failed", "--error", "card expired")
    assert code == 0 and "failed" in out and "card expired" in out
    code, out = cli(database_url, "topups", "complete", str(topup["id"]))
    assert code != 0 and "topup_not_pending" in out
    assert service.get_user_credits_info("alice").available == 50
    code, out = cli(database_url, "topups", "remove", "alice")
    assert (code, out.strip()) == (0, "removed")
    assert cli(database_url, "topups", "show", "alice")[1].strip() == "no auto top-up rule"


@pytest.mark.parametrize("args", [
    ("topups", "set", "alice", "100"),
    ("topups", "set", "alice", "100", "--amount", "5", "--target", "500"),
    ("topups", "set", "alice", "-5", "--amount", "5"),
    ("topups", "set", "alice", "100", "--amount", "1.5"),
])
def test_the_cli_refuses_a_bad_rule_and_stores_nothing(service: CreditService, database_url: str,
                                                       args: tuple[str, ...]) -> None:
    service.add_credits("alice", 50)
    code, out = cli(database_url, *args)
    assert code != 0 and ("invalid_input" in out or "whole number" in out), out
    assert service.get_auto_topup("alice") is None
