"""`/credits/webhooks` in the gateway: endpoints, the delivery log and replays, on a real
database, sending to a real receiver on loopback."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from standardwebhooks import Webhook

from creditworker import CreditService
from creditworker.http.api.app import create_app
from creditworker.records.outbox import publish_pending
from creditworker.records.webhooks import fan_out
from creditworker.settings import Settings
from creditworker.storage.tables import WebhookEndpointRow
from tests.notifications.receiver import Receiver

KEY = "webhook-test-key"


def gateway(database_url: str, tmp_path: Path, *, allow_private: bool = True) -> TestClient:
    settings = Settings(database_url=database_url, broker_url="filesystem://", data_dir=str(tmp_path / "data"),
                        api_keys=KEY, webhooks_allow_private=allow_private, ledger_path=None)
    return TestClient(create_app(settings), headers={"Authorization": f"Bearer {KEY}"})


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_endpoints_deliveries_and_replay_over_http(engine: Engine, database_url: str, tmp_path: Path) -> None:
    receiver = Receiver()
    http = gateway(database_url, tmp_path)
    try:
        created = http.post("/credits/webhooks", json={"url": receiver.url, "events": ["credits.*"],
                                                       "description": "billing"})
        assert created.status_code == 201, created.text
        endpoint = created.json()
        assert endpoint["secret"].startswith("whsec_") and endpoint["events"] == ["credits.*"]
        listed = http.get("/credits/webhooks").json()
        assert [(e["id"], e["description"]) for e in listed] == [(endpoint["id"], "billing")]
        assert "secret" not in listed[0]
        credits = CreditService(engine, low_credit_threshold=10)
        credits.add_credits("ann", 30)
        credits.deduct_credits("ann", 25)
        publish_pending(engine, lambda *_args: None,
                        also=lambda connection, rows: fan_out(connection, rows, datetime.now(UTC)) and None)
        http.app.state.webhooks.deliver_due()  # what the worker's task runs
        [delivery] = http.get(f"/credits/webhooks/{endpoint['id']}/deliveries").json()
        assert (delivery["status"], delivery["last_response_status"], delivery["attempts"]) == ("succeeded", 204, 1)
        shown = http.get(f"/credits/webhooks/deliveries/{delivery['id']}").json()
        assert shown["payload"]["data"]["account"]["available"] == 5
        assert [attempt["outcome"] for attempt in shown["log"]] == ["succeeded"]
        replayed = http.post(f"/credits/webhooks/deliveries/{delivery['id']}/replay")
        assert (replayed.status_code, replayed.json()["status"]) == (202, "pending")
        http.app.state.webhooks.deliver_due()
        assert len(receiver.received) == 2
        for received in receiver.received:
            Webhook(endpoint["secret"]).verify(received.body, received.headers)
        disabled = http.patch(f"/credits/webhooks/{endpoint['id']}", json={"enabled": False})
        assert disabled.json()["enabled"] is False
        rotated = http.post(f"/credits/webhooks/{endpoint['id']}/rotate-secret").json()
        assert rotated["secret"] != endpoint["secret"] and rotated["rotating_until"]
        assert http.delete(f"/credits/webhooks/{endpoint['id']}").json() == {"removed": endpoint["id"]}
        gone = http.get(f"/credits/webhooks/{endpoint['id']}")
        assert (gone.status_code, gone.json()["error"]["code"]) == (404, "unknown_webhook_endpoint")
    finally:
        receiver.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_bad_input_is_a_clear_error_and_stores_nothing(engine: Engine, database_url: str, tmp_path: Path) -> None:
    http = gateway(database_url, tmp_path, allow_private=False)
    cases = [
        ({"url": "ftp://example.com/x"}, 422, "invalid_webhook_url"),
        ({"url": "http://127.0.0.1:8080/x"}, 422, "invalid_webhook_url"),
        ({"url": "http://169.254.169.254/latest"}, 422, "invalid_webhook_url"),
        ({"url": "https://" + "a" * 3000 + ".com/"}, 422, "invalid_input"),
        ({"url": "https://example.com/x", "events": ["credits.lowish"]}, 422, "unknown_event_pattern"),
        ({"url": "https://example.com/x", "secret": "mine"}, 422, "invalid_input"),
    ]
    for body, status, code in cases:
        answer = http.post("/credits/webhooks", json=body)
        assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), body
    replay = http.post("/credits/webhooks/deliveries/12345/replay")
    assert (replay.status_code, replay.json()["error"]["code"]) == (404, "unknown_webhook_delivery")
    assert http.get("/credits/webhooks/abc").status_code == 422
    assert TestClient(http.app).get("/credits/webhooks").status_code == 401
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(WebhookEndpointRow)) == 0


@pytest.mark.parametrize("database_url", ["sqlite", "postgres"], indirect=True)
def test_no_webhook_route_answers_a_server_error_and_each_is_documented(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    """Schemathesis cases for the webhook routes (the gateway's own test covers the rest)."""
    import json

    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    app = gateway(database_url, tmp_path, allow_private=False).app
    document = app.openapi()
    ours = {path: methods for path, methods in document["paths"].items() if path.startswith("/credits/webhooks")}
    assert len([method for methods in ours.values() for method in methods]) == 9
    for path, methods in ours.items():
        for method, operation in methods.items():
            assert operation.get("tags") == ["webhooks"] and operation.get("summary"), (method, path)
            text = json.dumps({"responses": operation.get("responses"), "body": operation.get("requestBody")})
            assert '"example' in text, (method, path)
    config = schemathesis.config.SchemathesisConfig.from_dict(
        {"generation": {"max-examples": 25}, "phases": {"stateful": {"enabled": False}}})
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    operations = [result.ok() for result in schema.get_all_operations()
                  if result.ok().path.startswith("/credits/webhooks")]
    assert len(operations) == 9
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
        def no_server_error(case: object) -> None:
            case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"},  # type: ignore[attr-defined]
                                   checks=[not_a_server_error])

        no_server_error()
