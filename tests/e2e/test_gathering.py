"""The worker gathers single-operation messages into batches (see creditworker.worker.gather).

What a user checks: every message still gets its own result, keyed by its own key; bad
messages fail alone; a lost pool process requeues its batch and nothing applies twice.
Entries written by one PostgreSQL transaction share its id (the rows' `xmin`), which shows how
messages were gathered. (Their timestamps do not: two pool processes can read the same
microsecond, and a run once counted 29 transactions for 30 messages that way.)
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from creditworker.contract.errors import IdempotencyConflict, InsufficientCredits, UnknownUser
from tests.e2e.conftest import RunningWorker

pytestmark = pytest.mark.e2e


def transactions(worker: RunningWorker, *user_ids: str) -> int:
    """How many transactions wrote these users' deducts (ledger rows are never updated, so
    each keeps the id of the transaction that inserted it)."""
    with worker.engine.connect() as connection:
        return int(connection.scalar(text(
            "SELECT count(DISTINCT xmin::text) FROM ledger_entries"
            " WHERE user_id = ANY(:users) AND kind = 'deduct'"
        ), {"users": list(user_ids)}))


def test_a_burst_is_applied_in_few_transactions_with_one_result_per_message(worker: RunningWorker) -> None:
    users = [f"burst-{i}" for i in range(4)]
    for user in users:
        worker.service.add_credits(user, 1000)
    app = worker.client.app
    # The burst waits on the queue while the worker does not consume it: whether a worker
    # that keeps up with the producer gathers anything depends on timing (on RabbitMQ it
    # took 64-124 transactions for the 200), and what is tested is what it does with a backlog.
    destination = [worker.hostname] if worker.hostname else None
    assert app.control.cancel_consumer("celery", destination=destination, reply=True, limit=1, timeout=10)
    handles = [worker.client.deduct_credits(users[i % 4], 1 + i % 3) for i in range(200)]
    bad = {
        "unknown": worker.client.deduct_credits("nobody", 1),
        "too much": worker.client.deduct_credits(users[0], 10**6),
        "positional": app.send_task("creditworker.credits.deduct", args=["burst-0", 1]),
        "negative": app.send_task("creditworker.credits.deduct", kwargs={"user_id": "burst-0", "amount": -5}),
    }
    assert app.control.add_consumer("celery", destination=destination, reply=True, limit=1, timeout=10)
    entries = [handle.get(timeout=60) for handle in handles]
    assert len({entry.id for entry in entries}) == 200
    assert [entry.idempotency_key for entry in entries] == [f"task:{h.task_id}" for h in handles]
    with pytest.raises(UnknownUser):
        bad["unknown"].get()
    with pytest.raises(InsufficientCredits):
        bad["too much"].get()
    for name in ("positional", "negative"):
        assert bad[name].get(timeout=30)["error"]["code"] == "invalid_input"
    for u, user in enumerate(users):
        spent = sum(1 + i % 3 for i in range(200) if i % 4 == u)
        assert worker.service.get_user_credits_info(user).total == 1000 - spent
        assert len(worker.service.get_history(user, kinds=["deduct"], limit=100)) == 50
    # 200 messages queued at once: far fewer transactions than messages
    print("transactions for 200 deducts:", transactions(worker, *users))
    assert transactions(worker, *users) < 100


def test_repeated_and_conflicting_keys_in_one_burst(worker: RunningWorker) -> None:
    worker.service.add_credits("rex", 100)
    key = f"order-{uuid.uuid4()}"
    same = [worker.client.deduct_credits("rex", 7, idempotency_key=key) for _ in range(3)]
    other = worker.client.deduct_credits("rex", 8, idempotency_key=key)
    assert len({handle.get().id for handle in same}) == 1
    with pytest.raises(IdempotencyConflict):
        other.get()
    assert worker.service.get_user_credits_info("rex").total == 93


def test_mixed_operations_gather_like_their_tasks(worker: RunningWorker) -> None:
    client = worker.client
    adds = [client.add_credits("mia", 10) for _ in range(5)]
    holds = [client.submit_reserve("mia", 3, ttl_seconds=60) for _ in range(5)]
    assert [a.get().amount for a in adds] == [10] * 5
    reservations = [h.get() for h in holds]
    commits = [client.commit_reservation(r.id, 2) for r in reservations[:3]]
    releases = [client.release_reservation(r.id) for r in reservations[3:]]
    assert [c.get().amount for c in commits] == [-2] * 3
    assert [r.get().held for r in releases] == [-3] * 2
    info = worker.service.get_user_credits_info("mia")
    assert (info.total, info.reserved) == (44, 0)


def test_with_gathering_off_every_message_is_its_own_transaction(ungathered_worker: RunningWorker) -> None:
    ungathered_worker.service.add_credits("solo", 100)
    handles = [ungathered_worker.client.deduct_credits("solo", 1) for _ in range(30)]
    assert [h.get().amount for h in handles] == [-1] * 30
    assert transactions(ungathered_worker, "solo") == 30


def test_a_pool_process_lost_mid_batch_requeues_its_messages(redis_worker: RunningWorker) -> None:
    """The batch blocks on a row lock the test holds; its pool process is killed; the
    messages come back and are applied once each."""
    worker = redis_worker
    worker.service.add_credits("kim", 100)
    assert worker.process is not None
    children = pool_processes(worker.process.pid)
    with worker.engine.connect() as blocker:
        blocker.execute(text("SELECT * FROM accounts WHERE user_id = 'kim' FOR UPDATE"))
        handles = [worker.client.deduct_credits("kim", 1) for _ in range(20)]
        wait_for_waiting_lock(worker.engine)
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        time.sleep(1)
        blocker.rollback()
    assert [h.get(timeout=60).amount for h in handles] == [-1] * 20
    assert len(worker.service.get_history("kim", kinds=["deduct"], limit=100)) == 20
    assert worker.service.get_user_credits_info("kim").total == 80
    assert "requeued" in worker.log_path.read_text()


def pool_processes(main_pid: int) -> list[int]:
    found = []
    for status in os.listdir("/proc"):
        if status.isdigit():
            try:
                with open(f"/proc/{status}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == main_pid:
                        found.append(int(status))
            except (OSError, ValueError, IndexError):
                continue
    assert found, "the worker has no pool processes"
    return found


def wait_for_waiting_lock(engine: Engine, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with engine.connect() as connection:
        while time.monotonic() < deadline:
            waiting = connection.scalar(text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            ))
            connection.rollback()
            if waiting:
                return
            time.sleep(0.05)
    raise AssertionError("no transaction ever waited for the lock")


def test_a_gathered_batch_leaves_no_message_marked_unacknowledged(redis_worker: RunningWorker) -> None:
    """A batch's acks go to Redis in one pipeline (celery_adapter.acknowledge_all); each
    message's unacked mark is gone afterwards, so none is redelivered."""
    import redis

    redis_worker.service.add_credits("acked", 100)
    handles = [redis_worker.client.deduct_credits("acked", 1) for _ in range(40)]
    assert len({handle.get(timeout=60).id for handle in handles}) == 40
    broker = redis.Redis.from_url(redis_worker.broker_url)
    deadline = time.monotonic() + 10
    while broker.hlen("unacked") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert broker.hlen("unacked") == 0 and broker.zcard("unacked_index") == 0
