"""The console's account page shows the account's auto top-up rules and its latest top-ups
with their states, and sets and removes rules through the engine (issue 29). In process,
over the gateway's real app, on a SQLite file."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from httpx import Response

from creditworker import CreditService
from creditworker.engine.payments import ScriptedProvider
from creditworker.http.api.app import create_app
from creditworker.settings import Settings
from creditworker.storage.database import make_engine
from creditworker.storage.migrate import upgrade

KEY = "topups-console-key-0123456789"


def test_the_account_page_shows_rules_and_top_ups_with_their_states(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'console.db'}"
    engine = make_engine(url)
    upgrade(engine)
    provider = ScriptedProvider(tmp_path / "payments")
    provider.script("failed")
    credits = CreditService(engine, payment_provider=provider)
    credits.add_credits("alice", 500)
    credits.set_auto_topup("alice", threshold=100, amount=300, unit_price="0.02", max_per_month="20")
    credits.deduct_credits("alice", 450)
    credits.charge_topup(credits.list_topups()[0].id)  # failed
    credits.deduct_credits("alice", 1)  # asks again: requested
    credits.add_credits("bob", 500)
    engine.dispose()
    app = create_app(Settings(database_url=url, data_dir=str(tmp_path), api_keys=KEY))
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as console:
        page = console.get("/console/account", params={"user_id": "alice"})
        assert page.status_code == 200, page.text
        text = page.text
        assert "below 100, buy 300 credits at 0.02 USD a credit, at most 20 USD a month;" in text
        assert "card declined" in text
        assert text.count('<span class="badge warn">failed</span>') == 1
        assert text.count('<span class="badge">requested</span>') == 1
        assert "6 USD" in text  # 300 x 0.02
        other = console.get("/console/account", params={"user_id": "bob"}).text
        assert "No auto top-up rule." in other and 'id="topups"' not in other


def _form_post(http: TestClient, page: str, action: str, **fields: str) -> Response:
    """Post the form whose action is `action`, as rendered on `page`, with `fields` filled
    (its hidden fields, CSRF token and form token included, as a browser sends them)."""
    html = http.get(page).text
    form = re.search(rf'<form method="post" action="/console{re.escape(action)}".*?</form>', html, re.DOTALL)
    assert form is not None, action
    hidden = dict(re.findall(r'type="hidden" name="([^"]+)" value="([^"]*)"', form.group(0)))
    return http.post(f"/console{action}", data={**hidden, **fields})


@pytest.fixture
def open_console(tmp_path: Path) -> tuple[TestClient, CreditService]:
    """The console on the embedded defaults (open without keys, forms need their CSRF token)."""
    url = f"sqlite:///{tmp_path / 'console.db'}"
    engine = make_engine(url)
    upgrade(engine)
    settings = Settings(database_url=url, data_dir=str(tmp_path / ".cw"), ledger_path=None)
    return TestClient(create_app(settings), follow_redirects=False), CreditService(engine)


def test_a_rule_is_set_from_the_account_page_once_and_removed(open_console: tuple[TestClient, CreditService]) -> None:
    http, credits = open_console
    page = "/console/account?user_id=carl"
    credits.add_credits("carl", 50)
    html = http.get(page).text
    form = re.search(r'<form method="post" action="/console/actions/topup/set".*?</form>', html, re.DOTALL)
    assert form is not None
    hidden = dict(re.findall(r'type="hidden" name="([^"]+)" value="([^"]*)"', form.group(0)))
    fields = {**hidden, "threshold": "100", "target": "1,000", "unit_price": "0.01", "currency": "usd",
              "max_per_month": "50", "expires_after_days": "30"}
    first = http.post("/console/actions/topup/set", data=fields)
    assert first.status_code == 303 and "done=topup-set" in first.headers["location"]
    assert http.post("/console/actions/topup/set", data=fields).status_code == 303  # a double submit
    rule = credits.get_auto_topup("carl")
    assert rule is not None
    assert (rule.threshold, rule.amount, rule.target, rule.currency, rule.expires_after_days) == (100, None, 1000, "USD", 30)
    assert (rule.unit_price, rule.max_per_month) == (Decimal("0.01"), Decimal(50))
    # Already below the threshold: one top-up asked for at once, not one per submit.
    assert [(topup.credits, topup.state) for topup in credits.list_topups(user_id="carl")] == [(950, "requested")]
    shown = http.get(first.headers["location"]).text
    assert "Auto top-up rule set." in shown
    assert "below 100, buy up to 1,000 at 0.01 USD a credit, at most 50 USD a month;" in shown

    removed = _form_post(http, page, "/actions/topup/remove")
    assert removed.status_code == 303 and "done=topup-remove" in removed.headers["location"]
    assert credits.get_auto_topup("carl") is None
    assert "No auto top-up rule." in http.get(page).text


def test_a_rule_for_another_credit_type_is_removed_alone(open_console: tuple[TestClient, CreditService]) -> None:
    http, credits = open_console
    page = "/console/account?user_id=dina"
    credits.add_credits("dina", 500)
    credits.add_credits("dina", 500, credit_type="images")
    assert _form_post(http, page, "/actions/topup/set", threshold="10", amount="100").status_code == 303
    assert _form_post(http, page, "/actions/topup/set", threshold="5", amount="20",
                      credit_type="images").status_code == 303
    html = http.get(page).text
    removal = re.findall(r'<form method="post" action="/console/actions/topup/remove".*?</form>', html, re.DOTALL)
    images = next(form for form in removal if 'name="credit_type" value="images"' in form)
    hidden = dict(re.findall(r'type="hidden" name="([^"]+)" value="([^"]*)"', images))
    assert http.post("/console/actions/topup/remove", data=hidden).status_code == 303
    assert credits.get_auto_topup("dina", credit_type="images") is None
    kept = credits.get_auto_topup("dina")
    assert kept is not None and (kept.threshold, kept.amount) == (10, 100)


@pytest.mark.parametrize(
    ("fields", "status", "says"),
    [
        ({"threshold": "100", "amount": "300", "target": "1000"}, 422, "give exactly one of amount"),
        ({"threshold": "100"}, 422, "give exactly one of amount"),
        ({"threshold": "100", "target": "50"}, 422, "target must be above threshold"),
        ({"threshold": "-1", "amount": "300"}, 422, "invalid_input"),
        ({"threshold": "lots", "amount": "300"}, 422, "threshold must be a whole number"),
        ({"threshold": "", "amount": "300"}, 422, "threshold is required"),
        ({"threshold": "100", "amount": "300", "unit_price": "cheap"}, 422, "unit_price"),
        ({"threshold": "100", "amount": "300", "max_per_month": "20"}, 422, "give unit_price too"),
        ({"threshold": "100", "amount": "300", "currency": "dollars"}, 422, "currency"),
    ],
)
def test_a_bad_rule_is_refused_with_the_reason_and_stores_nothing(
    open_console: tuple[TestClient, CreditService], fields: dict[str, str], status: int, says: str
) -> None:
    http, credits = open_console
    credits.add_credits("eve", 500)
    credits.set_auto_topup("eve", threshold=10, amount=20)
    answer = _form_post(http, "/console/account?user_id=eve", "/actions/topup/set", **fields)
    assert answer.status_code == status, answer.text
    assert "Not done" in answer.text and says in answer.text
    rule = credits.get_auto_topup("eve")
    assert rule is not None and (rule.threshold, rule.amount) == (10, 20)
    assert credits.list_topups(user_id="eve") == []


def test_a_rule_for_an_unknown_account_is_refused(open_console: tuple[TestClient, CreditService]) -> None:
    http, credits = open_console
    credits.add_credits("fay", 5)
    html = http.get("/console/account?user_id=fay").text
    form = re.search(r'<form method="post" action="/console/actions/topup/set".*?</form>', html, re.DOTALL)
    assert form is not None
    hidden = dict(re.findall(r'type="hidden" name="([^"]+)" value="([^"]*)"', form.group(0)))
    answer = http.post("/console/actions/topup/set", data={**hidden, "user_id": "nobody", "threshold": "1", "amount": "5"})
    assert answer.status_code == 404 and "unknown_user" in answer.text
    assert credits.get_auto_topup("nobody") is None


def test_the_top_up_forms_need_their_csrf_token(open_console: tuple[TestClient, CreditService]) -> None:
    http, credits = open_console
    credits.add_credits("gus", 500)
    credits.set_auto_topup("gus", threshold=10, amount=20)
    html = http.get("/console/account?user_id=gus").text
    token = re.search(r'name="form_token" value="([^"]+)"', html).group(1)  # type: ignore[union-attr]
    base = {"form_token": token, "user_id": "gus"}
    assert http.post("/console/actions/topup/set", data={**base, "threshold": "99", "amount": "5"}).status_code == 403
    assert http.post("/console/actions/topup/remove", data=base).status_code == 403
    rule = credits.get_auto_topup("gus")
    assert rule is not None and rule.threshold == 10
