"""The console's webhook pages: endpoints, the delivery log, an attempt's details and the
replay button, on a real database with a real receiver."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from creditworker import CreditService
from creditworker.records.outbox import publish_pending
from creditworker.records.webhooks import fan_out
from tests.http.test_webhooks_routes import gateway
from tests.notifications.receiver import Receiver


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_delivery_log_shows_each_attempt_and_replay_sends_again(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    receiver = Receiver()
    receiver.status = 500
    http = gateway(database_url, tmp_path)
    try:
        endpoint = http.post("/credits/webhooks", json={"url": receiver.url, "description": "billing"}).json()
        credits = CreditService(engine, low_credit_threshold=10)
        credits.add_credits("ann", 30)
        credits.deduct_credits("ann", 25)
        publish_pending(engine, lambda *_args: None,
                        also=lambda connection, rows: fan_out(connection, rows, datetime.now(UTC)) and None)
        http.app.state.webhooks.deliver_due()
        listing = http.get("/console/webhooks")
        assert listing.status_code == 200 and receiver.url in listing.text and "billing" in listing.text
        log = http.get(f"/console/webhooks/{endpoint['id']}")
        assert log.status_code == 200
        [delivery] = http.get(f"/credits/webhooks/{endpoint['id']}/deliveries").json()
        assert delivery["event_id"] in log.text and "pending" in log.text and ">500<" in log.text
        assert f"/webhooks/deliveries/{delivery['id']}/replay" in log.text
        detail = http.get(f"/console/webhooks/deliveries/{delivery['id']}")
        assert detail.status_code == 200 and "failed" in detail.text and "credits.low" in detail.text
        receiver.status = 204
        replayed = http.post(f"/console/webhooks/deliveries/{delivery['id']}/replay", follow_redirects=False)
        assert replayed.status_code == 303 and replayed.headers["location"].endswith(f"/webhooks/{endpoint['id']}?done=replay")
        http.app.state.webhooks.deliver_due()
        assert len(receiver.received) == 2 and receiver.ids()[0] == receiver.ids()[1]
        after = http.get(f"/console/webhooks/{endpoint['id']}?done=replay")
        assert "Replay queued" in after.text and "succeeded" in after.text
        missing = http.post("/console/webhooks/deliveries/999999/replay", follow_redirects=False)
        assert missing.status_code == 404 and "no webhook delivery" in missing.text
    finally:
        receiver.stop()
