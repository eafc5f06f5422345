"""A month of daily periods with rollover through a real worker and a real beat (RabbitMQ,
the vhost `CREDITWORKER_TEST_RABBITMQ_URL` names), checked against the same month run in
process with explicit clocks: the same ledger, entry for entry, and the audit passes.

Simulated time: a day passes when the test moves every stored moment of the two users
(their subscriptions' periods, their lots' expiries, their holds' TTLs) a day and a second
back, under their accounts' row locks (the engine's own lock); the extra second keeps each
period's start, and so its allocation and rollover keys, its own. Beat then finds the period ended and
allocates it, and the expiry sweep (every second too) races the allocation for the ended
period's lot: the sweep must leave a lot that rolls over to the allocation.

mona spends some of each day's 100 (cap 30, rolled credits last 2 periods: rolled lots
expire at the boundaries too). hal holds all but 5 of what he has across each boundary and
releases the hold after it (cap 40%, rolled credits last 60 periods): 5 roll at the
boundary; the new period's grant then backs the hold, so the expiry sweep rolls what the
cap leaves room for and expires the rest.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from creditworker import CreditService, SubscriptionService
from creditworker.records.audit import audit
from creditworker.storage.database import make_engine
from creditworker.storage.migrate import upgrade
from creditworker.storage.tables import Entry, Lot, SubscriptionRow
from creditworker.worker import commands
from tests.conftest import wipe
from tests.e2e.conftest import RunningWorker, _running
from tests.harness import stop_process

pytestmark = pytest.mark.e2e

DAY = timedelta(days=1)
DAYS = 30
USERS = ("hal", "mona")
SPEND = [(37 * day) % 120 for day in range(DAYS)]
"""What mona tries to spend each day (refused, and skipped, when it is more than she has)."""


class Month(Protocol):
    """One way of living through the month: in process, or through the worker and beat."""

    def deduct(self, user: str, amount: int) -> None: ...
    def reserve(self, user: str, amount: int) -> str: ...
    def release(self, reservation_id: str) -> None: ...
    def available(self, user: str) -> int: ...
    def next_day(self, day: int) -> None: ...


def live_month(month: Month) -> list[tuple[int, int]]:
    """The month's script; (hal's, mona's) available at each day's end."""
    daily: list[tuple[int, int]] = []
    held: str | None = None
    for day in range(DAYS):
        if held is not None:
            month.release(held)  # after the boundary
        spend = SPEND[day]
        if 0 < spend <= month.available("mona"):
            month.deduct("mona", spend)
        held = month.reserve("hal", month.available("hal") - 5)
        daily.append((month.available("hal"), month.available("mona")))
        month.next_day(day)
    return daily


def ledger(engine: Engine) -> list[tuple[Any, ...]]:
    """The ledger without ids, keys, times and order: what happened. (At a boundary the
    expiry sweep may expire an older rolled lot before or after the allocation rolls the
    period: the same entries, in either order.)"""
    with Session(engine) as session:
        return sorted(
            (entry.user_id, entry.kind, entry.amount, entry.held,
             (entry.entry_metadata or {}).get("rollover_forfeited") or 0)
            for entry in session.scalars(select(Entry))
        )


class InProcess:
    """The reference: the engine in process, each step at its own simulated moment."""

    def __init__(self, url: str, start: datetime) -> None:
        self.engine = make_engine(url)
        upgrade(self.engine)
        self.credits = CreditService(self.engine)
        self.subscriptions = SubscriptionService(self.credits)
        self.start = start
        self.now = start + timedelta(hours=1)

    def tick(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now

    def deduct(self, user: str, amount: int) -> None:
        self.credits.deduct_credits(user, amount, now=self.tick())

    def reserve(self, user: str, amount: int) -> str:
        return self.credits.reserve_credits(user, amount, ttl_seconds=3 * 86400, now=self.tick()).id

    def release(self, reservation_id: str) -> None:
        self.credits.release_reservation(reservation_id, now=self.tick())

    def available(self, user: str) -> int:
        return self.credits.get_user_credits_info(user, now=self.tick()).available

    def next_day(self, day: int) -> None:
        self.now = self.start + (day + 1) * DAY + timedelta(minutes=1)
        self.subscriptions.allocate_due(now=self.tick())
        self.credits.expire_credits(now=self.tick())
        self.now += timedelta(hours=1)


class ThroughTheWorker:
    """The same month through the producer client, the worker and beat."""

    def __init__(self, worker: RunningWorker) -> None:
        self.worker = worker
        self.client = worker.client

    def deduct(self, user: str, amount: int) -> None:
        self.client.deduct_credits(user, amount).get(timeout=30)

    def reserve(self, user: str, amount: int) -> str:
        return self.client.reserve_credits(user, amount, ttl_seconds=3 * 86400).id

    def release(self, reservation_id: str) -> None:
        self.client.release_reservation(reservation_id).get(timeout=30)

    def available(self, user: str) -> int:
        return self.client.get_user_credits_info(user).get(timeout=30).available

    def next_day(self, day: int) -> None:
        engine = self.worker.engine
        with engine.begin() as connection:  # under the accounts' locks, as the engine takes them
            connection.execute(text("SELECT user_id FROM accounts WHERE user_id IN ('hal', 'mona') "
                                    "ORDER BY user_id FOR UPDATE"))
            connection.execute(text(
                "UPDATE subscriptions SET anchor_at = anchor_at - interval '1 day 1 second', "
                "current_period_start = current_period_start - interval '1 day 1 second', "
                "current_period_end = current_period_end - interval '1 day 1 second' WHERE user_id IN ('hal', 'mona')"))
            connection.execute(text(
                "UPDATE credit_lots SET expires_at = expires_at - interval '1 day 1 second', "
                "rollover_expires_at = rollover_expires_at - interval '1 day 1 second' WHERE user_id IN ('hal', 'mona')"))
            connection.execute(text(
                "UPDATE reservations SET expires_at = expires_at - interval '1 day 1 second' "
                "WHERE user_id IN ('hal', 'mona') AND status = 'active'"))
        wait_for(lambda: allocated(engine) == {day + 1}, f"day {day + 1}'s allocation")
        wait_for(lambda: not overdue(engine), f"day {day + 1}'s expiry sweep")


def allocated(engine: Engine) -> set[int]:
    with Session(engine) as session:
        return set(session.scalars(select(SubscriptionRow.period_index).where(SubscriptionRow.user_id.in_(USERS))))


def overdue(engine: Engine) -> list[int]:
    """Lots past their expiry that no sweep took yet (here no hold keeps one: the new
    period's grant backs hal's hold)."""
    with Session(engine) as session:
        return list(session.scalars(select(Lot.id).where(
            Lot.user_id.in_(USERS), Lot.expires_at <= datetime.now(UTC), Lot.remaining > 0,
            Lot.rolls_over.is_(False))))


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, rabbitmq_url: str,
    migrated_engines: dict[str, Engine],
) -> Iterator[RunningWorker]:
    """A worker on RabbitMQ and a beat that allocates and expires every 0.3 s."""
    extra = {"CREDITWORKER_RESULT_BACKEND": "rpc://", "CREDITWORKER_ALLOCATE_INTERVAL_SECONDS": "0.3",
             "CREDITWORKER_EXPIRE_INTERVAL_SECONDS": "0.3"}
    for worker in _running(tmp_path_factory, postgres_url, rabbitmq_url, migrated_engines, **extra):
        wipe(worker.engine)
        beat = subprocess.Popen(
            commands.beat_command(str(worker.workdir / "beat.schedule")), env=worker.env,
            cwd=worker.workdir, stdout=open(worker.workdir / "beat.log", "wb"),  # noqa: SIM115 - beat's log
            stderr=subprocess.STDOUT,
        )
        try:
            yield worker
        finally:
            stop_process(beat)


def subscribe(create_plan: Callable[..., Any], assign_plan: Callable[..., Any], start: datetime) -> None:
    create_plan("e2e-spend", 100, billing_period="daily", rollover_max=30, rollover_expires_after_periods=2)
    create_plan("e2e-hold", 100, billing_period="daily", rollover_max_percent=40,
                rollover_expires_after_periods=60)
    assign_plan("mona", "e2e-spend", start)
    assign_plan("hal", "e2e-hold", start)


def test_a_month_of_daily_periods_with_rollover_matches_the_engine_in_process(
    stack: RunningWorker, tmp_path: Path,
) -> None:
    start = datetime.now(UTC) - timedelta(hours=1)
    client = stack.client
    subscribe(lambda *a, **k: client.create_plan(*a, **k).get(timeout=30),
              lambda user, plan, at: client.assign_plan(user, plan, start_at=at).get(timeout=30), start)
    distributed = live_month(ThroughTheWorker(stack))

    reference = InProcess(f"sqlite:///{tmp_path / 'reference.db'}", datetime(2031, 1, 1, tzinfo=UTC))
    subscribe(lambda *a, **k: reference.subscriptions.create_plan(*a, **k, now=reference.start),
              lambda user, plan, at: reference.subscriptions.assign_plan(user, plan, now=reference.start),
              reference.start)
    expected = live_month(reference)

    assert distributed == expected
    assert ledger(stack.engine) == ledger(reference.engine)
    report = audit(stack.engine)
    assert report.passed, report.problems
    kinds = {(user, kind) for user, kind, *_rest in ledger(stack.engine)}
    assert {("mona", "rollover"), ("hal", "rollover"), ("mona", "expire"), ("hal", "expire")} <= kinds
    with Session(stack.engine) as session:
        released_rolls = session.scalar(select(Entry.id).where(
            Entry.user_id == "hal", Entry.kind == "rollover", Entry.idempotency_key.not_like("subscription:%")))
    assert released_rolls is not None, "credits held at a boundary never rolled after it"
