"""Every task through the producer, a real worker, a real broker and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid

import pytest
import redis
from celery.result import AsyncResult
from kombu import Connection

from creditworker.client import unwrap
from creditworker.contract.errors import (
    IdempotencyConflict,
    InsufficientCredits,
    ReservationNotActive,
    ServiceUnavailable,
    UnknownReservation,
    UnknownUser,
    ValidationFailed,
)
from producers import AsyncCreditClient, CreditClient
from tests.e2e.conftest import RunningWorker

pytestmark = pytest.mark.e2e


def test_every_credit_task_round_trips(worker: RunningWorker) -> None:
    client = worker.client
    added = client.add_credits("ann", 100, description="top-up", metadata={"order": 7}).get()
    assert (added.kind, added.amount, added.balance_after, added.metadata) == ("add", 100, 100, {"order": 7})
    assert client.deduct_credits("ann", 30).get().balance_after == 70
    hold = client.reserve_credits("ann", 20, ttl_seconds=60)
    assert hold.status == "active" and hold.amount == 20
    assert client.commit_reservation(hold.id, 15).get().amount == -15
    second = client.reserve_credits("ann", 5)
    assert client.release_reservation(second.id).get().held == -5
    info = client.get_user_credits_info("ann").get()
    assert (info.total, info.reserved, info.available) == (55, 0, 55)
    history = client.get_history("ann", limit=10).get()
    assert [e.kind for e in history] == ["release", "reserve", "commit", "reserve", "deduct", "add"]
    assert client.get_expiring_credits("ann", 7).get() == []
    assert worker.service.get_user_credits_info("ann").available == 55


def test_business_errors_arrive_as_typed_errors(worker: RunningWorker) -> None:
    client = worker.client
    client.add_credits("ann", 10).get()
    with pytest.raises(InsufficientCredits) as refused:
        client.deduct_credits("ann", 11).get()
    assert refused.value.details["available"] == 10
    with pytest.raises(UnknownUser):
        client.deduct_credits("nobody", 1).get()
    with pytest.raises(UnknownReservation):
        client.commit_reservation("no-such-hold").get()
    hold = client.reserve_credits("ann", 2)
    client.release_reservation(hold.id).get()
    with pytest.raises(ReservationNotActive):
        client.commit_reservation(hold.id).get()
    client.deduct_credits("ann", 1, idempotency_key="k-1").get()
    with pytest.raises(IdempotencyConflict):
        client.deduct_credits("ann", 2, idempotency_key="k-1").get()
    assert worker.service.get_user_credits_info("ann").total == 9


@pytest.mark.parametrize(
    "kwargs",
    [
        {"user_id": "ann", "amount": -5},
        {"user_id": "ann", "amount": 0},
        {"user_id": "ann", "amount": 10**13},
        {"user_id": "ann", "amount": "5"},
        {"user_id": "ann", "amount": 1.5},
        {"user_id": "", "amount": 5},
        {"user_id": "ann"},
        {"user_id": "ann", "amount": 5, "surprise": True},
    ],
)
def test_malformed_messages_get_invalid_input_and_change_nothing(
    redis_worker: RunningWorker, kwargs: dict[str, object]
) -> None:
    redis_worker.service.add_credits("ann", 10)
    sent = redis_worker.client.app.send_task("creditworker.credits.deduct", kwargs=kwargs)
    envelope = sent.get(timeout=10)
    assert envelope["ok"] is False and envelope["error"]["code"] == "invalid_input"
    with pytest.raises(ValidationFailed):
        unwrap(envelope, lambda result: result)
    assert redis_worker.service.get_user_credits_info("ann").total == 10


def test_positional_arguments_are_refused(worker: RunningWorker) -> None:
    envelope = worker.client.app.send_task("creditworker.credits.deduct", args=["ann", 5]).get(timeout=10)
    assert envelope["error"]["code"] == "invalid_input"


def test_the_client_refuses_bad_input_before_enqueueing(worker: RunningWorker) -> None:
    with pytest.raises(ValidationFailed):
        worker.client.deduct_credits("ann", -1)


def test_the_same_message_published_twice_is_applied_once(worker: RunningWorker) -> None:
    worker.service.add_credits("ann", 50)
    task_id = str(uuid.uuid4())
    app = worker.client.app
    for _ in range(2):
        app.send_task("creditworker.credits.deduct", kwargs={"user_id": "ann", "amount": 7}, task_id=task_id)
    # Both copies are consumed (the result of the task id is stored twice, once per copy);
    # wait for the queue to drain, then check the effect happened once.
    assert AsyncResult(task_id, app=app).get(timeout=10)["ok"] is True
    time.sleep(2)
    deducts = worker.service.get_history("ann", kinds=["deduct"])
    assert [e.idempotency_key for e in deducts] == [f"task:{task_id}"]
    assert worker.service.get_user_credits_info("ann").total == 43


def test_a_reservation_is_read_through_the_worker(worker: RunningWorker) -> None:
    worker.service.add_credits("ann", 20)
    held = worker.client.reserve_credits("ann", 8)
    assert worker.client.get_reservation(held.id).get(timeout=10) == held
    with pytest.raises(UnknownReservation):
        worker.client.get_reservation("no-such-hold").get(timeout=10)


def test_the_health_ping_answers_through_broker_and_worker(worker: RunningWorker) -> None:
    answer = worker.client.app.send_task("creditworker.health.ping").get(timeout=10)
    assert answer == {"ok": True, "result": {"pong": True}}
    refused = worker.client.app.send_task("creditworker.health.ping", kwargs={"x": 1}).get(timeout=10)
    assert refused["ok"] is False and refused["error"]["code"] == "invalid_input"


def test_a_batch_runs_through_the_worker_with_one_outcome_per_item(worker: RunningWorker) -> None:
    worker.service.add_credits("dan", 30)
    handle = worker.client.submit_batch([
        {"op": "deduct", "user_id": "dan", "amount": 10},
        {"op": "deduct", "user_id": "dan", "amount": 100},
        {"op": "add", "user_id": "eli", "amount": 5},
    ])
    outcomes = handle.get()
    assert [o.ok for o in outcomes] == [True, False, True]
    assert outcomes[1].error is not None and outcomes[1].error["code"] == "insufficient_credits"
    handle.resend()  # the same message again: items keyed task:<id>:<i>, nothing twice
    time.sleep(2)
    assert worker.service.get_user_credits_info("dan").total == 20
    assert worker.service.get_user_credits_info("eli").total == 5
    with pytest.raises(ValidationFailed, match="operation 1"):
        worker.client.submit_batch([{"op": "add", "user_id": "x", "amount": 1}, {"op": "add", "amount": 1}])


def test_a_resent_operation_is_applied_once(worker: RunningWorker) -> None:
    worker.service.add_credits("bea", 50)
    handle = worker.client.deduct_credits("bea", 9)  # no key: derived from the task id
    handle.resend()
    handle.resend()
    assert handle.get().balance_after == 41
    time.sleep(2)  # let the copies drain
    deducts = worker.service.get_history("bea", kinds=["deduct"])
    assert [e.idempotency_key for e in deducts] == [f"task:{handle.task_id}"]
    assert worker.service.get_user_credits_info("bea").total == 41


def test_get_resends_while_no_answer_comes(redis_worker: RunningWorker) -> None:
    """A message lost by the broker (here: deleted from the queue before a worker saw it)
    is recovered by `get(resend_every=...)`, and applied once."""
    redis_worker.service.add_credits("cal", 20)
    redis_worker.stop()
    try:
        handle = redis_worker.client.deduct_credits("cal", 4)
        assert redis.Redis.from_url(redis_worker.broker_url).delete("celery") == 1  # "lost" it
    finally:
        redis_worker.start()
    assert handle.get(timeout=60, resend_every=3).balance_after == 16
    assert redis_worker.service.get_user_credits_info("cal").total == 16


def test_a_pickled_message_is_refused_and_the_worker_keeps_running(redis_worker: RunningWorker) -> None:
    redis_worker.service.add_credits("ann", 10)
    with Connection(redis_worker.broker_url) as connection:
        producer = connection.Producer(serializer="pickle")
        producer.publish(
            ((), {"user_id": "ann", "amount": 5}, {}),
            exchange="", routing_key="celery",
            headers={"lang": "py", "task": "creditworker.credits.deduct", "id": str(uuid.uuid4())},
        )
    # The worker is still serving and nothing was deducted.
    assert redis_worker.client.deduct_credits("ann", 1).get().balance_after == 9
    log = redis_worker.log_path.read_text()
    assert "content type 'application/x-python-serialize': only application/json is accepted" in log
    assert redis_worker.service.get_user_credits_info("ann").total == 9


def test_an_unknown_task_name_does_not_stop_the_worker(redis_worker: RunningWorker) -> None:
    redis_worker.client.app.send_task("creditworker.credits.steal", kwargs={"user_id": "ann"})
    redis_worker.service.add_credits("ann", 3)
    assert redis_worker.client.get_user_credits_info("ann").get().total == 3


def test_the_async_client_does_the_same(worker: RunningWorker) -> None:
    async def scenario() -> tuple[int, int]:
        client = AsyncCreditClient(worker.settings)
        await (await client.add_credits("ann", 40)).get()
        hold = await client.reserve_credits("ann", 10)
        await (await client.commit_reservation(hold.id, 4)).get()
        with pytest.raises(InsufficientCredits):
            await (await client.deduct_credits("ann", 1000)).get()
        info = await (await client.get_user_credits_info("ann")).get()
        return info.total, info.reserved

    assert asyncio.run(scenario()) == (36, 0)


def test_importing_producers_does_not_import_sqlalchemy() -> None:
    code = "import sys, producers; print(json.dumps(sorted(m for m in sys.modules if m.startswith(('sqlalchemy', 'creditworker.engine', 'creditworker.credits', 'creditworker.storage')))))"
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_a_message_that_is_not_utf8_json_is_dropped_and_the_worker_keeps_running(
    redis_worker: RunningWorker,
) -> None:
    redis_worker.service.add_credits("ann", 10)
    with Connection(redis_worker.broker_url) as connection:
        connection.Producer().publish(
            b'[[], {"user_id": "\xff\xfe", "amount": 5}, {}]',
            exchange="", routing_key="celery", content_type="application/json",
            content_encoding="binary",
            headers={"lang": "py", "task": "creditworker.credits.deduct", "id": str(uuid.uuid4())},
        )
    assert redis_worker.client.deduct_credits("ann", 1).get().balance_after == 9
    assert redis_worker.service.get_user_credits_info("ann").total == 9


def test_oversized_metadata_is_refused_by_the_worker(redis_worker: RunningWorker) -> None:
    redis_worker.service.add_credits("ann", 10)
    envelope = redis_worker.client.app.send_task(
        "creditworker.credits.deduct",
        kwargs={"user_id": "ann", "amount": 1, "metadata": {"blob": "x" * 20_000}},
    ).get(timeout=10)
    assert envelope["error"]["code"] == "invalid_input"
    assert redis_worker.service.get_user_credits_info("ann").total == 10


def test_one_client_serves_many_threads_each_its_own_answer(redis_worker: RunningWorker) -> None:
    """On Redis the producer shares one result backend across threads: no answer may
    reach the wrong caller."""
    from concurrent.futures import ThreadPoolExecutor

    client = redis_worker.client
    for u in range(8):
        redis_worker.service.add_credits(f"thr-{u}", 1000)
    backends: set[int] = set()

    def reserve(i: int) -> tuple[str, int]:
        backends.add(id(client.app.backend))
        hold = client.reserve_credits(f"thr-{i % 8}", i + 1, ttl_seconds=60)
        return hold.user_id, hold.amount

    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(reserve, range(96)))
    assert answers == [(f"thr-{i % 8}", i + 1) for i in range(96)]
    assert len(backends) == 1
    for u in range(8):
        assert redis_worker.service.get_user_credits_info(f"thr-{u}").reserved == sum(
            i + 1 for i in range(96) if i % 8 == u
        )


def test_an_unreachable_result_backend_is_service_unavailable(redis_worker: RunningWorker) -> None:
    """Slow by nature: Celery retries the result backend for about 20 s before it gives up."""
    redis_worker.service.add_credits("ann", 10)
    settings = redis_worker.settings.model_copy(update={"result_backend": "redis://127.0.0.1:1/0"})
    client = CreditClient(settings)
    with pytest.raises(ServiceUnavailable, match="result backend"):
        client.deduct_credits("ann", 1)  # refused before it is sent: nobody could read the answer
    assert redis_worker.service.get_user_credits_info("ann").total == 10
