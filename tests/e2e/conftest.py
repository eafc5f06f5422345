"""Real worker processes on real brokers, driven through the producer client.

The worker process itself (`RunningWorker`, `worker_env`, `redis_db`) is in tests/harness.py,
shared with bench/; they are imported here too, where the test modules import them from.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from creditworker.worker.app import make_celery
from tests.conftest import engine_for, wipe
from tests.harness import RunningWorker, redis_db, worker_env

__all__ = ["RunningWorker", "redis_db", "worker_env"]  # for the test modules that import them

pytestmark = pytest.mark.e2e


def assert_each_deduct_applied_once(
    worker: RunningWorker, operations: list[tuple[str, str, int]], accounts: list[str],
    starting: int,
) -> None:
    """Every (key, user, amount) deduct applied exactly once, each account's balance what it
    should be, and the audit passing: what a user checks after a fault."""
    from collections import Counter

    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from creditworker.records.audit import audit
    from creditworker.storage.tables import Entry

    with Session(worker.engine) as session:
        keys = Counter(session.scalars(select(Entry.idempotency_key).where(Entry.kind == "deduct")))
    assert set(keys) == {key for key, _, _ in operations}
    assert set(keys.values()) == {1}
    for account in accounts:
        spent = sum(amount for _, user, amount in operations if user == account)
        assert worker.service.get_user_credits_info(account).total == starting - spent
    assert audit(worker.engine).passed


def serving(env: dict[str, str], workdir: Path, port: int, ready_path: str) -> Iterator[str]:
    """`creditworker serve` on `port`; yields its base URL once `ready_path` answers, and
    stops it afterwards."""
    import httpx

    log_path = workdir / "serve.log"
    with open(log_path, "ab") as log:
        server = subprocess.Popen(
            ["creditworker", "serve", "--port", str(port)], env=env, cwd=workdir,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, log_path.read_text()
            try:
                httpx.get(f"{base_url}{ready_path}", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server never listened"
                time.sleep(0.1)
        yield base_url
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def purge(worker: RunningWorker) -> None:
    with worker.client.app.connection_for_write() as connection:
        make_celery(worker.settings).control.purge(connection=connection)


def _running(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, broker_url: str,
    migrated_engines: dict[str, Engine], **extra: str,
) -> Iterator[RunningWorker]:
    workdir = tmp_path_factory.mktemp("worker")
    engine = engine_for(database_url, migrated_engines)
    worker = RunningWorker(
        worker_env(workdir, database_url, broker_url, **extra), workdir, engine,
        workdir / "worker.log",
    )
    purge(worker)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


def running_on_redis(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, redis_url: str, db: int,
    migrated_engines: dict[str, Engine], **extra: str,
) -> Iterator[RunningWorker]:
    """A worker whose broker is Redis database `db`, emptied first (each module has its own)."""
    import redis

    broker = redis_db(redis_url, db)
    redis.Redis.from_url(broker).flushdb()
    yield from _running(tmp_path_factory, database_url, broker, migrated_engines, **extra)


@pytest.fixture(scope="module")
def redis_worker_process(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, redis_url: str,
    migrated_engines: dict[str, Engine],
) -> Iterator[RunningWorker]:
    yield from running_on_redis(tmp_path_factory, postgres_url, redis_url, 11, migrated_engines)


@pytest.fixture(scope="module")
def ungathered_worker(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, redis_url: str,
    migrated_engines: dict[str, Engine],
) -> Iterator[RunningWorker]:
    """A worker on Redis that runs each message alone (`CREDITWORKER_GATHER_MAX=1`)."""
    yield from running_on_redis(
        tmp_path_factory, postgres_url, redis_url, 6, migrated_engines, CREDITWORKER_GATHER_MAX="1",
    )


@pytest.fixture(scope="module")
def rabbitmq_worker_process(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, rabbitmq_url: str,
    redis_url: str, migrated_engines: dict[str, Engine],
) -> Iterator[RunningWorker]:
    yield from _running(
        tmp_path_factory, postgres_url, rabbitmq_url, migrated_engines,
        CREDITWORKER_RESULT_BACKEND="rpc://",
    )


@pytest.fixture
def redis_worker(redis_worker_process: RunningWorker) -> RunningWorker:
    wipe(redis_worker_process.engine)
    return redis_worker_process


@pytest.fixture
def rabbitmq_worker(rabbitmq_worker_process: RunningWorker) -> RunningWorker:
    wipe(rabbitmq_worker_process.engine)
    return rabbitmq_worker_process


@pytest.fixture(params=["redis", "rabbitmq"])
def worker(request: pytest.FixtureRequest) -> Any:
    """Each test runs against a real worker on Redis, then on RabbitMQ."""
    return request.getfixturevalue(f"{request.param}_worker")
