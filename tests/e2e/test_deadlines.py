"""A reservation that reaches a worker after its caller stopped waiting is not applied, and
the caller's error says so.

`reserve_credits(timeout=N)` sends the instant it stops waiting as the reservation's
deadline; the engine refuses it after that instant, in the pool process, under the account
lock. A gathered reservation is marked STARTED before that check, so a caller that finds no
STARTED at its deadline knows the reservation was not applied and never will be.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import text
from sqlalchemy.engine import Engine

from creditworker.contract.errors import ServiceUnavailable
from tests.conftest import engine_for, wipe
from tests.e2e.conftest import RunningWorker, purge, redis_db, worker_env
from tests.e2e.test_gathering import wait_for_waiting_lock

pytestmark = pytest.mark.e2e


def not_started(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, broker: str,
    migrated_engines: dict[str, Engine], **extra: str,
) -> Iterator[RunningWorker]:
    """A worker that is not running yet: messages wait in the broker."""
    if broker.startswith("redis"):
        redis.Redis.from_url(broker).flushdb()
    workdir = tmp_path_factory.mktemp("worker")
    worker = RunningWorker(
        worker_env(workdir, postgres_url, broker, **extra), workdir,
        engine_for(postgres_url, migrated_engines), workdir / "worker.log",
    )
    purge(worker)
    wipe(worker.engine)
    try:
        yield worker
    finally:
        worker.stop()


@pytest.fixture(params=["redis", "rabbitmq"])
def stopped_worker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, postgres_url: str,
    migrated_engines: dict[str, Engine],
) -> Iterator[RunningWorker]:
    if request.param == "redis":
        broker = redis_db(request.getfixturevalue("redis_url"), 5)
        yield from not_started(tmp_path_factory, postgres_url, broker, migrated_engines)
    else:
        yield from not_started(
            tmp_path_factory, postgres_url, request.getfixturevalue("rabbitmq_url"), migrated_engines,
            CREDITWORKER_RESULT_BACKEND="rpc://",
        )


@pytest.fixture
def redis_worker_at_rest(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, redis_url: str,
    migrated_engines: dict[str, Engine],
) -> Iterator[RunningWorker]:
    yield from not_started(tmp_path_factory, postgres_url, redis_db(redis_url, 5), migrated_engines)


def active_holds(engine: Engine, user_id: str) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(
            text("SELECT count(*) FROM reservations WHERE user_id = :user"), {"user": user_id}
        ))


def answer(worker: RunningWorker, task_id: str) -> Any:
    return worker.client.app.AsyncResult(task_id).get(timeout=60, propagate=False)


def test_a_reserve_that_timed_out_with_no_worker_is_never_applied(stopped_worker: RunningWorker) -> None:
    worker = stopped_worker
    worker.service.add_credits("late", 100)
    with pytest.raises(ServiceUnavailable) as timed_out:
        worker.client.reserve_credits("late", 30, timeout=2, idempotency_key="late-1")
    assert timed_out.value.details["applied"] is False, timed_out.value.message
    assert "not applied" in timed_out.value.message
    worker.start()
    refused = answer(worker, timed_out.value.details["task_id"])
    assert refused["ok"] is False
    assert refused["error"]["details"] == {**refused["error"]["details"], "applied": False, "reason": "deadline_passed"}
    assert active_holds(worker.engine, "late") == 0
    assert worker.service.get_user_credits_info("late").available == 100
    # the caller's retry with the same key applies it now, once
    hold = worker.client.reserve_credits("late", 30, timeout=30, idempotency_key="late-1")
    assert worker.client.reserve_credits("late", 30, timeout=30, idempotency_key="late-1") == hold
    assert worker.service.get_user_credits_info("late").reserved == 30


def test_a_gathered_reserve_waiting_for_a_pool_process_past_its_deadline_is_not_applied(
    redis_worker_at_rest: RunningWorker,
) -> None:
    """The main process has the reservation before its deadline, but every pool process is
    busy (with batches blocked on a row lock the test holds) until after it."""
    worker = redis_worker_at_rest
    worker.start()
    worker.service.add_credits("busy", 100)
    worker.service.add_credits("lee", 100)
    with worker.engine.connect() as blocker:
        blocker.execute(text("SELECT * FROM accounts WHERE user_id = 'busy' FOR UPDATE"))
        deducts = [worker.client.deduct_credits("busy", 1) for _ in range(10)]
        wait_for_waiting_lock(worker.engine)
        with pytest.raises(ServiceUnavailable) as timed_out:
            worker.client.reserve_credits("lee", 30, timeout=2)
        held = [json.loads(raw)[0]["headers"]["id"] for raw in redis.Redis.from_url(worker.broker_url).hvals("unacked")]
        assert timed_out.value.details["task_id"] in held, "the worker's main process did not have it"
        blocker.rollback()
    assert timed_out.value.details["applied"] is False, timed_out.value.message
    assert [handle.get(timeout=60).amount for handle in deducts] == [-1] * 10
    # gathered operations are logged like any task (issue 15); the result is stored by the
    # pool process before the main process logs it, so the line may come a moment later
    succeeded = f"Task creditworker.credits.deduct[{deducts[0].task_id}] succeeded in"
    deadline = time.monotonic() + 10
    while succeeded not in worker.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    log = worker.log_path.read_text()
    assert f"Task creditworker.credits.deduct[{deducts[0].task_id}] received" in log
    assert succeeded in log
    refused = answer(worker, timed_out.value.details["task_id"])
    assert refused["error"]["details"]["applied"] is False
    assert active_holds(worker.engine, "lee") == 0
