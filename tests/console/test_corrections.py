"""The account page's corrections (void, refund, expiry) go through the engine as new ledger
entries, each with its reason, once per form however often it is sent."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from creditworker import CreditService
from creditworker.records.audit import audit
from tests.console.test_actions import console, form_post  # noqa: F401 - the fixture is used by name

PAGE = "/console/account?user_id=vera"


def hidden_fields(http: TestClient, action: str) -> dict[str, str]:
    form = re.search(rf'<form method="post" action="/console{re.escape(action)}".*?</form>', http.get(PAGE).text,
                     re.DOTALL)
    assert form is not None, action
    return dict(re.findall(r'type="hidden" name="([^"]+)" value="([^"]*)"', form.group(0)))


def test_void_refund_and_expiry_are_ledger_entries_with_their_reasons(
    console: tuple[TestClient, CreditService],  # noqa: F811 - the fixture
) -> None:
    http, credits = console
    grant = credits.add_credits("vera", 100)
    charge = credits.deduct_credits("vera", 30)
    assert form_post(http, PAGE, "/actions/refund", amount="10", reason="failed export") == 303
    assert credits.get_user_credits_info("vera").total == 80
    assert form_post(http, PAGE, "/actions/void", amount="20", reason="chargeback") == 303
    assert credits.get_user_credits_info("vera").total == 60
    assert form_post(http, PAGE, "/actions/expiry", expires_at="2099-01-01T00:00", reason="goodwill") == 303
    history = credits.get_history("vera", limit=10)
    kinds = [entry.kind for entry in history]
    assert kinds[:3] == ["expiry_changed", "void", "refund"]
    refund = next(entry for entry in history if entry.kind == "refund")
    assert refund.amount == 10 and refund.metadata and refund.metadata.get("refund_of") == charge.id
    void = next(entry for entry in history if entry.kind == "void")
    assert void.amount == -20 and void.lot_id == grant.lot_id and "chargeback" in str(void.metadata or void.description)
    assert audit(credits.engine).passed


def test_a_form_sent_twice_corrects_once(console: tuple[TestClient, CreditService]) -> None:  # noqa: F811
    http, credits = console
    credits.add_credits("vera", 100)
    fields = {**hidden_fields(http, "/actions/void"), "amount": "5", "reason": "duplicate grant"}
    first = http.post("/console/actions/void", data=fields)
    assert first.status_code == 303
    assert "Grant voided." in http.get(first.headers["location"]).text
    assert http.post("/console/actions/void", data=fields).status_code == 303
    assert credits.get_user_credits_info("vera").total == 95


def test_bad_corrections_are_refused_and_change_nothing(console: tuple[TestClient, CreditService]) -> None:  # noqa: F811
    http, credits = console
    credits.add_credits("vera", 100)
    credits.deduct_credits("vera", 30)
    assert form_post(http, PAGE, "/actions/void", amount="5", reason=" ") == 422  # a reason is required
    assert form_post(http, PAGE, "/actions/refund", amount="31", reason="too much") == 422
    assert form_post(http, PAGE, "/actions/void", amount="500", reason="more than is left") == 402  # insufficient_credits
    assert form_post(http, PAGE, "/actions/expiry", expires_at="", reason="no date") == 422
    fields = {**hidden_fields(http, "/actions/void"), "lot_id": "999999", "reason": "unknown lot"}
    assert http.post("/console/actions/void", data=fields).status_code == 404
    assert credits.get_user_credits_info("vera").total == 70
    assert [entry.kind for entry in credits.get_history("vera")] == ["deduct", "add"]
    assert http.get(PAGE).status_code == 200

