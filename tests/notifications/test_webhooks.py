"""Signed webhooks, from the outbox to a real HTTP receiver on loopback, on every database.

Signatures are checked the way a receiver checks them: with the `standardwebhooks` package.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from standardwebhooks import Webhook

from creditworker import CreditService
from creditworker.contract.errors import (
    InvalidWebhookUrl,
    UnknownEventPattern,
    UnknownWebhookDelivery,
    UnknownWebhookEndpoint,
    WebhookSecretUnreadable,
)
from creditworker.contract.webhooks import (
    CreateWebhookEndpoint,
    UpdateWebhookEndpoint,
    topic_matches,
)
from creditworker.notifications.webhooks.service import WebhookOptions, WebhookService
from creditworker.records.outbox import publish_pending
from creditworker.records.webhooks import fan_out
from creditworker.storage.tables import OutboxEvent, WebhookDeliveryRow, WebhookEndpointRow
from tests.notifications.receiver import Receiver

FAST = WebhookOptions(allow_private=True, timeout_seconds=2, retry_delays_seconds=(0, 0))


def relay(engine: Engine) -> int:
    """What the worker's relay does, with a broker that accepts everything."""
    return publish_pending(engine, lambda *_args: None,
                           also=lambda connection, rows: fan_out(connection, rows, datetime.now(UTC)) and None)


def low_balance_relayed(engine: Engine) -> CreditService:
    """Ann's account dropped below its threshold (a `credits.low` event), relayed to the
    webhook deliveries; the service, for more changes."""
    credits = CreditService(engine, low_credit_threshold=10)
    credits.add_credits("ann", 30)
    credits.deduct_credits("ann", 25)
    relay(engine)
    return credits



def verify(secret: str, received: Any) -> dict[str, Any]:
    verified: dict[str, Any] = Webhook(secret).verify(received.body, received.headers)
    return verified


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.stop()


@pytest.fixture
def hooks(engine: Engine) -> WebhookService:
    return WebhookService(engine, FAST)


def outbox_keys(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.scalars(select(OutboxEvent.routing_key).order_by(OutboxEvent.id)))


def test_registered_endpoint_receives_signed_events_with_the_account_snapshot(
    engine: Engine, hooks: WebhookService, receiver: Receiver
) -> None:
    endpoint = hooks.register(CreateWebhookEndpoint(url=receiver.url, events=["credits.*"], description="mail"))
    assert endpoint.secret.startswith("whsec_") and endpoint.events == ["credits.*"]
    low_balance_relayed(engine)
    done = hooks.deliver_due()
    assert (done.sent, done.succeeded) == (1, 1)
    [received] = receiver.received
    payload = verify(endpoint.secret, received)
    assert payload["type"] == "credits.low"
    assert payload["data"]["available"] == 5
    assert payload["data"]["account"] == {"balance": 5, "reserved": 0, "available": 5, "credit_type": "credits"}
    with engine.connect() as connection:
        event_id = connection.scalar(select(OutboxEvent.event_id))
    assert received.headers["webhook-id"] == event_id
    [delivery] = hooks.deliveries(endpoint.id)
    assert (delivery.status, delivery.attempts, delivery.last_response_status) == ("succeeded", 1, 204)
    assert hooks.delivery(delivery.id).log[0].outcome == "succeeded"  # type: ignore[index]


def test_each_delivery_carries_the_account_as_its_own_change_left_it(
    engine: Engine, hooks: WebhookService, receiver: Receiver
) -> None:
    """Two changes before the relay runs: each event has its own snapshot, not the latest."""
    endpoint = hooks.register(CreateWebhookEndpoint(url=receiver.url, events=["credits.low", "credits.depleted"]))
    credits = CreditService(engine, low_credit_threshold=10)
    credits.add_credits("ann", 30)
    credits.reserve_credits("ann", 22)  # 8 available: low
    credits.deduct_credits("ann", 8)  # 0 available: depleted
    relay(engine)
    hooks.deliver_due()
    snapshots = {verify(endpoint.secret, received)["type"]: verify(endpoint.secret, received)["data"]["account"]
                 for received in receiver.received}
    assert snapshots == {
        "credits.low": {"balance": 30, "reserved": 22, "available": 8, "credit_type": "credits"},
        "credits.depleted": {"balance": 22, "reserved": 22, "available": 0, "credit_type": "credits"},
    }


