"""rpc:// replies of a gathered batch (creditworker/worker/gather.py `Replies`): published
together, confirmed once, and published again on a new connection when the old one died."""

from __future__ import annotations

import uuid
from typing import Any

from kombu import Connection

from creditworker.settings import Settings
from creditworker.worker import gather
from creditworker.worker.app import make_celery


def _entries(queue: str, count: int) -> list[dict[str, Any]]:
    return [{"id": f"{queue}-{i}", "task": "creditworker.credits.deduct", "args": [], "kwargs": {},
             "hostname": "test", "retries": 0, "delivery_info": {}, "reply_to": queue,
             "correlation_id": f"{queue}-{i}", "root_id": None, "parent_id": None, "group": None}
            for i in range(count)]


def test_a_batch_of_replies_reaches_its_queue_also_after_the_connection_died(rabbitmq_url: str) -> None:
    app = make_celery(Settings(broker_url=rabbitmq_url))
    queue = f"cw-test-replies-{uuid.uuid4().hex[:8]}"
    replies = gather.Replies()
    with Connection(rabbitmq_url) as connection:
        channel = connection.channel()
        channel.queue_declare(queue, auto_delete=False)
        try:
            for batch in range(3):
                results = [(entry, {"ok": True, "result": batch}, "SUCCESS") for entry in _entries(queue, 20)]
                replies.publish(app, [(entry, app.backend._to_result(entry["id"], state, result, None, None))
                                      for entry, result, state in results])
                assert not replies.unconfirmed
                if batch == 1:
                    replies.connection.close()  # the next batch finds it dead
            bodies = []
            while (message := channel.basic_get(queue, no_ack=True)) is not None:
                bodies.append(message)
            assert len(bodies) == 60
            assert {m.properties["correlation_id"] for m in bodies} == {f"{queue}-{i}" for i in range(20)}
        finally:
            channel.queue_delete(queue)
            replies.close()
