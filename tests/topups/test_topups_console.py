"""The console's account page shows the account's auto top-up rules and its latest top-ups
with their states (issue 29). In process, over the gateway's real app, on a SQLite file."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

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
