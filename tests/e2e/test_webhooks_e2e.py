"""Webhooks end to end: real workers and beat on RabbitMQ, PostgreSQL, a real receiver.

Operations go through the producer client; the worker's relay queues deliveries from the
outbox, the delivery task posts them, beat runs the retries. What is checked is what a
receiver sees: every event, verified with `standardwebhooks`, under the event's own id.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from standardwebhooks import Webhook

from creditworker.contract.webhooks import CreateWebhookEndpoint
from creditworker.notifications.webhooks.service import WebhookOptions, WebhookService
from creditworker.storage.tables import OutboxEvent
from creditworker.worker import commands
from tests.conftest import wipe
from tests.e2e.conftest import RunningWorker, _running
from tests.harness import free_port, launch, stop_group
from tests.notifications.receiver import Receiver

pytestmark = pytest.mark.e2e

SETTINGS = {
    "CREDITWORKER_RESULT_BACKEND": "rpc://",
    "CREDITWORKER_RELAY_INTERVAL_SECONDS": "1",
    "CREDITWORKER_WEBHOOKS_INTERVAL_SECONDS": "1",
    "CREDITWORKER_WEBHOOKS_RETRY_DELAYS_SECONDS": "[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]",
    "CREDITWORKER_WEBHOOKS_TIMEOUT_SECONDS": "2",
    "CREDITWORKER_WEBHOOKS_ALLOW_PRIVATE": "1",
    "CREDITWORKER_LOW_CREDIT_THRESHOLD": "10",
    # Many other processes share this machine: expire stale holds and sweep rarely.
    "CREDITWORKER_EXPIRE_INTERVAL_SECONDS": "3600",
    "CREDITWORKER_RELEASE_STALE_INTERVAL_SECONDS": "3600",
    "CREDITWORKER_REMINDER_INTERVAL_SECONDS": "3600",
    "CREDITWORKER_ALLOCATE_INTERVAL_SECONDS": "3600",
}


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, rabbitmq_url: str,
    migrated_engines: dict[str, Engine],
) -> Iterator[dict[str, Any]]:
    """Two workers (named apart) and one beat on RabbitMQ and PostgreSQL."""
    for worker in _running(tmp_path_factory, postgres_url, rabbitmq_url, migrated_engines, **SETTINGS):
        second = RunningWorker(worker.env, worker.workdir, worker.engine, worker.workdir / "worker-2.log",
                               hostname=f"second-{free_port()}@{socket.gethostname()}")
        second.start()
        beat = launch(commands.beat_command(str(worker.workdir / "beat.schedule")), worker.env,
                      worker.workdir, worker.workdir / "beat.log")
        try:
            yield {"worker": worker, "second": second}
        finally:
            stop_group(beat)
            second.stop()


@pytest.fixture
def worker(stack: dict[str, Any]) -> RunningWorker:
    running: RunningWorker = stack["worker"]
    wipe(running.engine)
    return running


def hooks(worker: RunningWorker) -> WebhookService:
    return WebhookService(worker.engine, WebhookOptions(allow_private=True))


def cross_low_threshold(worker: RunningWorker, users: list[str]) -> None:
    """Through the producer: each user is granted 30 and spends 25, crossing below 10."""
    for user in users:
        worker.client.add_credits(user, 30).get(timeout=30)
        worker.client.deduct_credits(user, 25).get(timeout=30)


def event_ids(engine: Engine, routing_key: str = "credits.low") -> set[str]:
    with engine.connect() as connection:
        return set(connection.scalars(select(OutboxEvent.event_id).where(OutboxEvent.routing_key == routing_key)))


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_events_reach_a_receiver_that_was_down_for_a_while_under_their_own_ids(worker: RunningWorker) -> None:
    port = free_port()
    receiver = Receiver(port)
    receiver.stop()  # down: connection refused
    try:
        endpoint = hooks(worker).register(CreateWebhookEndpoint(url=f"http://127.0.0.1:{port}/hooks",
                                                                events=["credits.*"]))
        users = [f"down-{n}" for n in range(6)]
        cross_low_threshold(worker, users)
        expected = event_ids(worker.engine)
        assert len(expected) == len(users)
        wait_for(lambda: any(d.attempts >= 2 for d in hooks(worker).deliveries(endpoint.id)), 30,
                 "failed attempts while the receiver is down")
        receiver.start()
        wait_for(lambda: set(receiver.ids()) >= expected, 60, "every event after the receiver came back")
        assert set(receiver.ids()) == expected
        for received in receiver.received:
            payload = Webhook(endpoint.secret).verify(received.body, received.headers)
            assert payload["data"]["event_id"] == received.headers["webhook-id"]
            assert payload["data"]["account"]["available"] == 5
        deliveries = hooks(worker).deliveries(endpoint.id)
        assert {d.status for d in deliveries} == {"succeeded"}
        assert all(d.attempts >= 2 for d in deliveries)
    finally:
        receiver.stop()


def test_two_workers_deliver_each_event_under_its_one_id(stack: dict[str, Any], worker: RunningWorker) -> None:
    receiver = Receiver()
    try:
        endpoint = hooks(worker).register(CreateWebhookEndpoint(url=receiver.url))
        users = [f"two-{n}" for n in range(20)]
        cross_low_threshold(worker, users)
        expected = event_ids(worker.engine)
        wait_for(lambda: set(receiver.ids()) >= expected, 60, "every event")
        time.sleep(3)  # room for a duplicate to show up
        ids = receiver.ids()
        assert set(ids) == expected
        for received in receiver.received:
            payload = Webhook(endpoint.secret).verify(received.body, received.headers)
            assert payload["data"]["event_id"] == received.headers["webhook-id"]
        assert len(ids) == len(expected), "a healthy receiver got an event twice"
        logs = (stack["worker"].log_path.read_text() + stack["second"].log_path.read_text())
        assert logs.count("creditworker.webhooks.deliver") > 0
    finally:
        receiver.stop()


def test_a_receiver_answering_410_has_its_endpoint_disabled_and_announced(worker: RunningWorker) -> None:
    receiver = Receiver()
    receiver.status = 410
    try:
        endpoint = hooks(worker).register(CreateWebhookEndpoint(url=receiver.url, events=["credits.*"]))
        cross_low_threshold(worker, ["gone-1"])
        wait_for(lambda: not hooks(worker).endpoint(endpoint.id).enabled, 30, "the endpoint disabled")
        wait_for(lambda: bool(event_ids(worker.engine, "webhooks.endpoint_disabled")), 10, "the event")
        cross_low_threshold(worker, ["gone-2"])
        time.sleep(3)
        assert len(receiver.received) == 1
    finally:
        receiver.stop()



def test_a_slow_receiver_never_holds_back_the_others(worker: RunningWorker) -> None:
    slow, fast = Receiver(), Receiver()
    slow.delay_seconds = 6  # longer than the workers' 2 s timeout
    try:
        slow_endpoint = hooks(worker).register(CreateWebhookEndpoint(url=slow.url))
        hooks(worker).register(CreateWebhookEndpoint(url=fast.url))
        users = [f"slow-{n}" for n in range(4)]
        started = time.monotonic()
        cross_low_threshold(worker, users)
        expected = event_ids(worker.engine)
        wait_for(lambda: set(fast.ids()) >= expected, 30, "every event at the fast receiver")
        assert time.monotonic() - started < 30
        wait_for(lambda: all(d.attempts >= 1 for d in hooks(worker).deliveries(slow_endpoint.id)), 30,
                 "the slow receiver's first attempts")
        logs = [hooks(worker).delivery(d.id).log or [] for d in hooks(worker).deliveries(slow_endpoint.id)]
        assert all(log[0].error and "timed out" in log[0].error and log[0].duration_ms < 4000 for log in logs)
    finally:
        slow.stop()
        fast.stop()


def test_low_depleted_and_recovered_reach_a_receiver_signed_with_the_account_each_left(
    worker: RunningWorker,
) -> None:
    receiver = Receiver()
    try:
        endpoint = hooks(worker).register(CreateWebhookEndpoint(url=receiver.url, events=["credits.*"]))
        worker.client.add_credits("alerts", 30).get(timeout=30)
        worker.client.deduct_credits("alerts", 25).get(timeout=30)  # 5: low (threshold 10)
        worker.client.deduct_credits("alerts", 5).get(timeout=30)  # 0: depleted
        worker.client.add_credits("alerts", 40).get(timeout=30)  # 40: recovered
        wait_for(lambda: len(receiver.received) >= 3, 30, "three alerts")
        time.sleep(1)
        seen = {}
        for received in receiver.received:
            payload = Webhook(endpoint.secret).verify(received.body, received.headers)
            seen[payload["type"]] = payload["data"]["account"]["available"]
        assert seen == {"credits.low": 5, "credits.depleted": 0, "credits.recovered": 40}
    finally:
        receiver.stop()
