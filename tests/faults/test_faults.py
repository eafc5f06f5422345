"""Faults under a steady stream of operations: nothing acknowledged is lost or applied twice.

Each test runs a real worker and a stream of producer deducts and grants on several
accounts (one hot), breaks something in the middle on a private server instance, and
then checks what a user would: every operation the producer got an acknowledgement for is
applied exactly once (by idempotency key), with no resend, by the same worker process that
ran before the fault (no supervisor restarts it), no balance is negative, the audit passes,
and no reservation is left half-done.
"""

from __future__ import annotations

import base64
import gc
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from creditworker.client import TaskHandle
from creditworker.contract.errors import CreditError
from creditworker.records.audit import audit
from creditworker.storage.tables import Account, Entry, Hold
from tests.conftest import engine_for, wipe
from tests.e2e.conftest import RunningWorker, _running, redis_db
from tests.faults.servers import PrivatePostgres, PrivateRabbitMQ, PrivateRedis

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

ACCOUNTS = ["hot", "a", "b", "c"]
STREAM = 2000


@dataclass
class StreamReport:
    acknowledged: dict[str, tuple[str, int]] = field(default_factory=dict)
    refused_at_send: int = 0
    in_flight_at_fault: int = 0
    handles: dict[str, TaskHandle[Any]] = field(default_factory=dict)


def run_stream(worker: RunningWorker, fault: Callable[[], None], applied: Callable[[], int]) -> StreamReport:
    """Send STREAM operations; run `fault` in the background a third of the way in."""
    report = StreamReport()
    rng = random.Random(11)
    fault_thread: threading.Thread | None = None
    for n in range(STREAM):
        if n == STREAM // 3:
            report.in_flight_at_fault = len(report.acknowledged) - applied()
            fault_thread = threading.Thread(target=fault)
            fault_thread.start()
        user = rng.choice(ACCOUNTS + ["hot"] * 4)
        key = f"stream-{n}"
        try:
            if n % 10 == 0:
                handle = worker.client.add_credits(user, 5, idempotency_key=key)
            else:
                handle = worker.client.deduct_credits(user, rng.randint(1, 5), idempotency_key=key)
        except CreditError:
            report.refused_at_send += 1  # not acknowledged: the producer knows it was not sent
            continue
        report.acknowledged[key] = (user, n)
        report.handles[key] = handle
        time.sleep(0.005)
    assert fault_thread is not None
    fault_thread.join()
    return report


def applied_keys(engine: Engine) -> Counter[str]:
    for _ in range(20):
        try:
            with Session(engine) as session:
                return Counter(
                    session.scalars(select(Entry.idempotency_key).where(Entry.idempotency_key.like("stream-%")))
                )
        except Exception:  # noqa: BLE001 - not up yet, whatever the error
            time.sleep(0.5)
    raise AssertionError("database unreachable after the fault")


def redis_broker_state(url: str, missing: set[str]) -> str:
    """Where the missing operations are on a Redis broker: queued, unacked, or nowhere."""
    client = redis.Redis.from_url(url)
    found: dict[str, str] = {}
    lists: dict[str, int] = {}
    for name in client.scan_iter():
        kind = client.type(name)
        if kind == b"list":
            lists[name.decode()] = client.llen(name)
            raws = client.lrange(name, 0, -1)
        elif kind == b"hash" and name.endswith(b"unacked"):
            raws = client.hvals(name)
        else:
            continue
        for raw in raws:
            body = _decoded(raw)
            found.update({key: name.decode() for key in missing if f"'{key}'" in body or f'"{key}"' in body})
    mutex_ttl = {k.decode(): client.ttl(k) for k in client.scan_iter("*mutex*")}
    return f"found {found}, lists {lists}, mutexes {mutex_ttl}"


def _decoded(raw: bytes) -> str:
    try:
        envelope = json.loads(raw)
        envelope = envelope[0] if isinstance(envelope, list) else envelope
        return base64.b64decode(envelope["body"]).decode()
    except Exception:  # noqa: BLE001 - not a readable envelope
        return ""


def check_exactly_once(worker: RunningWorker, report: StreamReport, timeout: float = 150) -> Counter[str]:
    """Wait until every acknowledged operation is applied, with no resend, by the worker
    process that ran before the fault; then check each was applied once."""
    try:
        return _check_exactly_once(worker, report, timeout)
    finally:
        report.handles.clear()  # drop the results' subscriptions while the broker still runs
        gc.collect()


def assert_still_running(worker: RunningWorker, pid: int) -> None:
    assert worker.process is not None and worker.process.pid == pid
    assert worker.process.poll() is None, f"the worker exited: {worker.log_path.read_text()[-3000:]}"