def test_an_endpoint_gets_only_the_events_its_patterns_match(
    engine: Engine, hooks: WebhookService, receiver: Receiver
) -> None:
    hooks.register(CreateWebhookEndpoint(url=receiver.url, events=["reservation.*"]))
    credits = CreditService(engine, low_credit_threshold=10)
    credits.add_credits("ann", 30)
    credits.deduct_credits("ann", 25)  # credits.low: not wanted
    relay(engine)
    assert hooks.deliver_due().sent == 0
    assert receiver.received == []


def test_a_failed_delivery_is_retried_with_the_same_webhook_id_until_it_succeeds(
    engine: Engine, hooks: WebhookService, receiver: Receiver
) -> None:
    endpoint = hooks.register(CreateWebhookEndpoint(url=receiver.url))
    low_balance_relayed(engine)
    receiver.status = 500
    assert hooks.deliver_due(max_rounds=1).failed == 1
    receiver.status = 200
    assert hooks.deliver_due().succeeded == 1
    ids = receiver.ids()
    assert len(ids) == 2 and ids[0] == ids[1]
    for received in receiver.received:
        verify(endpoint.secret, received)
    [delivery] = hooks.deliveries(endpoint.id)
    log = hooks.delivery(delivery.id).log or []
    assert [(item.attempt, item.outcome, item.response_status) for item in log] == [
        (1, "failed", 500), (2, "succeeded", 200)]


def test_a_410_disables_the_endpoint_at_once_and_publishes_endpoint_disabled(
    engine: Engine, hooks: WebhookService, receiver: Receiver
) -> None:
    endpoint = hooks.register(CreateWebhookEndpoint(url=receiver.url))
    receiver.status = 410
    credits = low_balance_relayed(engine)
    done = hooks.deliver_due()
    assert done.disabled_endpoints == [endpoint.id]
    after = hooks.endpoint(endpoint.id)
    assert not after.enabled and "410" in (after.disabled_reason or "")
    assert outbox_keys(engine)[-1] == "webhooks.endpoint_disabled"
    credits.deduct_credits("ann", 5)  # more events: a disabled endpoint gets none
    relay(engine)
    assert hooks.deliver_due().sent == 0
    assert len(receiver.received) == 1


def test_failing_for_the_whole_schedule_disables_the_endpoint(
    engine: Engine, hooks: WebhookService, receiver: Receiver
) -> None:
    endpoint = hooks.register(CreateWebhookEndpoint(url=receiver.url))
    receiver.status = 503
    low_balance_relayed(engine)
    for _attempt in range(3):  # the first attempt and the schedule's two retries
        hooks.deliver_due()
    assert len(receiver.received) == 3
    assert not hooks.endpoint(endpoint.id).enabled
    [delivery] = hooks.deliveries(endpoint.id)
    assert delivery.status == "failed"
    assert outbox_keys(engine).count("webhooks.endpoint_disabled") == 1


def test_replay_sends_a_delivery_again_and_an_unknown_one_is_a_clear_error(
    engine: Engine, hooks: WebhookService, receiver: Receiver
) -> None:
    endpoint = hooks.register(CreateWebhookEndpoint(url=receiver.url))
    low_balance_relayed(engine)
    hooks.deliver_due()
    [delivery] = hooks.deliveries(endpoint.id)
    assert hooks.replay(delivery.id).status == "pending"
    hooks.deliver_due()
    assert receiver.ids()[0] == receiver.ids()[1]
    with pytest.raises(UnknownWebhookDelivery):
        hooks.replay(delivery.id + 1000)
    assert hooks.delivery(delivery.id).attempts == 2


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("url", [
    "ftp://example.com/hook", "file:///etc/passwd", "javascript:alert(1)", "http://", "https://" + "a" * 2001 + ".com",
    "http://user:pw@example.com/", "http://[::1", "http://localhost:8080/x", "http://127.0.0.1/x",
    "http://10.1.2.3/x", "http://169.254.169.254/latest/meta-data", "http://[::1]/x", "http://192.168.1.1/",
    "http://no-such-host.invalid/",
])
def test_urls_that_are_not_public_http_are_refused_and_nothing_is_stored(engine: Engine, url: str) -> None:
    hooks = WebhookService(engine, WebhookOptions(allow_private=False))
    with pytest.raises(InvalidWebhookUrl) as refused:
        hooks.register(CreateWebhookEndpoint.model_construct(url=url, events=None, description=None))
    assert refused.value.code == "invalid_webhook_url" and refused.value.message
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(WebhookEndpointRow)) == 0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_unknown_event_pattern_is_refused_and_nothing_is_stored(engine: Engine, hooks: WebhookService) -> None:
    with pytest.raises(UnknownEventPattern) as refused:
        hooks.register(CreateWebhookEndpoint(url="http://127.0.0.1:9/x", events=["credits.*", "credit.low"]))
    assert "credit.low" in refused.value.message
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(WebhookEndpointRow)) == 0
    endpoint = hooks.register(CreateWebhookEndpoint(url="http://127.0.0.1:9/x", events=["#"]))
    with pytest.raises(UnknownEventPattern):
        hooks.update(endpoint.id, UpdateWebhookEndpoint(events=["nope.*"]))
    assert hooks.endpoint(endpoint.id).events == ["#"]


