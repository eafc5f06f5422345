"""After a crash, every message the dead worker held is applied again within the recovery
time, with no resend from the producer; a live worker holding messages longer than the
visibility timeout does not see them redelivered.

Gathering is on (the default): a worker holds up to `GATHER_MAX x (pool size + 1)`
unacknowledged messages. RabbitMQ requeues a dead consumer's deliveries when its connection
closes; on Redis they come back after `CREDITWORKER_VISIBILITY_TIMEOUT_SECONDS` (30 s by
default), because the live worker keeps re-scoring what it holds (`worker/redelivery.py`).

Nothing needs the producer's resend: on Redis a message enters the unacknowledged set in the
same atomic step that takes it off the queue (`worker/redis_take.py`); the test checks, with
no worker running, that every sent message is applied, queued or held.
"""

from __future__ import annotations

import base64
import json
import random
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from sqlalchemy import func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from creditworker.settings import Settings, broker_transport_options
from creditworker.storage.tables import Entry
from tests.conftest import wipe
from tests.e2e.conftest import (
    RunningWorker,
    _running,
    assert_each_deduct_applied_once,
    running_on_redis,
)
from tests.e2e.test_gathering import wait_for_waiting_lock

pytestmark = pytest.mark.e2e

STREAM = 1000
RECOVERY_BOUND = 120.0
"""Seconds within which every deduct must be applied after the kill, with no resend: the
worker's restart, the default visibility timeout (30 s) and a restore sweep (5 s) for the
messages it held, and the rest of the stream, with slack for 2 busy cores."""


@pytest.fixture(params=["redis", "rabbitmq"])
def default_worker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, postgres_url: str,
    migrated_engines: dict[str, Engine],
) -> Iterator[RunningWorker]:
    """A worker with every delivery setting at its default (gathering on)."""
    if request.param == "redis":
        workers = running_on_redis(
            tmp_path_factory, postgres_url, request.getfixturevalue("redis_url"), 3, migrated_engines
        )
    else:
        workers = _running(
            tmp_path_factory, postgres_url, request.getfixturevalue("rabbitmq_url"), migrated_engines,
            CREDITWORKER_RESULT_BACKEND="rpc://",
        )
    for worker in workers:
        wipe(worker.engine)
        yield worker


def applied_deducts(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.scalar(select(func.count()).select_from(Entry).where(Entry.kind == "deduct")) or 0)


def _keys(raw_messages: list[bytes], envelope: bool = False) -> list[str]:
    keys = []
    for raw in raw_messages:
        message = json.loads(raw)[0] if envelope else json.loads(raw)
        _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        keys.append(kwargs["idempotency_key"])
    return keys


def popped_and_unrecorded(worker: RunningWorker, sent: list[str], held: list[str]) -> list[str]:
    """Redis, with no worker running: sent messages neither applied, nor queued, nor held.

    kombu's own transport takes a message off the queue (BRPOP) and only then records it as
    unacknowledged; a worker killed in between left it nowhere (issue 24)."""
    client = redis.Redis.from_url(worker.broker_url)
    queued = set(_keys(client.lrange("celery", 0, -1)))
    with Session(worker.engine) as session:
        applied = set(session.scalars(select(Entry.idempotency_key).where(Entry.kind == "deduct")))
    return [key for key in sent if key not in applied and key not in queued and key not in held]


