"""The operator console in a real headless Chromium against a real `creditworker serve`,
on the embedded defaults and on PostgreSQL + Redis (with a real worker)."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from creditworker import SubscriptionService
from creditworker.settings import Settings
from producers import CreditClient
from tests.console.conftest import API_KEY, ConsoleServer

PAGES = ["/", "/?q=a", "/account?user_id=someone", "/account/ledger.csv?user_id=someone",
         "/plans", "/plans/edit?plan=1", "/system"]
ACTIONS = ["/actions/grant", "/actions/adjust", "/actions/release", "/actions/threshold",
           "/actions/plan", "/plans", "/plans/edit", "/system/audit", "/logout"]


def new_user(prefix: str = "console") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def shot(page: Any, folder: Path, name: str) -> None:
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def log_in(page: Any, server: ConsoleServer, then: str = "/") -> None:
    page.goto(f"{server.console}{then}")
    assert "/console/login" in page.url
    page.fill("input[name=api_key]", API_KEY)
    page.click("form[action$='/login'] button[type=submit]")
    page.wait_for_url(re.compile(r"/console/(?!login)"))


def number(page: Any, selector: str) -> int:
    return int(page.inner_text(selector).split()[0].replace(",", ""))


def ledger_size(server: ConsoleServer, user_id: str) -> int:
    return len(server.credits.get_history(user_id, limit=1000))


def test_every_page_refuses_without_a_key(server: ConsoleServer, page: Any, tmp_path: Path) -> None:
    forged = httpx.Client(base_url=server.console, follow_redirects=False, timeout=10,
                          cookies={"cw_console_session": "0123456789abcdef.9999999999.00"})
    with forged, httpx.Client(base_url=server.console, follow_redirects=False, timeout=10) as http:
        for path in PAGES:
            answer = http.get(path)
            assert answer.status_code == 303, path
            assert answer.headers["location"].startswith("/console/login?next="), path
            assert http.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert forged.get(path).status_code == 303, path
        for path in ACTIONS:
            assert http.post(path, data={"user_id": "x"}).status_code == 401, path
        assert http.get("/login").status_code == 200
        # A bearer key is enough without a session, for scripts.
        bearer = http.get("/", headers={"Authorization": f"Bearer {API_KEY}"})
        assert bearer.status_code == 200
    page.goto(f"{server.console}/system")
    assert "/console/login" in page.url
    assert page.is_visible("input[name=api_key]")
    shot(page, tmp_path, "login")
    page.fill("input[name=api_key]", "not-a-key")
    page.click("form[action$='/login'] button[type=submit]")
    assert page.is_visible("text=That is not a valid API key.")


def test_log_in_find_an_account_and_read_the_engines_balance(
    server: ConsoleServer, page: Any, tmp_path: Path
) -> None:
    user_id = new_user("findme")
    credits = server.credits
    credits.add_credits(user_id, 1250, description="first top-up")
    credits.deduct_credits(user_id, 200, description="usage")
    credits.reserve_credits(user_id, 50, ttl_seconds=600)
    engine_view = credits.get_user_credits_info(user_id)

    log_in(page, server)
    shot(page, tmp_path, "accounts")
    page.fill("input[name=q]", user_id[:12])
    page.click("form.search button[type=submit]")
    page.click(f"#accounts a:text-is('{user_id}')")
    page.wait_for_selector("#total")
    assert number(page, "#total") == engine_view.total == 1050
    assert number(page, "#reserved") == engine_view.reserved == 50
    assert number(page, "#available") == engine_view.available == 1000
    assert page.locator("#ledger tbody tr").count() == 3
    assert page.locator("#holds tbody tr").count() == 1
    assert page.locator("#chart rect.bar").count() >= 2
    shot(page, tmp_path, "account")
    page.set_viewport_size({"width": 390, "height": 844})
    shot(page, tmp_path, "account-phone")
    page.set_viewport_size({"width": 1100, "height": 900})


def test_the_account_page_shows_each_credit_type_and_pending_credits(server: ConsoleServer, page: Any) -> None:
    user_id = new_user("types")
    credits = server.credits
    credits.add_credits(user_id, 300)
    credits.add_credits(user_id, 40, credit_type="images", cost_basis={"amount": "0.050", "currency": "EUR"})
    credits.add_credits(user_id, 25, effective_at=datetime(2099, 1, 1, tzinfo=UTC))
    credits.reserve_credits(user_id, 15, credit_type="images", ttl_seconds=600)
    credits.set_low_credit_threshold(user_id, 5, credit_type="images")
    log_in(page, server, f"/account?user_id={quote(user_id)}")
    page.wait_for_selector("#credit-types")
    assert number(page, "#total") == 325 and number(page, "#pending") == 25 and number(page, "#available") == 300
    rows = {row.get_attribute("data-type"): row.locator("td").all_inner_texts()
            for row in page.locator("#credit-types tbody tr").all()}
    assert [cell.replace(",", "") for cell in rows["images"]] == ["images", "40", "15", "25", "0", "5"]
    assert [cell.replace(",", "") for cell in rows["credits"]] == ["credits", "325", "0", "300", "25", "none"]
    lots = page.locator("#lots tbody tr").all_inner_texts()
    assert any("images" in lot and "0.05 EUR" in lot for lot in lots), lots
    assert any("pending until" in lot for lot in lots), lots


def test_grant_through_the_form_adds_one_ledger_entry(
    server: ConsoleServer, page: Any, tmp_path: Path
) -> None:
    user_id = new_user("grant")
    server.credits.add_credits(user_id, 10)
    log_in(page, server, f"/account?user_id={quote(user_id)}")
    before = ledger_size(server, user_id)
    rows_before = page.locator("#ledger tbody tr").count()

    page.click("summary:text('Grant credits')")
    page.fill("#grant-form input[name=amount]", "300")
    page.fill("#grant-form input[name=reason]", "goodwill after the outage")
    page.click("#grant-form button[type=submit]")
    page.wait_for_selector("text=Credits granted.")

    assert ledger_size(server, user_id) == before + 1
    assert page.locator("#ledger tbody tr").count() == rows_before + 1
    newest = server.credits.get_history(user_id, limit=1)[0]
    assert (newest.kind, newest.amount, newest.description) == (
        "add", 300, "goodwill after the outage")
    assert newest.idempotency_key.startswith("console:grant:")
    assert number(page, "#total") == server.credits.get_user_credits_info(user_id).total == 310
    shot(page, tmp_path, "account-after-grant")


def test_a_form_submitted_twice_acts_once(server: ConsoleServer, page: Any) -> None:
    user_id = new_user("twice")
    server.credits.add_credits(user_id, 10)
    log_in(page, server, f"/account?user_id={quote(user_id)}")
    before = ledger_size(server, user_id)
    # Two posts of the same rendered form at once, past the button's one-click guard: a
    # double click, or a browser that resends the POST.
    statuses = page.evaluate("""async () => {
        const form = document.querySelector('#grant-form');
        form.querySelector('[name=amount]').value = '40';
        form.querySelector('[name=reason]').value = 'double click';
        const post = () => fetch(form.action, {method: 'POST', body: new URLSearchParams(new FormData(form))});
        const answers = await Promise.all([post(), post()]);
        return answers.map(answer => answer.status);
    }""")
    assert statuses == [200, 200]
    assert ledger_size(server, user_id) == before + 1
    assert server.credits.get_user_credits_info(user_id).total == 50


def test_a_form_without_its_csrf_token_is_refused(server: ConsoleServer, page: Any) -> None:
    user_id = new_user("csrf")
    server.credits.add_credits(user_id, 10)
    log_in(page, server, f"/account?user_id={quote(user_id)}")
    before = ledger_size(server, user_id)
    answers = page.evaluate("""async () => {
        const form = document.querySelector('#grant-form');
        form.querySelector('[name=amount]').value = '40';
        form.querySelector('[name=reason]').value = 'forged';
        const without = new URLSearchParams(new FormData(form));
        without.delete('csrf_token');
        const wrong = new URLSearchParams(new FormData(form));
        wrong.set('csrf_token', 'x'.repeat(43));
        const post = async body => (await fetch(form.action, {method: 'POST', body})).status;
        return [await post(without), await post(wrong)];
    }""")
    assert answers == [403, 403]
    assert ledger_size(server, user_id) == before


def test_plans_and_system_pages(server: ConsoleServer, page: Any, tmp_path: Path) -> None:
    log_in(page, server, "/plans")
    name = new_user("plan")
    if not page.is_visible("#create-plan-form"):  # folded once plans exist (other tests' too)
        page.click("summary:text('Create a plan')")
    page.fill("#create-plan-form input[name=name]", name)
    page.fill("#create-plan-form input[name=credit_limit]", "1000")
    page.fill("#create-plan-form input[name=reason]", "new tier")
    page.click("#create-plan-form button[type=submit]")
    page.wait_for_selector("text=Plan created.")
    assert page.locator(f"#plans td:text-is('{name}')").count() == 1
    shot(page, tmp_path, "plans")

    user_id = new_user("subscriber")
    server.credits.add_credits(user_id, 1)
    page.goto(f"{server.console}/account?user_id={quote(user_id)}")
    page.click("summary:text('Assign a plan')")
    plan_id = SubscriptionService(server.credits).get_plan(name).id
    page.select_option("#plan-form select[name=plan]", value=str(plan_id))
    page.fill("#plan-form input[name=reason]", "trial")
    page.click("#plan-form button[type=submit]")
    page.wait_for_selector("text=Plan set.")
    assert name in page.inner_text("#subscription")
    assert number(page, "#total") == 1001

    waiting = 0
    if not server.has_worker:  # a message nobody consumes waits in the embedded queue
        settings = Settings(broker_url="filesystem://",
                            data_dir=str(server.workdir / ".creditworker"))
        CreditClient(settings).add_credits(new_user("queued"), 5)
        waiting = 1
    page.goto(f"{server.console}/system")
    page.click("text=Run the audit")
    page.wait_for_selector("text=Audit finished.")
    assert "Passed" in page.inner_text("#audit")
    assert page.inner_text("#queues tbody tr").split() == ["celery", str(waiting)]
    if server.has_worker:
        assert "pong" in page.inner_text("#workers")
    shot(page, tmp_path, "system")