def test_event_patterns_read_as_on_the_topic_exchange() -> None:
    assert topic_matches("credits.*", "credits.low")
    assert not topic_matches("credits.*", "reservation.expired")
    assert topic_matches("#", "subscription.changed")
    assert topic_matches("*.expired", "reservation.expired")
    assert not topic_matches("credits", "credits.low")
    assert topic_matches("credits.#", "credits.low")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_endpoints_are_listed_updated_disabled_and_removed(engine: Engine, hooks: WebhookService) -> None:
    first = hooks.register(CreateWebhookEndpoint(url="http://127.0.0.1:9/a"))
    second = hooks.register(CreateWebhookEndpoint(url="http://127.0.0.1:9/b", events=["credits.low"]))
    assert [endpoint.id for endpoint in hooks.endpoints()] == [first.id, second.id]
    changed = hooks.update(second.id, UpdateWebhookEndpoint(description="billing", events=["credits.*"]))
    assert (changed.description, changed.events) == ("billing", ["credits.*"])
    assert not hooks.disable(first.id).enabled
    assert hooks.update(first.id, UpdateWebhookEndpoint(enabled=True)).disabled_reason is None
    hooks.remove(first.id)
    with pytest.raises(UnknownWebhookEndpoint):
        hooks.remove(first.id)
    assert [endpoint.id for endpoint in hooks.endpoints()] == [second.id]


def test_a_rotated_secret_and_the_previous_one_both_sign_during_the_grace_period(
    engine: Engine, hooks: WebhookService, receiver: Receiver
) -> None:
    endpoint = hooks.register(CreateWebhookEndpoint(url=receiver.url))
    rotated = hooks.rotate_secret(endpoint.id)
    assert rotated.secret != endpoint.secret and rotated.rotating_until is not None
    low_balance_relayed(engine)
    hooks.deliver_due()
    [received] = receiver.received
    assert received.headers["webhook-signature"].count("v1,") == 2
    verify(endpoint.secret, received)
    verify(rotated.secret, received)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_secrets_are_sealed_at_rest_when_a_key_is_given(engine: Engine, receiver: Receiver) -> None:
    sealed = WebhookService(engine, WebhookOptions(allow_private=True, secret_key="k" * 32, retry_delays_seconds=(0,)))
    endpoint = sealed.register(CreateWebhookEndpoint(url=receiver.url))
    with engine.connect() as connection:
        stored = connection.scalar(select(WebhookEndpointRow.secret))
    assert stored.startswith("fernet:") and endpoint.secret.removeprefix("whsec_") not in stored
    low_balance_relayed(engine)
    assert sealed.deliver_due().succeeded == 1
    verify(endpoint.secret, receiver.received[0])
    with pytest.raises(WebhookSecretUnreadable):
        WebhookService(engine, WebhookOptions(secret_key="another")).box.open(stored)
    with pytest.raises(WebhookSecretUnreadable):
        WebhookService(engine, WebhookOptions()).box.open(stored)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_slow_receiver_holds_a_sender_only_for_the_timeout_and_stalls_no_other(
    engine: Engine, receiver: Receiver
) -> None:
    fast = Receiver()
    try:
        hooks = WebhookService(engine, WebhookOptions(allow_private=True, timeout_seconds=0.5,
                                                      retry_delays_seconds=(60,)))
        hooks.register(CreateWebhookEndpoint(url=receiver.url))
        quick = hooks.register(CreateWebhookEndpoint(url=fast.url))
        receiver.delay_seconds = 5
        credits = CreditService(engine, low_credit_threshold=10)
        for user in ("ann", "bob", "cy"):
            credits.add_credits(user, 30)
            credits.deduct_credits(user, 25)
        relay(engine)
        started = time.monotonic()
        done = hooks.deliver_due()
        assert time.monotonic() - started < 3
        assert (done.sent, done.succeeded) == (6, 3)
        assert len(fast.received) == 3
        slow_log = [hooks.delivery(d.id).log for d in hooks.deliveries(quick.id - 1)]
        assert all(log and log[0].error and "timed out" in log[0].error for log in slow_log)
    finally:
        fast.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_huge_answer_is_read_only_up_to_a_small_limit(engine: Engine, receiver: Receiver) -> None:
    hooks = WebhookService(engine, FAST)
    endpoint = hooks.register(CreateWebhookEndpoint(url=receiver.url))
    receiver.answer_body = b"x" * 5_000_000
    receiver.status = 200
    low_balance_relayed(engine)
    assert hooks.deliver_due().succeeded == 1
    [delivery] = hooks.deliveries(endpoint.id)
    [attempt] = hooks.delivery(delivery.id).log or []
    assert attempt.response_body is not None and len(attempt.response_body) <= 1024


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_log_is_forgotten_after_the_retention_period(engine: Engine, receiver: Receiver) -> None:
    hooks = WebhookService(engine, FAST)
    hooks.register(CreateWebhookEndpoint(url=receiver.url))
    low_balance_relayed(engine)
    hooks.deliver_due()
    assert hooks.purge() == 0
    forgetful = WebhookService(engine, WebhookOptions(log_retention_days=1e-9))
    assert forgetful.purge() == 1
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(WebhookDeliveryRow)) == 0


