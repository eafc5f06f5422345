"""A worker SIGKILLed at any moment loses no fire-and-forget operation, on every broker.

The producer here is the least careful one: `send_task` as fast as it can, no waiting for a
result, no resend (a cron job's batch, celery-node, a raw Celery message). So every deduct
must be applied exactly once by whatever worker runs after the kill, from the broker alone.

Two kinds of kill:
- placed, on Redis, RabbitMQ and the embedded filesystem broker: the worker kills its own
  process group when a message has just arrived from the broker, before any bookkeeping of
  it (`tests/faults/kill_point.py`). On kombu's own Redis transport that message was popped
  (BRPOP) and recorded nowhere; a kill from outside lands there about one run in five
  (issue 24), this one every run;
- random, on Redis and the embedded broker (where the project keeps the bookkeeping; on
  RabbitMQ the broker does, and tests/e2e/test_recovery.py kills a worker there too):
  killed from outside at random moments of a stream, twice in a row.

The embedded broker's worker holds the messages it took in its own folder until it
acknowledges them; the next worker puts back what a dead one held.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from creditworker.contract.operations import DEDUCT
from creditworker.storage.tables import Entry
from creditworker.worker import commands
from tests.conftest import engine_for, wipe
from tests.e2e.conftest import RunningWorker, assert_each_deduct_applied_once, purge, worker_env
from tests.faults.servers import PrivateRedis
from tests.harness import with_checkout_on_path

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

ACCOUNTS = ["hot", "warm", "cold"]
STARTING = 1_000_000
RECOVERY_BOUND = 90.0
"""Seconds for every deduct to be applied after the last kill: a worker's start, Redis's
visibility timeout (5 s here) and a restore sweep, and the rest of the stream."""

KILLING_WORKER = ["celery", "-A", "tests.faults.kill_point", *commands.WORKER[3:]]


def private_broker(request: pytest.FixtureRequest) -> Iterator[str]:
    """A Redis of the test's own; this run's RabbitMQ vhost; or the embedded broker, whose
    folders live in each worker's data dir."""
    if request.param == "redis":
        server = PrivateRedis()
        try:
            yield server.url
        finally:
            server.cleanup()
    elif request.param == "rabbitmq":
        yield request.getfixturevalue("rabbitmq_url")
    else:
        yield "filesystem://"


@pytest.fixture(params=["redis", "rabbitmq", "filesystem"])
def broker_url(request: pytest.FixtureRequest) -> Iterator[str]:
    yield from private_broker(request)


@pytest.fixture(params=["redis", "filesystem"])
def acking_broker_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The brokers whose acknowledgements the project's transports keep."""
    yield from private_broker(request)


def new_worker(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, broker_url: str,
    migrated_engines: dict[str, Engine], kill_at: int = 0,
) -> RunningWorker:
    workdir = tmp_path_factory.mktemp("killed-worker")
    extra = {"CREDITWORKER_VISIBILITY_TIMEOUT_SECONDS": "5", "CREDITWORKER_TEST_KILL_AT": str(kill_at)}
    if broker_url.startswith("amqp"):
        extra["CREDITWORKER_RESULT_BACKEND"] = "rpc://"
    env = with_checkout_on_path(worker_env(workdir, database_url, broker_url, **extra))
    engine = engine_for(database_url, migrated_engines)
    return RunningWorker(env, workdir, engine, workdir / "worker.log")


def restarted(worker: RunningWorker) -> RunningWorker:
    """A fresh worker on the same broker and database (the same data dir, for the embedded one)."""
    env = {**worker.env, "CREDITWORKER_TEST_KILL_AT": "0"}
    return RunningWorker(env, worker.workdir, worker.engine, worker.log_path)


def fire_and_forget(worker: RunningWorker, operations: list[tuple[str, str, int]]) -> None:
    app = worker.client.app
    for key, user, amount in operations:
        app.send_task(DEDUCT.task, kwargs={"user_id": user, "amount": amount, "idempotency_key": key})


def applied(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.scalar(select(func.count()).select_from(Entry).where(Entry.kind == "deduct")) or 0)


def wait_applied(worker: RunningWorker, count: int, timeout: float) -> float:
    """Seconds until `count` deducts are applied; fails with what is missing after `timeout`."""
    start = time.monotonic()
    while applied(worker.engine) < count:
        assert worker.process is not None and worker.process.poll() is None, (
            f"the worker exited: {worker.log_path.read_text()[-3000:]}"
        )
        if time.monotonic() - start > timeout:
            break
        time.sleep(0.1)
    return time.monotonic() - start


def operations_for(prefix: str, count: int, seed: int) -> list[tuple[str, str, int]]:
    rng = random.Random(seed)
    return [(f"{prefix}-{n}", rng.choice(ACCOUNTS + ["hot"]), rng.randint(1, 9)) for n in range(count)]


def fund(worker: RunningWorker) -> None:
    wipe(worker.engine)
    for account in ACCOUNTS:
        worker.service.add_credits(account, STARTING)


def test_a_kill_as_a_message_arrives_loses_nothing(
    broker_url: str, postgres_url: str, tmp_path_factory: pytest.TempPathFactory,
    migrated_engines: dict[str, Engine],
) -> None:
    """The worker dies when its 150th message has just arrived; the next applies all 600."""
    worker = new_worker(tmp_path_factory, postgres_url, broker_url, migrated_engines, kill_at=150)
    fund(worker)
    purge(worker)
    worker.start(KILLING_WORKER)
    operations = operations_for("placed", 600, seed=24)
    try:
        fire_and_forget(worker, operations)
        assert worker.process is not None
        assert worker.process.wait(60) == -signal.SIGKILL, "the worker did not reach its kill point"
        at_kill = applied(worker.engine)
        worker.process = None
        worker = restarted(worker)
        worker.start()
        took = wait_applied(worker, len(operations), RECOVERY_BOUND)
        print(f"\n{broker_url.split(':')[0]}: {at_kill} applied at the kill, all {applied(worker.engine)} "
              f"{took:.1f} s after the new worker answered")
        assert_each_deduct_applied_once(worker, operations, ACCOUNTS, STARTING)
    finally:
        worker.stop()


def test_kills_at_random_moments_lose_nothing(
    acking_broker_url: str, postgres_url: str, tmp_path_factory: pytest.TempPathFactory,
    migrated_engines: dict[str, Engine],
) -> None:
    """Two workers in turn are SIGKILLed at random moments while a stream arrives and is
    applied; a third finishes it."""
    broker_url = acking_broker_url
    worker = new_worker(tmp_path_factory, postgres_url, broker_url, migrated_engines)
    fund(worker)
    purge(worker)
    rng = random.Random()
    operations = operations_for("random", 600, seed=rng.randrange(1000))
    kills = []
    try:
        for round_ in range(2):
            worker.start()
            before = applied(worker.engine)
            part = operations[round_ * 300:(round_ + 1) * 300]
            sender = threading.Thread(target=fire_and_forget, args=(worker, part))
            sender.start()
            wait_applied(worker, before + rng.randint(1, len(part) // 2), 30)
            worker.kill()
            kills.append(applied(worker.engine) - before)
            sender.join(60)
            worker = restarted(worker)
        worker.start()
        took = wait_applied(worker, len(operations), RECOVERY_BOUND)
        print(f"\n{broker_url.split(':')[0]}: of each 300, applied when killed: {kills}; all "
              f"{applied(worker.engine)} {took:.1f} s after the last worker answered")
        assert_each_deduct_applied_once(worker, operations, ACCOUNTS, STARTING)
    finally:
        worker.stop()