def test_a_killed_workers_messages_are_applied_again_without_a_resend(default_worker: RunningWorker) -> None:
    worker = default_worker
    on_redis = worker.broker_url.startswith("redis")
    accounts = ["hot", "warm", "cold", "cool"]
    for account in accounts:
        worker.service.add_credits(account, 1_000_000)
    rng = random.Random(14)
    operations = [(f"kill-{n}", rng.choice(accounts + ["hot", "hot"]), rng.randint(1, 9)) for n in range(STREAM)]
    handles: dict[str, Any] = {}
    sent_keys: list[str] = []

    def send() -> None:  # at full speed, while the worker is killed and restarted
        for key, user, amount in operations:
            handles[key] = worker.client.deduct_credits(user, amount, idempotency_key=key)
            sent_keys.append(key)

    sender = threading.Thread(target=send)
    sender.start()
    deadline = time.monotonic() + 60
    while applied_deducts(worker.engine) < STREAM // 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.kill()
    killed_at, killed_at_wall = time.monotonic(), datetime.now(UTC)
    at_kill = applied_deducts(worker.engine)
    assert 0 < at_kill < STREAM, "the kill did not land mid-stream"
    held, lost = [], []
    if on_redis:  # RabbitMQ requeues a dead consumer's deliveries itself, and loses none
        sent = sent_keys[:]
        held = _keys(redis.Redis.from_url(worker.broker_url).hvals("unacked"), envelope=True)
        lost = popped_and_unrecorded(worker, sent, held)
    worker.start()
    restarted_after = time.monotonic() - killed_at
    sender.join(60)
    sent_after = time.monotonic() - killed_at
    last = at_kill
    while last < STREAM and time.monotonic() - killed_at < RECOVERY_BOUND:
        time.sleep(0.1)
        last = applied_deducts(worker.engine)
    print(f"\n{worker.broker_url.split(':', 1)[0]}: {at_kill} of {STREAM} applied at the kill; worker back "
          f"{restarted_after:.1f} s after it; all sent {sent_after:.1f} s after it; "
          f"{last} applied {time.monotonic() - killed_at:.1f} s after it; none resent")
    if held:
        with Session(worker.engine) as session:
            times = list(session.scalars(select(Entry.created_at).where(Entry.idempotency_key.in_(held))))
        latest = max(t if t.tzinfo else t.replace(tzinfo=UTC) for t in times)
        print(f"{len(held)} messages held unacknowledged by the killed worker: {len(times)} applied "
              f"without a resend, the last {(latest - killed_at_wall).total_seconds():.1f} s after the kill")
    assert not lost, f"taken off the queue by the killed worker and recorded nowhere: {lost}"
    assert last == STREAM, f"{STREAM - last} deducts not applied {RECOVERY_BOUND} s after the kill"
    assert_each_deduct_applied_once(worker, operations, accounts, 1_000_000)


# ---------------------------------------------------------------- a live worker keeps its messages

SHORT_TIMEOUT = 4


@pytest.fixture
def short_timeout_worker(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, redis_url: str,
    migrated_engines: dict[str, Engine],
) -> Iterator[RunningWorker]:
    for worker in running_on_redis(
        tmp_path_factory, postgres_url, redis_url, 4, migrated_engines,
        CREDITWORKER_VISIBILITY_TIMEOUT_SECONDS=str(SHORT_TIMEOUT),
    ):
        wipe(worker.engine)
        yield worker


def redelivered(client: redis.Redis) -> list[str]:
    """Delivery tags of messages the restore sweep has put back (queued or held again)."""
    payloads = [json.loads(raw) for raw in client.lrange("celery", 0, -1)]
    payloads += [json.loads(raw)[0] for raw in client.hvals("unacked")]
    return [p["properties"]["delivery_tag"] for p in payloads if p["headers"].get("redelivered")]


def test_a_live_worker_holding_messages_past_the_visibility_timeout_gets_no_redelivery(
    short_timeout_worker: RunningWorker,
) -> None:
    """Batches block on a row lock for four visibility timeouts; nothing is restored."""
    worker = short_timeout_worker
    options = broker_transport_options(Settings(broker_url=worker.broker_url, visibility_timeout_seconds=SHORT_TIMEOUT))
    assert options["visibility_timeout"] == SHORT_TIMEOUT
    client = redis.Redis.from_url(worker.broker_url)
    worker.service.add_credits("slow", 1000)
    with worker.engine.connect() as blocker:
        blocker.execute(text("SELECT * FROM accounts WHERE user_id = 'slow' FOR UPDATE"))
        handles = [worker.client.deduct_credits("slow", 1) for _ in range(30)]
        wait_for_waiting_lock(worker.engine)
        held = client.zrange("unacked_index", 0, -1, withscores=True)
        assert held, "the worker holds no unacknowledged message"
        oldest = []
        ends = time.monotonic() + 4 * SHORT_TIMEOUT
        while time.monotonic() < ends:
            scores = [score for _, score in client.zrange("unacked_index", 0, -1, withscores=True)]
            oldest.append(time.time() - min(scores))
            assert not redelivered(client), "a live worker's message was restored"
            time.sleep(0.2)
        blocker.rollback()
    assert [h.get(timeout=60).amount for h in handles] == [-1] * 30
    assert worker.service.get_user_credits_info("slow").total == 970
    print(f"\noldest unacknowledged score while held: {max(oldest):.1f} s (timeout {SHORT_TIMEOUT} s)")
    assert max(oldest) < SHORT_TIMEOUT
