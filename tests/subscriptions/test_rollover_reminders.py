"""Expiry reminders and rollover: a plan's allocation that rolls over is announced
(`credits.expiring`) only for the credits that will not roll (`remaining`), with those that
will (`rolls_over`); an allocation that rolls whole is not announced at all. On SQLite,
PostgreSQL and MariaDB (engine/sweeps.py `_remind_chunk`, engine/rollover.py
`rolling_credits`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from creditworker import CreditService, SubscriptionService
from creditworker.storage.tables import OutboxEvent

T0 = datetime(2031, 3, 1, 0, 0, tzinfo=UTC)
DAY = timedelta(days=1)


@pytest.fixture
def credits(engine: Engine) -> CreditService:
    """Reminders 1 day before expiry: a daily plan's allocation is reminded as soon as it is granted."""
    return CreditService(engine, expiry_reminder_days=(1,))


@pytest.fixture
def subs(credits: CreditService) -> SubscriptionService:
    return SubscriptionService(credits)


def reminders(engine: Engine) -> list[dict[str, Any]]:
    with Session(engine) as session:
        return [row.payload for row in session.scalars(
            select(OutboxEvent).where(OutboxEvent.routing_key == "credits.expiring").order_by(OutboxEvent.id))]


def test_a_reminder_announces_only_what_will_not_roll(
    subs: SubscriptionService, credits: CreditService, engine: Engine,
) -> None:
    subs.create_plan("daily", 100, billing_period="daily", rollover_max=50,
                     rollover_expires_after_periods=2, now=T0)
    subs.assign_plan("alice", "daily", now=T0)
    credits.deduct_credits("alice", 30, now=T0 + timedelta(hours=1))
    assert credits.send_expiry_reminders(now=T0 + timedelta(hours=2)) == 1
    (reminder,) = reminders(engine)
    assert (reminder["remaining"], reminder["rolls_over"], reminder["days_before"]) == (20, 50, 1)
    # The boundary does what the reminder said: 50 roll, 20 expire.
    subs.allocate_due(now=T0 + DAY)
    assert credits.get_user_credits_info("alice", now=T0 + DAY).available == 150
    # The rolled lot expires for good two periods after the boundary: announced whole.
    assert credits.send_expiry_reminders(now=T0 + 2 * DAY + timedelta(hours=1)) >= 1
    rolled = [payload for payload in reminders(engine) if payload["expires_at"].startswith("2031-03-04")
              and payload["remaining"] == 50]
    assert len(rolled) == 1 and rolled[0]["rolls_over"] == 0


def test_an_allocation_that_rolls_whole_is_not_announced_as_expiring(
    subs: SubscriptionService, credits: CreditService, engine: Engine,
) -> None:
    subs.create_plan("daily", 100, billing_period="daily", rollover_max_percent=100, now=T0)
    subs.assign_plan("bob", "daily", now=T0)
    credits.deduct_credits("bob", 40, now=T0 + timedelta(hours=1))
    assert credits.send_expiry_reminders(now=T0 + timedelta(hours=2)) == 0
    assert credits.send_expiry_reminders(now=T0 + timedelta(hours=23)) == 0
    assert reminders(engine) == []


def test_the_limit_is_shared_by_the_period_s_lots_in_the_order_they_were_granted(
    subs: SubscriptionService, credits: CreditService, engine: Engine,
) -> None:
    """An upgrade grants the difference as a second lot; the new plan's limit (it decides the
    boundary) covers the first lot before the second."""
    subs.create_plan("small", 100, billing_period="daily", rollover_max=120, now=T0)
    subs.create_plan("large", 200, billing_period="daily", rollover_max=120, now=T0)
    subs.assign_plan("cleo", "small", now=T0)
    subs.change_plan("cleo", "large", now=T0 + timedelta(hours=12))
    assert credits.send_expiry_reminders(now=T0 + timedelta(hours=13)) == 1
    (reminder,) = reminders(engine)
    assert reminder["rolls_over"] == 20
    total = credits.get_user_credits_info("cleo", now=T0 + timedelta(hours=13)).available
    assert reminder["remaining"] == total - 120


def test_an_allocation_of_a_plan_without_rollover_or_ending_is_announced_whole(
    subs: SubscriptionService, credits: CreditService, engine: Engine,
) -> None:
    subs.create_plan("plain", 100, billing_period="daily", now=T0)
    subs.create_plan("rolling", 100, billing_period="daily", rollover_max=100, now=T0)
    subs.assign_plan("dan", "plain", now=T0)
    subs.assign_plan("eve", "rolling", now=T0)
    subs.remove_plan("eve", at_period_end=True, now=T0 + timedelta(hours=1))  # ends: nothing rolls
    assert credits.send_expiry_reminders(now=T0 + timedelta(hours=2)) == 2
    assert sorted((r["user_id"], r["remaining"], r["rolls_over"]) for r in reminders(engine)) == [
        ("dan", 100, 0), ("eve", 100, 0)]
