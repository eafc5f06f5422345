"""The producer reads its answers through one pattern subscription per process, not one
subscription per call, and loses none of them across a reconnect."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.conftest import RunningWorker

pytestmark = pytest.mark.e2e


def _subscribe_calls(worker: RunningWorker) -> dict[str, int]:
    stats = worker.client.app.backend.client.info("commandstats")
    return {name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("subscribe", "psubscribe")}


def test_calls_from_many_threads_get_their_own_answers_through_one_subscription(
    redis_worker: RunningWorker,
) -> None:
    for user in range(8):
        redis_worker.service.add_credits(f"sub-{user}", 1000)
    redis_worker.client.reserve_credits("sub-0", 1)  # the subscription is made by the first call
    before = _subscribe_calls(redis_worker)

    def reserve(i: int) -> tuple[str, int]:
        held = redis_worker.client.reserve_credits(f"sub-{i % 8}", i + 1)
        return held.user_id, held.amount

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(reserve, range(64)))
    assert answers == [(f"sub-{i % 8}", i + 1) for i in range(64)]
    assert _subscribe_calls(redis_worker) == before


def test_an_answer_stored_while_the_subscription_was_down_is_delivered(redis_worker: RunningWorker) -> None:
    """A result stored but never published (as when it was published while the producer's
    connection was down) reaches its caller once the producer has subscribed again."""
    redis_worker.service.add_credits("late", 5)
    redis_worker.client.get_user_credits_info("late").get(timeout=10)  # subscribed by now
    answers = redis_worker.client._answers
    backend = redis_worker.client.app.backend
    task_id = answers.task_id()
    answer = answers.expect(task_id)
    assert answer is not None and answers.subscription is not None
    backend.client.set(backend.get_key_for_task(task_id), backend.encode(
        {"status": "SUCCESS", "result": {"ok": True, "result": 42}, "traceback": None, "children": [],
         "task_id": task_id}))
    port = answers.subscription.connection._sock.getsockname()[1]
    [victim] = [c for c in backend.client.client_list(_type="pubsub") if c["addr"].endswith(f":{port}")]
    backend.client.client_kill_filter(_id=victim["id"])
    assert answer.wait(30), "the stored answer was not read after the reconnect"
    assert answer.outcome() == {"ok": True, "result": 42}
