"""Beat, worker and broker together: scheduled sweeps publish events to bound queues."""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from kombu import Connection
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from creditworker.contract.errors import IdempotencyConflict, InsufficientCredits
from creditworker.contract.events import _Event
from creditworker.notifications.exchange import consume, event_queues
from creditworker.storage.tables import Entry, OutboxEvent
from creditworker.worker import commands
from tests.conftest import wipe
from tests.e2e.conftest import RunningWorker, _running, redis_db
from tests.harness import stop_process

pytestmark = pytest.mark.e2e

FAST_SCHEDULE = {
    "CREDITWORKER_EXPIRE_INTERVAL_SECONDS": "1",
    "CREDITWORKER_RELEASE_STALE_INTERVAL_SECONDS": "1",
    "CREDITWORKER_REMINDER_INTERVAL_SECONDS": "1",
    "CREDITWORKER_RELAY_INTERVAL_SECONDS": "1",
    "CREDITWORKER_LOW_CREDIT_THRESHOLD": "10",
    "CREDITWORKER_EXPIRY_REMINDER_DAYS": "[1]",
}


def purge_event_queues(broker_url: str) -> None:
    with Connection(broker_url) as connection:
        channel = connection.default_channel
        for queue in event_queues():
            queue(channel).declare()
            queue(channel).purge()


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
    postgres_url: str, migrated_engines: dict[str, Engine],
) -> Iterator[dict[str, Any]]:
    """A worker and two beat processes at once (a deployment mistake they must survive)."""
    if request.param == "redis":
        broker = redis_db(request.getfixturevalue("redis_url"), 13)
        redis.Redis.from_url(broker).flushdb()
        extra = dict(FAST_SCHEDULE)
    else:
        broker = request.getfixturevalue("rabbitmq_url")
        extra = {**FAST_SCHEDULE, "CREDITWORKER_RESULT_BACKEND": "rpc://"}
    purge_event_queues(broker)
    for worker in _running(tmp_path_factory, postgres_url, broker, migrated_engines, **extra):
        wipe(worker.engine)
        beats = [
            subprocess.Popen(
                commands.beat_command(str(worker.workdir / f"beat-{n}.schedule")),
                env=worker.env, cwd=worker.workdir,
                stdout=open(worker.workdir / f"beat-{n}.log", "wb"),  # noqa: SIM115 - beat's log
                stderr=subprocess.STDOUT,
            )
            for n in range(2)
        ]
        try:
            yield {"worker": worker, "broker": broker}
        finally:
            for beat in beats:
                stop_process(beat)


def collect(broker: str, keys: list[str], count: int, timeout: float = 30) -> list[_Event]:
    events: list[_Event] = []
    deadline = time.monotonic() + timeout
    while len(events) < count and time.monotonic() < deadline:
        consume(events.append, broker_url=broker, routing_keys=keys, limit=count - len(events), timeout=2)
    return events


def test_scheduled_sweeps_expire_remind_and_publish_each_event_once(stack: dict[str, Any]) -> None:
    worker: RunningWorker = stack["worker"]
    broker: str = stack["broker"]
    service = worker.service
    now = datetime.now(UTC)
    for user in ("ann", "bob", "cid"):
        service.add_credits(user, 50, expires_at=now + timedelta(seconds=4))
        service.add_credits(user, 50, expires_at=now + timedelta(hours=12))

    expired = collect(broker, ["credits.expired"], 3)
    assert sorted((e.user_id, e.amount) for e in expired) == [("ann", 50), ("bob", 50), ("cid", 50)]
    reminders = collect(broker, ["credits.expiring"], 6, timeout=10)
    # the 4-second lots may or may not be reminded before they expire; the 12-hour ones are
    twelve_hour = [e for e in reminders if e.remaining == 50 and e.expires_at > now + timedelta(hours=1)]
    assert sorted(e.user_id for e in twelve_hour) == ["ann", "bob", "cid"]

    time.sleep(3)  # both beats keep sweeping: nothing may happen twice
    with Session(worker.engine) as session:
        expiries = Counter(session.scalars(select(Entry.lot_id).where(Entry.kind == "expire")))
        outbox = Counter(
            (row.routing_key, row.payload.get("lot_id"), row.payload.get("days_before"))
            for row in session.scalars(select(OutboxEvent))
        )
        assert session.scalar(select(OutboxEvent).where(OutboxEvent.published_at.is_(None))) is None
    assert len(expiries) == 3 and set(expiries.values()) == {1}
    assert set(outbox.values()) == {1}
    assert collect(broker, ["credits.expired"], 1, timeout=3) == []


def test_low_credit_event_fires_once_per_crossing_through_the_worker(stack: dict[str, Any]) -> None:
    worker: RunningWorker = stack["worker"]
    broker: str = stack["broker"]
    client = worker.client
    client.add_credits("dee", 30).get()
    client.deduct_credits("dee", 25).get()  # crosses below 10
    client.deduct_credits("dee", 1).get()  # still below: no event
    client.add_credits("dee", 40).get()  # back above: re-armed
    client.deduct_credits("dee", 40).get()  # crosses again
    events = collect(broker, ["credits.low"], 2, timeout=10)
    # Two relays (two beats and the worker) may publish them in either order, as
    # docs/notifications.md says; each carries the state it describes.
    assert sorted((e.user_id, e.available) for e in events) == [("dee", 4), ("dee", 5)]
    assert collect(broker, ["credits.low"], 1, timeout=2) == []


def test_refused_operations_publish_nothing(stack: dict[str, Any]) -> None:
    worker: RunningWorker = stack["worker"]
    broker: str = stack["broker"]
    worker.client.add_credits("eve", 20).get()
    worker.client.deduct_credits("eve", 15, idempotency_key="eve-1").get()
    with pytest.raises(IdempotencyConflict):
        worker.client.deduct_credits("eve", 16, idempotency_key="eve-1").get()
    worker.client.add_credits("eve", 1).get()  # 6: still below, no event
    with pytest.raises(InsufficientCredits):
        worker.client.deduct_credits("eve", 100).get()
    events = collect(broker, ["credits.low"], 1, timeout=10)
    assert [(e.user_id, e.available) for e in events] == [("eve", 5)]
    assert collect(broker, ["credits.low"], 1, timeout=2) == []
