"""A message delivered twice (same task id) answers the second time as it did the first:
every write is keyed `task:<task id>` when the producer gave no key, plans included."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.e2e.conftest import RunningWorker

pytestmark = pytest.mark.e2e


def _deliver(worker: RunningWorker, task: str, kwargs: dict[str, Any], task_id: str) -> Any:
    """Publish the message with `task_id` and wait for the answer to this copy."""
    app = worker.client.app
    app.backend.forget(task_id)  # the answer of an earlier copy must not be read as this one's
    return app.send_task(task, kwargs=kwargs, task_id=task_id).get(timeout=20)


def test_a_redelivered_plan_delete_answers_as_the_first_did(redis_worker: RunningWorker) -> None:
    redis_worker.client.create_plan("redelivered-delete", 5).get()
    task_id = str(uuid.uuid4())
    first, second = (_deliver(redis_worker, "creditworker.plans.delete", {"plan": "redelivered-delete"}, task_id)
                     for _ in range(2))
    assert first == {"ok": True, "result": {"deleted": "redelivered-delete"}}
    assert second == first  # not `unknown_plan`: the plan it deleted is gone


def test_a_redelivered_plan_rename_answers_as_the_first_did(redis_worker: RunningWorker) -> None:
    redis_worker.client.create_plan("redelivered-old-name", 5).get()
    task_id = str(uuid.uuid4())
    kwargs = {"plan": "redelivered-old-name", "name": "redelivered-new-name", "credit_limit": 7}
    first, second = (_deliver(redis_worker, "creditworker.plans.update", kwargs, task_id) for _ in range(2))
    assert first["ok"] is True and first["result"]["name"] == "redelivered-new-name"
    assert second == first
