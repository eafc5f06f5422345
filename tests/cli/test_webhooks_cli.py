"""`creditworker webhooks ...` against real databases, sending to a real receiver."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from standardwebhooks import Webhook

from creditworker import CreditService
from creditworker.notifications.webhooks.service import WebhookOptions, WebhookService
from creditworker.records.outbox import publish_pending
from creditworker.records.webhooks import fan_out
from creditworker.settings import get_settings
from creditworker.storage.tables import OutboxEvent
from tests.cli.test_cli import cli
from tests.notifications.receiver import Receiver


@pytest.fixture
def allow_private(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("CREDITWORKER_WEBHOOKS_ALLOW_PRIVATE", "1")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_add_list_deliveries_replay_and_remove_from_the_command_line(
    engine: Engine, database_url: str, allow_private: None
) -> None:
    receiver = Receiver()
    try:
        code, out, err = cli(database_url, "webhooks", "add", receiver.url, "--events", "credits.*,reservation.*")
        assert code == 0, err
        lines = dict(line.split(": ", 1) for line in out.splitlines())
        endpoint_id, secret = int(lines["id"]), lines["secret"]
        assert secret.startswith("whsec_") and lines["events"] == "credits.*,reservation.*"
        code, out, _ = cli(database_url, "webhooks", "list", "--json")
        assert [(e["id"], e["url"], e["enabled"]) for e in json.loads(out)] == [(endpoint_id, receiver.url, True)]
        credits = CreditService(engine, low_credit_threshold=10)
        credits.add_credits("ann", 30)
        credits.deduct_credits("ann", 25)
        publish_pending(engine, lambda *_args: None,
                        also=lambda connection, rows: fan_out(connection, rows, datetime.now(UTC)) and None)
        WebhookService(engine, WebhookOptions(allow_private=True)).deliver_due()
        code, out, _ = cli(database_url, "webhooks", "deliveries", str(endpoint_id), "--json")
        [delivery] = json.loads(out)
        assert (delivery["status"], delivery["last_response_status"]) == ("succeeded", 204)
        code, out, err = cli(database_url, "webhooks", "replay", str(delivery["id"]))
        assert code == 0 and "replay queued" in out, err
        WebhookService(engine, WebhookOptions(allow_private=True)).deliver_due()
        assert len(receiver.received) == 2
        for received in receiver.received:
            Webhook(secret).verify(received.body, received.headers)
        code, _, err = cli(database_url, "webhooks", "replay", "999999")
        assert code == 2 and "unknown_webhook_delivery" in err
        code, out, _ = cli(database_url, "webhooks", "remove", str(endpoint_id))
        assert code == 0 and f"removed {endpoint_id}" in out
        code, _, err = cli(database_url, "webhooks", "remove", str(endpoint_id))
        assert code == 2 and "unknown_webhook_endpoint" in err
    finally:
        receiver.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_bad_endpoints_are_refused_with_a_clear_error_and_nothing_stored(engine: Engine, database_url: str) -> None:
    get_settings.cache_clear()
    code, _, err = cli(database_url, "webhooks", "add", "ftp://example.com/x")
    assert code == 2 and "invalid_webhook_url" in err and "http or https" in err
    code, _, err = cli(database_url, "webhooks", "add", "http://127.0.0.1:9/x")
    assert code == 2 and "CREDITWORKER_WEBHOOKS_ALLOW_PRIVATE" in err
    code, _, err = cli(database_url, "webhooks", "add", "https://example.com/x", "--events", "credit.low")
    assert code == 2 and "unknown_event_pattern" in err
    code, out, _ = cli(database_url, "webhooks", "list", "--json")
    assert json.loads(out) == []


def test_alert_thresholds_from_the_command_line(engine: Engine, database_url: str) -> None:
    assert cli(database_url, "add", "ann", "200")[0] == 0
    code, out, err = cli(database_url, "alerts", "threshold", "ann", "--percent", "25")
    assert code == 0 and "25% of the last grant, now 50" in out, err
    code, out, _ = cli(database_url, "alerts", "threshold", "ann", "--amount", "10")
    assert code == 0 and "ann: 10" in out
    code, _, err = cli(database_url, "alerts", "threshold", "ann", "--amount", "10", "--percent", "5")
    assert code == 2 and "exactly one" in err
    code, _, err = cli(database_url, "alerts", "threshold", "nobody", "--percent", "5")
    assert code == 2 and "unknown_user" in err


def test_alert_thresholds_per_credit_type_from_the_command_line(engine: Engine, database_url: str) -> None:
    assert cli(database_url, "add", "ann", "1000", "--credit-type", "tokens")[0] == 0
    code, out, err = cli(database_url, "alerts", "threshold", "ann", "--percent", "10", "--credit-type", "tokens")
    assert code == 0 and "ann (tokens): 10% of the last grant, now 100" in out, err
    code, out, err = cli(database_url, "alerts", "threshold", "ann", "--amount", "250", "--credit-type", "tokens",
                         "--json")
    assert code == 0, err
    assert json.loads(out) == {"user_id": "ann", "credit_type": "tokens", "threshold": 250, "percent": None}
    code, out, _ = cli(database_url, "alerts", "threshold", "ann", "--default", "--credit-type", "tokens")
    assert code == 0 and "ann (tokens): none" in out
    code, _, err = cli(database_url, "alerts", "threshold", "ann", "--amount", "5", "--credit-type", "no spaces")
    assert code == 2 and "invalid_input" in err and "credit_type" in err
    assert cli(database_url, "alerts", "threshold", "ann", "--amount", "300", "--credit-type", "tokens")[0] == 0
    CreditService(engine).deduct_credits("ann", 750, credit_type="tokens")  # 250 <= 300: low, of tokens
    with engine.connect() as connection:
        [low] = connection.scalars(select(OutboxEvent.payload).where(OutboxEvent.routing_key == "credits.low"))
    assert (low["credit_type"], low["available"], low["threshold"]) == ("tokens", 250, 300)
