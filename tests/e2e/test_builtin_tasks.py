"""Celery's built-in tasks are not run by the workers unless a setting allows one (issue 30):
whoever can write to the broker could otherwise make them map or accumulate arbitrary
signatures, or run the result backend's cleanup. Each is a dead letter like any other
refused message, and the worker goes on."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from celery.result import AsyncResult

import creditworker.worker.tasks  # noqa: F401 (registers the project's tasks on every app)
from creditworker.settings import Settings
from creditworker.worker.app import make_celery
from creditworker.worker.intake import runnable_tasks
from tests.e2e.conftest import RunningWorker
from tests.e2e.test_malformed_messages import (  # noqa: F401 (the worker fixture)
    Raw,
    _json,
    publish,
    purge_letters,
    redis_guarded,
    wait_for_letters,
)

pytestmark = pytest.mark.e2e

BUILT_INS = {
    "celery.map": [[{"task": "creditworker.health.ping", "args": [], "kwargs": {},
                     "options": {}, "subtask_type": None}, [[]]], {}, None],
    "celery.starmap": [[{"task": "creditworker.health.ping", "args": [], "kwargs": {},
                         "options": {}, "subtask_type": None}, [[]]], {}, None],
    "celery.accumulate": [[1, 2, 3], {}, None],
    "celery.chunks": [[{"task": "creditworker.health.ping"}, [[]], 1], {}, None],
    "celery.chord_unlock": [["some-group-id", {"task": "creditworker.health.ping"}], {}, None],
    "celery.backend_cleanup": [[], {}, None],
    "celery.group": [[[], None], {}, None],
    "celery.chain": [[], {"tasks": []}, None],
    "celery.chord": [[[], {"task": "creditworker.health.ping"}], {}, None],
}


def test_celery_built_ins_are_dead_letters_and_the_worker_goes_on(
    redis_guarded: RunningWorker,  # noqa: F811 (the fixture imported above)
) -> None:
    worker = redis_guarded
    purge_letters(worker)
    sent = {}
    for name, body in BUILT_INS.items():
        raw = Raw(_json(body), {"lang": "py", "task": name, "id": str(uuid.uuid4())})
        publish(worker, raw)
        sent[name] = raw
    worker.service.add_credits("builtin", 10)
    assert worker.client.deduct_credits("builtin", 4).get(timeout=30).balance_after == 6  # goes on
    letters = {letter["task_name"]: letter for letter in wait_for_letters(worker, len(sent))}
    assert set(letters) == set(BUILT_INS)
    for name, raw in sent.items():
        assert "built-in task" in letters[name]["reason"], letters[name]
        envelope = AsyncResult(raw.task_id, app=worker.client.app).get(timeout=10)
        assert envelope["ok"] is False and envelope["error"]["code"] == "invalid_input"
        assert "CREDITWORKER_CELERY_TASKS_ALLOWED" in json.dumps(envelope["error"])
    purge_letters(worker)


def test_a_setting_allows_a_built_in_and_the_embedded_backend_keeps_its_cleanup(tmp_path: Path) -> None:
    shared = make_celery(Settings(broker_url="redis://127.0.0.1:6379/0", data_dir=str(tmp_path),
                                  celery_tasks_allowed="celery.accumulate, celery.map"))
    runnable = runnable_tasks(shared, list(shared.tasks))
    assert {"celery.accumulate", "celery.map"} <= runnable
    assert not {"celery.starmap", "celery.backend_cleanup", "celery.chord_unlock"} & runnable
    assert "creditworker.credits.deduct" in runnable
    embedded = make_celery(Settings(data_dir=str(tmp_path)))  # file results: beat cleans them
    assert "celery.backend_cleanup" in runnable_tasks(embedded, list(embedded.tasks))
    assert "celery.map" not in runnable_tasks(embedded, list(embedded.tasks))