def _check_exactly_once(worker: RunningWorker, report: StreamReport, timeout: float) -> Counter[str]:
    assert worker.process is not None
    pid = worker.process.pid
    deadline = time.monotonic() + timeout
    keys = applied_keys(worker.engine)
    while not set(report.acknowledged) <= set(keys) and time.monotonic() < deadline:
        time.sleep(1)
        assert_still_running(worker, pid)
        keys = applied_keys(worker.engine)
    missing = set(report.acknowledged) - set(keys)
    where = redis_broker_state(worker.broker_url, missing) if missing and worker.broker_url.startswith("redis") else ""
    assert not missing, f"{len(missing)} acknowledged operations never applied, e.g. {sorted(missing)[:5]}; {where}"
    assert set(keys.values()) == {1}, "an operation was applied twice"
    with Session(worker.engine) as session:
        assert all(balance >= 0 for balance in session.scalars(select(Account.balance)))
        now = datetime.now(UTC)
        for hold in session.scalars(select(Hold)):
            assert hold.status != "active" or hold.expires_at > now
    assert audit(worker.engine).passed
    return keys


def fund(worker: RunningWorker) -> None:
    wipe(worker.engine)
    for user in ACCOUNTS:
        worker.service.add_credits(user, 1_000_000)


def count_applied(worker: RunningWorker) -> Callable[[], int]:
    return lambda: sum(applied_keys(worker.engine).values())


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    yield server
    server.cleanup()


def test_postgres_restart_mid_stream(
    private_postgres: PrivatePostgres, redis_url: str, tmp_path_factory: pytest.TempPathFactory,
    migrated_engines: dict[str, Engine],
) -> None:
    broker = redis_db(redis_url, 14)
    redis.Redis.from_url(broker).flushdb()
    for worker in _running(tmp_path_factory, private_postgres.url, broker, migrated_engines):
        fund(worker)

        def restart() -> None:
            private_postgres.stop("fast")
            time.sleep(2)
            private_postgres.start()

        report = run_stream(worker, restart, count_applied(worker))
        keys = check_exactly_once(worker, report)
        print(f"\npostgres restart: {len(report.acknowledged)} acknowledged, "
              f"{report.in_flight_at_fault} in flight at the fault, {len(keys)} applied once each")
    engine_for(private_postgres.url, migrated_engines).dispose()
    migrated_engines.pop(private_postgres.url)


def test_redis_broker_restart_mid_stream(
    postgres_url: str, tmp_path_factory: pytest.TempPathFactory, migrated_engines: dict[str, Engine],
) -> None:
    """Redis as docker-compose.yml runs it (AOF, fsync every second, no eviction) is
    SIGKILLed mid-stream and started again 3 s later: what it had acknowledged survives (a
    killed process loses nothing it wrote to the AOF; `everysec` bounds only what a machine
    crash loses), the worker reconnects by itself, and nothing needs a resend."""
    server = PrivateRedis()
    try:
        # A message a worker held when Redis went down comes back after the visibility
        # timeout: 10 s here so the test sees it come back.
        for worker in _running(
            tmp_path_factory, postgres_url, server.url, migrated_engines,
            CREDITWORKER_VISIBILITY_TIMEOUT_SECONDS="10",
        ):
            fund(worker)

            def restart() -> None:
                server.kill()
                time.sleep(3)
                server.start()

            report = run_stream(worker, restart, count_applied(worker))
            keys = check_exactly_once(worker, report)
            print(f"\nredis SIGKILL and restart: {len(report.acknowledged)} acknowledged, "
                  f"{report.refused_at_send} refused at send, {report.in_flight_at_fault} in flight at "
                  f"the fault, {len(keys)} applied once each by the same worker, none resent")
    finally:
        server.cleanup()


def test_rabbitmq_broker_restart_mid_stream(
    postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory,
    migrated_engines: dict[str, Engine],
) -> None:
    server = PrivateRabbitMQ()
    results = redis_db(redis_url, 15)
    redis.Redis.from_url(results).flushdb()
    try:
        for worker in _running(
            tmp_path_factory, postgres_url, server.url, migrated_engines,
            CREDITWORKER_RESULT_BACKEND=results,
        ):
            fund(worker)

            def restart() -> None:
                server.kill()
                server.start()

            report = run_stream(worker, restart, count_applied(worker))
            keys = check_exactly_once(worker, report)
            print(f"\nrabbitmq SIGKILL and restart: {len(report.acknowledged)} acknowledged, {report.refused_at_send} "
                  f"refused at send, {report.in_flight_at_fault} in flight at the fault, "
                  f"{len(keys)} applied once each")
    finally:
        server.cleanup()
