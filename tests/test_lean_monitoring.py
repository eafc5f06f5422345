"""What a task costs beyond its work: monitoring settings, and gathered results stored in
one round trip (creditworker/worker/app.py, creditworker/worker/gather.py)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import redis
from celery import states

from creditworker.settings import Settings
from creditworker.worker.app import celery_config, make_celery
from creditworker.worker.gather import store_states


def test_monitoring_costs_nothing_per_task_unless_a_setting_asks() -> None:
    lean = celery_config(Settings(broker_url="redis://127.0.0.1:1/0"))
    assert lean["worker_send_task_events"] is False
    assert lean["task_send_sent_event"] is False
    assert lean["task_track_started"] is False
    assert lean["result_extended"] is False
    watched = celery_config(Settings(
        broker_url="redis://127.0.0.1:1/0", task_events=True, task_sent_events=True,
        track_started=True, result_extended=True,
    ))
    assert watched["worker_send_task_events"] and watched["task_send_sent_event"]
    assert watched["task_track_started"] and watched["result_extended"]


def test_a_reservation_records_started_even_when_no_other_task_does() -> None:
    """Its caller's deadline relies on STARTED (creditworker/client/handle.py `_last_look`)."""
    app = make_celery(Settings(broker_url="redis://127.0.0.1:1/0"))  # never connects
    app.loader.import_default_modules()  # what a worker does at start: import the task modules
    app.finalize()
    assert app.tasks["creditworker.credits.reserve"].track_started is True
    assert app.tasks["creditworker.credits.deduct"].track_started is False
    assert app.tasks["creditworker.health.ping"].track_started is False


class CountingRedis(redis.Redis):
    """A Redis client that counts the commands it sends (a pipeline counts once)."""

    sent = 0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        CountingRedis.sent += 1
        return super().execute_command(*args, **options)

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        CountingRedis.sent += 1
        return super().pipeline(*args, **kwargs)


def test_gathered_results_are_stored_and_published_in_one_round_trip(redis_url: str) -> None:
    url = f"{redis_url.rsplit('/', 1)[0]}/13"  # a database no other test uses
    app = make_celery(Settings(broker_url=url))
    backend = app.backend
    backend.client = CountingRedis.from_url(url)
    raw = redis.Redis.from_url(url)
    raw.flushdb()
    entries = [{"id": str(uuid.uuid4()), "task": "creditworker.credits.deduct", "args": [],
                "kwargs": {"user_id": "ann", "amount": i}, "hostname": "w1", "retries": 0,
                "delivery_info": {}, "reply_to": None, "correlation_id": None, "root_id": None,
                "parent_id": None, "group": None} for i in range(3)]
    done_already = entries[2]["id"]  # a late duplicate must not overwrite a stored success
    raw.set(f"celery-task-meta-{done_already}", json.dumps({"status": "SUCCESS", "result": "first"}))
    listener = raw.pubsub()
    listener.subscribe(*[f"celery-task-meta-{entry['id']}" for entry in entries])
    CountingRedis.sent = 0

    store_states(app, [(entry, {"ok": True, "n": i}, states.SUCCESS) for i, entry in enumerate(entries)])

    assert CountingRedis.sent == 1
    for i, entry in enumerate(entries[:2]):
        meta = json.loads(raw.get(f"celery-task-meta-{entry['id']}") or b"{}")
        assert meta["status"] == "SUCCESS" and meta["result"] == {"ok": True, "n": i}
        assert meta["task_id"] == entry["id"]
        assert 0 < raw.ttl(f"celery-task-meta-{entry['id']}") <= app.conf.result_expires
    assert json.loads(raw.get(f"celery-task-meta-{done_already}") or b"{}")["result"] == "first"
    published = []
    while (message := listener.get_message(timeout=1.0)) is not None:
        if message["type"] == "message":
            published.append(json.loads(message["data"])["task_id"])
    assert published == [entries[0]["id"], entries[1]["id"]]
    listener.close()
