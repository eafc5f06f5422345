"""The console's actions and exports, each checked against what the engine then reports
(in process, on the embedded defaults, where the console is open without keys)."""

from __future__ import annotations

import csv
import io
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from creditworker import CreditService, SubscriptionService
from creditworker.http.api.app import create_app
from creditworker.records.audit import audit
from creditworker.settings import Settings
from creditworker.storage.database import make_engine
from creditworker.storage.migrate import upgrade
from creditworker.storage.tables import OutboxEvent


@pytest.fixture
def console(tmp_path: Path) -> tuple[TestClient, CreditService]:
    database_url = f"sqlite:///{tmp_path / 'creditworker.db'}"
    engine = make_engine(database_url)
    upgrade(engine)
    settings = Settings(database_url=database_url, data_dir=str(tmp_path / ".cw"), ledger_path=None)
    return TestClient(create_app(settings), follow_redirects=False), CreditService(engine)


def form_post(http: TestClient, page: str, action: str, **fields: str) -> int:
    """Post the form whose action is `action`, as rendered on `page`, with `fields` filled."""
    html = http.get(page).text
    form = re.search(rf'<form method="post" action="/console{re.escape(action)}".*?</form>', html, re.DOTALL)
    assert form is not None, action
    hidden = dict(re.findall(r'type="hidden" name="([^"]+)" value="([^"]*)"', form.group(0)))
    return http.post(f"/console{action}", data={**hidden, **fields}).status_code


def test_adjust_threshold_release_and_plan_change_go_through_the_engine(
    console: tuple[TestClient, CreditService]
) -> None:
    http, credits = console
    page = "/console/account?user_id=dora"
    credits.add_credits("dora", 100)
    hold = credits.reserve_credits("dora", 30)
    assert form_post(http, page, "/actions/adjust", amount="-25", reason="refund clawback") == 303
    assert form_post(http, page, "/actions/adjust", amount="5", reason="rounding") == 303
    assert credits.get_user_credits_info("dora").total == 80
    assert form_post(http, page, "/actions/threshold", threshold="40", reason="pilot") == 303
    assert "40" in http.get(page).text.split('id="threshold"')[1][:40]
    assert form_post(http, page, "/actions/release", reason="stuck job") == 303
    assert credits.get_reservation(hold.id).status == "released"
    # A reason is required.
    assert form_post(http, page, "/actions/adjust", amount="5", reason=" ") == 422

    plans = SubscriptionService(credits)
    basic, pro = plans.create_plan("basic", 100), plans.create_plan("pro", 1000)
    assert form_post(http, page, "/actions/plan", plan=str(basic.id), reason="signup") == 303
    assert form_post(http, page, "/actions/plan", plan=str(pro.id), reason="upgrade") == 303
    assert plans.get_user_subscription("dora").plan_id == pro.id
    assert audit(credits.engine).passed


def test_plans_are_created_once_and_edited(console: tuple[TestClient, CreditService]) -> None:
    http, credits = console
    html = http.get("/console/plans").text
    token = re.search(r'name="form_token" value="([^"]+)"', html).group(1)  # type: ignore[union-attr]
    fields = {"csrf_token": http.cookies["cw_console_csrf"], "form_token": token, "name": "team",
              "credit_limit": "5000", "billing_period": "monthly", "price": "19.5",
              "currency": "eur", "reason": "new tier"}
    assert http.post("/console/plans", data=fields).status_code == 303
    assert http.post("/console/plans", data=fields).status_code == 303  # the same form again
    plans = SubscriptionService(credits).list_plans(include_inactive=True)
    assert [(plan.name, plan.credit_limit, plan.currency) for plan in plans] == [("team", 5000, "EUR")]
    edit = f"/console/plans/edit?plan={plans[0].id}"
    assert form_post(http, edit, "/plans/edit", name="team", credit_limit="6000", price="19.5",
                     currency="EUR", active="on", reason="more credits") == 303
    assert SubscriptionService(credits).get_plan("team").credit_limit == 6000


