"""Subscriptions through a real worker and a real beat on Redis, driven by the producer client."""

from __future__ import annotations

import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from creditworker.contract.errors import (
    PlanInUse,
    UnknownPlan,
    UnknownSubscription,
    ValidationFailed,
)
from creditworker.storage.tables import Lot, SubscriptionRow
from creditworker.worker import commands
from tests.conftest import wipe
from tests.e2e.conftest import RunningWorker, _running, redis_db
from tests.e2e.test_beat_events import collect, purge_event_queues
from tests.harness import stop_process

pytestmark = pytest.mark.e2e

DAY = timedelta(days=1)


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, redis_url: str,
    migrated_engines: dict[str, Engine],
) -> Iterator[dict[str, Any]]:
    """A worker and a beat that allocates every second."""
    broker = redis_db(redis_url, 7)
    redis.Redis.from_url(broker).flushdb()
    purge_event_queues(broker)
    extra = {"CREDITWORKER_ALLOCATE_INTERVAL_SECONDS": "1", "CREDITWORKER_RELAY_INTERVAL_SECONDS": "1"}
    for worker in _running(tmp_path_factory, postgres_url, broker, migrated_engines, **extra):
        wipe(worker.engine)
        beat = subprocess.Popen(
            commands.beat_command(str(worker.workdir / "beat.schedule")), env=worker.env,
            cwd=worker.workdir, stdout=open(worker.workdir / "beat.log", "wb"),  # noqa: SIM115 - beat's log
            stderr=subprocess.STDOUT,
        )
        try:
            yield {"worker": worker, "broker": broker}
        finally:
            stop_process(beat)


def grants(engine: Engine, user: str) -> list[int]:
    with Session(engine) as session:
        return list(session.scalars(
            select(Lot.amount).where(Lot.user_id == user, Lot.source == "subscription").order_by(Lot.id)
        ))


def wait_for(condition: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_plans_round_trip_through_the_worker(stack: dict[str, Any]) -> None:
    client = stack["worker"].client
    plan = client.create_plan("e2e-basic", 100, price="4.50", billing_period="daily").get()
    assert (plan.name, plan.credit_limit, str(plan.price.normalize())) == ("e2e-basic", 100, "4.5")
    assert client.get_plan(plan.id).get() == plan
    assert client.update_plan("e2e-basic", credit_limit=120).get().credit_limit == 120
    assert "e2e-basic" in [p.name for p in client.list_plans().get()]
    with pytest.raises(UnknownPlan):
        client.get_plan("nope").get()
    with pytest.raises(ValidationFailed):
        client.create_plan("bad", -1)  # refused before anything is sent
    client.create_plan("e2e-unused", 5).get()
    assert client.delete_plan("e2e-unused").get() == {"deleted": "e2e-unused"}


def test_a_daily_plan_is_allocated_on_schedule_once(stack: dict[str, Any]) -> None:
    worker: RunningWorker = stack["worker"]
    client = worker.client
    client.create_plan("e2e-daily", 10, billing_period="daily").get()
    start = datetime.now(UTC) - DAY + timedelta(seconds=3)  # period 0 ends in 3 s
    sub = client.assign_plan("dora", "e2e-daily", start_at=start, idempotency_key="dora-signup").get()
    assert sub.period_index == 0 and grants(worker.engine, "dora") == [10]

    wait_for(lambda: len(grants(worker.engine, "dora")) == 2)
    time.sleep(3)  # beat keeps running every second: nothing more until tomorrow
    assert grants(worker.engine, "dora") == [10, 10]
    assert client.get_user_subscription("dora").get().period_index == 1
    allocated = collect(stack["broker"], ["subscription.allocated"], 2, timeout=15)
    assert sorted(e.period_index for e in allocated if e.user_id == "dora") == [0, 1]


def test_upgrade_mid_period_grants_the_prorated_difference(stack: dict[str, Any]) -> None:
    worker: RunningWorker = stack["worker"]
    client = worker.client
    client.create_plan("e2e-small", 100, billing_period="daily").get()
    pro = client.create_plan("e2e-big", 500, billing_period="daily").get()
    client.assign_plan("ugo", "e2e-small", start_at=datetime.now(UTC) - DAY / 2).get()
    changed = client.change_plan("ugo", "e2e-big").get()
    assert changed.plan_id == pro.id
    upgrade = grants(worker.engine, "ugo")[1]
    assert 195 <= upgrade <= 200  # 400 for the half day left, rounded down
    (event,) = [e for e in collect(stack["broker"], ["subscription.changed"], 1) if e.user_id == "ugo"]
    assert event.credits_granted == upgrade


def test_removal_at_period_end_ends_the_subscription_without_a_grant(stack: dict[str, Any]) -> None:
    worker: RunningWorker = stack["worker"]
    client = worker.client
    client.create_plan("e2e-leaving", 10, billing_period="daily").get()
    start = datetime.now(UTC) - DAY + timedelta(seconds=3)
    client.assign_plan("rex", "e2e-leaving", start_at=start).get()
    assert client.remove_plan("rex").get().cancel_at_period_end
    with pytest.raises(PlanInUse):
        client.delete_plan("e2e-leaving").get()

    def ended() -> bool:
        try:
            client.get_user_subscription("rex").get()
            return False
        except UnknownSubscription:
            return True

    wait_for(ended)
    time.sleep(2)
    assert grants(worker.engine, "rex") == [10]
    (event,) = [e for e in collect(stack["broker"], ["subscription.ended"], 1) if e.user_id == "rex"]
    assert event.type == "subscription.ended"


def test_allocation_sent_many_times_in_parallel_grants_each_period_once(stack: dict[str, Any]) -> None:
    worker: RunningWorker = stack["worker"]
    client = worker.client
    client.create_plan("e2e-crowd", 3, billing_period="daily").get()
    # Period 0 ends 15 s from now: every assign must be applied before then (a loaded
    # machine took 6.5 s for the 60), or it starts in period 1 and gets no second grant.
    start = datetime.now(UTC) - DAY + timedelta(seconds=15)
    users = [f"crowd-{n}" for n in range(60)]
    for user in users:
        client.assign_plan(user, "e2e-crowd", start_at=start)
    wait_for(lambda: all(len(grants(worker.engine, u)) == 1 for u in users))
    assert datetime.now(UTC) < start + DAY, "the assigns took longer than the margin"
    time.sleep(max(0.0, (start + DAY - datetime.now(UTC)).total_seconds()))

    def fire() -> None:  # on top of beat's own runs
        client.app.send_task("creditworker.subscriptions.allocate_due").get(timeout=20)

    threads = [threading.Thread(target=fire) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    wait_for(lambda: all(len(grants(worker.engine, u)) >= 2 for u in users))
    time.sleep(3)
    with Session(worker.engine) as session:
        per_user = Counter(session.scalars(
            select(Lot.user_id).where(Lot.user_id.like("crowd-%"), Lot.source == "subscription")
        ))
        periods = set(session.scalars(
            select(SubscriptionRow.period_index).where(SubscriptionRow.user_id.like("crowd-%"))
        ))
    assert per_user == Counter({user: 2 for user in users})
    assert periods == {1}
