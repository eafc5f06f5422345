"""A worker SIGKILLed mid-run loses nothing and applies nothing twice."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from creditworker.storage.tables import Account, Entry
from tests.conftest import wipe
from tests.e2e.conftest import RunningWorker, assert_each_deduct_applied_once, running_on_redis

pytestmark = pytest.mark.e2e

VISIBILITY_TIMEOUT = "5"


@pytest.fixture
def short_visibility_worker(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, redis_url: str,
    migrated_engines: dict[str, Engine],
) -> Iterator[RunningWorker]:
    """Redis redelivers unacknowledged messages after the visibility timeout: 5 s here."""
    for worker in running_on_redis(
        tmp_path_factory, postgres_url, redis_url, 12, migrated_engines,
        CREDITWORKER_VISIBILITY_TIMEOUT_SECONDS=VISIBILITY_TIMEOUT,
    ):
        wipe(worker.engine)
        yield worker


def test_sigkill_mid_run_applies_every_operation_exactly_once(
    short_visibility_worker: RunningWorker,
) -> None:
    worker = short_visibility_worker
    accounts = ["hot", "warm", "cold"]
    for account in accounts:
        worker.service.add_credits(account, 100_000)
    rng = random.Random(7)
    operations = [(f"op-{n}", rng.choice(accounts + ["hot", "hot"]), rng.randint(1, 9)) for n in range(200)]

    def applied() -> int:
        with Session(worker.engine) as session:
            return int(session.scalar(select(func.count()).select_from(Entry).where(Entry.kind == "deduct")) or 0)

    def waiting_for_the_lock() -> bool:
        with worker.engine.connect() as connection:
            return bool(connection.scalar(text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'")))

    # The kill is placed, not timed. The first deduct ("cold") is applied and answered first;
    # then the test holds the "hot" account's row and sends the rest, so the worker waits on
    # the first batch that names "hot", holding messages it has not acknowledged, when it is
    # killed. (A worker that kept up used to apply all 200 before a timed kill landed.)
    first_key, first_user, first_amount = operations[0]
    assert first_user != "hot"
    handles = [worker.client.deduct_credits(first_user, first_amount, idempotency_key=first_key)]
    handles[0].get(timeout=30)
    with worker.engine.connect() as blocker:
        blocker.execute(select(Account.user_id).where(Account.user_id == "hot").with_for_update())
        handles += [
            worker.client.deduct_credits(user, amount, idempotency_key=key)
            for key, user, amount in operations[1:]
        ]
        deadline = time.monotonic() + 30
        while not waiting_for_the_lock() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert waiting_for_the_lock(), "no batch of the worker waited on the held account"
        worker.kill()
        before_restart = applied()
        blocker.rollback()
    assert 0 < before_restart < len(operations), "the kill did not land mid-run"
    worker.start()
    # Messages the killed worker held come back after the visibility timeout, with no resend:
    # each was recorded as unacknowledged as it left the queue (worker/redis_take.py).
    deadline = time.monotonic() + 60
    results = [handle.get(timeout=max(1.0, deadline - time.monotonic())) for handle in handles]
    assert all(result.kind == "deduct" for result in results)
    assert_each_deduct_applied_once(worker, operations, accounts, 100_000)
    print(f"applied before SIGKILL: {before_restart}, after restart: {len(operations) - before_restart}")