def test_ledger_pages_filters_and_csv_export(console: tuple[TestClient, CreditService]) -> None:
    http, credits = console
    now = datetime.now(UTC)
    for day in range(3):
        credits.apply_batch(
            [{"op": "add", "user_id": "erin", "amount": 100}]
            + [{"op": "deduct", "user_id": "erin", "amount": 1, "description": "=cmd|calc"}] * 40,
            now=now - timedelta(days=day),
        )
    first = http.get("/console/account?user_id=erin").text
    assert first.count("<td>deduct</td>") + first.count("<td>add</td>") == 50
    older = re.search(r'id="older" href="([^"]+)"', first).group(1).replace("&amp;", "&")  # type: ignore[union-attr]
    assert "before=" in older
    adds = http.get("/console/account?user_id=erin&kind=add").text
    assert adds.count("<td>add</td>") == 3 and "<td>deduct</td>" not in adds

    yesterday = (now - timedelta(days=1)).date().isoformat()
    export = http.get(f"/console/account/ledger.csv?user_id=erin&since={yesterday}&until={yesterday}")
    assert export.status_code == 200 and export.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(export.text)))
    assert len(rows) == 41 and {row["created_at"][:10] for row in rows} == {yesterday}
    assert rows[1]["description"] == "'=cmd|calc"  # never a formula in a spreadsheet


def test_the_low_threshold_can_be_a_percentage_of_the_last_grant(
    console: tuple[TestClient, CreditService],
) -> None:
    http, credits = console
    page = "/console/account?user_id=vera"
    credits.add_credits("vera", 200)
    assert form_post(http, page, "/actions/threshold", percent="10", reason="pilot") == 303
    assert 'id="threshold">20' in http.get(page).text.replace("\n", "")
    credits.add_credits("vera", 50)  # the rule follows the last grant
    assert 'id="threshold">5<' in http.get(page).text.replace("\n", "")
    assert form_post(http, page, "/actions/threshold", percent="101", reason="too much") == 422
    assert form_post(http, page, "/actions/threshold", threshold="5", percent="10", reason="both") == 422


def test_the_threshold_form_sets_a_credit_types_own_threshold(
    console: tuple[TestClient, CreditService],
) -> None:
    http, credits = console
    page = "/console/account?user_id=wes"
    credits.add_credits("wes", 100)
    credits.add_credits("wes", 2000, credit_type="tokens")
    assert form_post(http, page, "/actions/threshold", percent="10", credit_type="tokens", reason="pilot") == 303
    assert form_post(http, page, "/actions/threshold", threshold="30", reason="pilot") == 303
    html = http.get(page).text.replace("\n", "")
    rows = {row.split('"')[0]: row for row in html.split('<tr data-type="')[1:]}
    assert 'class="num threshold">200<' in rows["tokens"]  # 10% of the last grant of tokens
    assert 'class="num threshold">30<' in rows["credits"]
    credits.deduct_credits("wes", 1850, credit_type="tokens")  # 150 <= 200: low, of tokens only
    with credits.engine.connect() as connection:
        lows = connection.scalars(select(OutboxEvent.payload).where(OutboxEvent.routing_key == "credits.low")).all()
    assert [(low["credit_type"], low["available"], low["threshold"]) for low in lows] == [("tokens", 150, 200)]
    assert form_post(http, page, "/actions/threshold", threshold="5", credit_type="Bad Type", reason="x") == 422


def test_the_grant_form_grants_in_the_credit_type_it_names(console: tuple[TestClient, CreditService]) -> None:
    http, credits = console
    page = "/console/account?user_id=gail"
    assert form_post(http, page, "/actions/grant", amount="70", reason="welcome") == 303
    assert form_post(http, page, "/actions/grant", amount="40", credit_type="images", reason="launch") == 303
    info = credits.get_user_credits_info("gail")
    assert info.total == 70
    assert credits.get_user_credits_info("gail", credit_type="images").total == 40
    assert 'value="images"' in http.get(page).text.split('id="grant-types"')[1][:200]
    assert form_post(http, page, "/actions/grant", amount="5", credit_type="Not A Type", reason="x") == 422
    assert credits.get_user_credits_info("gail", credit_type="images").total == 40
    assert audit(credits.engine).passed
