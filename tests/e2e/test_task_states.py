"""The states a task stores on Celery's own path (`CREDITWORKER_GATHER_MAX=1`): a task
stores only its outcome, except a reservation, which also stores STARTED before it runs.
Its caller relies on that: with no STARTED at its deadline, it says the reservation was not
applied and never will be (creditworker/client/handle.py `_last_look`)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
import redis

from tests.e2e.conftest import RunningWorker

pytestmark = pytest.mark.e2e


def published_states(worker: RunningWorker, send: Any) -> list[str]:
    """The states published for the task `send(task_id)` sends, in order."""
    task_id = "states-" + str(time.monotonic_ns())
    listener = redis.Redis.from_url(worker.broker_url).pubsub()
    listener.subscribe(f"celery-task-meta-{task_id}")
    assert listener.get_message(timeout=5)["type"] == "subscribe"
    seen: list[str] = []

    def read() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "SUCCESS" not in seen:
            message = listener.get_message(timeout=1.0)
            if message and message["type"] == "message":
                seen.append(json.loads(message["data"])["status"])

    reader = threading.Thread(target=read)
    reader.start()
    send(task_id)
    reader.join()
    listener.close()
    return seen


def test_only_a_reservation_stores_started(ungathered_worker: RunningWorker) -> None:
    app = ungathered_worker.client.app
    ungathered_worker.service.add_credits("sam", 100)
    reserve = published_states(ungathered_worker, lambda task_id: app.send_task(
        "creditworker.credits.reserve", task_id=task_id, kwargs={"user_id": "sam", "amount": 5}))
    deduct = published_states(ungathered_worker, lambda task_id: app.send_task(
        "creditworker.credits.deduct", task_id=task_id, kwargs={"user_id": "sam", "amount": 1}))
    assert reserve == ["STARTED", "SUCCESS"]
    assert deduct == ["SUCCESS"]