def test_an_endpoint_removed_while_its_deliveries_are_in_flight_loses_nothing_else(
    engine: Engine, receiver: Receiver
) -> None:
    from datetime import timedelta

    from creditworker.notifications.webhooks import sending
    from creditworker.records import webhooks as store

    hooks = WebhookService(engine, FAST)
    gone = hooks.register(CreateWebhookEndpoint(url=receiver.url))
    kept = hooks.register(CreateWebhookEndpoint(url=receiver.url))
    low_balance_relayed(engine)
    claimed = store.claim_due(engine, datetime.now(UTC), limit=10, lease=timedelta(minutes=1))
    assert len(claimed) == 2
    hooks.remove(gone.id)
    outcomes = [hooks._decide(delivery, sending.Response(204, "", None, 3), datetime.now(UTC))
                for delivery in claimed]
    assert store.record_outcomes(engine, outcomes, datetime.now(UTC), lambda *_args: {}) == []
    [delivery] = hooks.deliveries(kept.id)
    assert (delivery.status, delivery.attempts) == ("succeeded", 1)


def test_a_typed_alert_is_delivered_with_that_types_snapshot(
    engine: Engine, hooks: WebhookService, receiver: Receiver
) -> None:
    """Per-type alerts: the payload names the type and carries that type's totals, not the
    default type's (the account holds both)."""
    endpoint = hooks.register(CreateWebhookEndpoint(url=receiver.url, events=["credits.low", "credits.depleted"]))
    credits = CreditService(engine)
    credits.add_credits("ann", 30)
    credits.add_credits("ann", 1000, credit_type="tokens")
    credits.set_low_credit_threshold("ann", 100, credit_type="tokens")
    credits.reserve_credits("ann", 920, credit_type="tokens")  # 80 tokens available: low
    credits.deduct_credits("ann", 80, credit_type="tokens")  # 0: depleted
    relay(engine)
    assert hooks.deliver_due().succeeded == 2
    payloads = {payload["type"]: payload["data"] for payload in
                (verify(endpoint.secret, received) for received in receiver.received)}
    assert payloads["credits.low"]["credit_type"] == "tokens"
    assert (payloads["credits.low"]["available"], payloads["credits.low"]["threshold"]) == (80, 100)
    assert payloads["credits.low"]["account"] == {"balance": 1000, "reserved": 920, "available": 80,
                                                  "credit_type": "tokens"}
    assert payloads["credits.depleted"]["account"] == {"balance": 920, "reserved": 920, "available": 0,
                                                       "credit_type": "tokens"}
