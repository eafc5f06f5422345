"""Notifications in the engine: events are outbox rows written with their change."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from creditworker import CreditService
from creditworker.contract.errors import InsufficientCredits
from creditworker.records.outbox import pending_count, publish_pending
from creditworker.storage.tables import Operation, OutboxEvent

NOW = datetime(2030, 1, 10, 12, 0, tzinfo=UTC)


def outbox(engine: Engine) -> list[tuple[str, dict[str, Any]]]:
    with Session(engine) as session:
        rows = session.scalars(select(OutboxEvent).order_by(OutboxEvent.id))
        return [(row.routing_key, row.payload) for row in rows]


def keys(engine: Engine) -> list[str]:
    return [key for key, _payload in outbox(engine)]


@pytest.fixture
def low_service(engine: Engine) -> CreditService:
    return CreditService(engine, low_credit_threshold=10)


def test_low_credit_event_fires_once_per_crossing_and_rearms_after_top_up(
    low_service: CreditService, engine: Engine
) -> None:
    low_service.add_credits("ann", 30)
    low_service.deduct_credits("ann", 25)  # 5 left: crosses below 10
    low_service.deduct_credits("ann", 1)  # still below: no second event
    low_service.add_credits("ann", 100)  # back above: re-armed
    low_service.deduct_credits("ann", 100)  # 4 left: crosses again
    events = [payload for key, payload in outbox(engine) if key == "credits.low"]
    assert [(e["available"], e["threshold"]) for e in events] == [(5, 10), (4, 10)]
    assert all(e["user_id"] == "ann" and e["version"] == 1 for e in events)


def test_reserving_below_the_threshold_counts_as_a_crossing(
    low_service: CreditService, engine: Engine
) -> None:
    low_service.add_credits("ann", 15)
    low_service.reserve_credits("ann", 8)
    assert keys(engine) == ["credits.low"]


def test_account_threshold_overrides_the_default_and_none_turns_it_off(
    engine: Engine,
) -> None:
    service = CreditService(engine)  # no default threshold
    service.add_credits("ann", 100)
    service.deduct_credits("ann", 95)
    assert keys(engine) == []
    service.add_credits("bob", 100)
    service.set_low_credit_threshold("bob", 50)
    service.deduct_credits("bob", 60)
    assert [(k, p["user_id"], p["threshold"]) for k, p in outbox(engine)] == [
        ("credits.low", "bob", 50)
    ]


def test_a_refused_operation_writes_no_event(low_service: CreditService, engine: Engine) -> None:
    low_service.add_credits("ann", 30)
    with pytest.raises(InsufficientCredits):
        low_service.deduct_credits("ann", 31)
    assert keys(engine) == []


def test_a_change_that_rolls_back_leaves_no_event(
    low_service: CreditService, engine: Engine
) -> None:
    """Failing the operation row's insert (a late write of the transaction) rolls back the event.

    On PostgreSQL that insert is part of the writer's one script (with the event's), so
    the hook fails the script; elsewhere it is a statement of its own, after the event's."""
    low_service.add_credits("ann", 30)
    failures = {"left": 10}

    def fail_insert(_connection: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        # PostgreSQL runs it prepared: after its first run the text names the statement only, and
        # the operation's row is one of its values (as JSON, or one array per column for many
        # rows), bound by the driver or, with psycopg2, written into the text as a literal
        bound = " ".join(str(value) for value in parameters.values()) if isinstance(parameters, dict) else ""
        if failures["left"] and (f"INSERT INTO {Operation.__tablename__} " in statement
                                 or '"fingerprint":' in bound + statement or "_fingerprint)s" in statement):
            failures["left"] -= 1
            raise RuntimeError("the database went away mid-transaction")

    event.listen(engine, "before_cursor_execute", fail_insert)
    try:
        with pytest.raises(RuntimeError):
            low_service.deduct_credits("ann", 25)
    finally:
        event.remove(engine, "before_cursor_execute", fail_insert)
    assert keys(engine) == []
    assert low_service.get_user_credits_info("ann").available == 30


def test_expiry_and_stale_holds_publish_their_events(engine: Engine) -> None:
    service = CreditService(engine)
    service.add_credits("ann", 20, expires_at=NOW + timedelta(days=1), now=NOW)
    service.add_credits("ann", 5, now=NOW)
    hold = service.reserve_credits("ann", 3, ttl_seconds=60, now=NOW)
    service.expire_credits(now=NOW + timedelta(days=2))
    service.release_stale_reservations(now=NOW + timedelta(days=2))
    events = outbox(engine)
    assert [key for key, _ in events] == ["credits.expired", "reservation.expired"]
    assert events[0][1]["lot_id"] and events[0][1]["amount"] == 20
    assert events[1][1]["reservation_id"] == hold.id and events[1][1]["amount"] == 3


def test_expiry_reminders_are_sent_once_per_lot_and_day(engine: Engine) -> None:
    service = CreditService(engine, expiry_reminder_days=(7, 1))
    service.add_credits("ann", 20, expires_at=NOW + timedelta(days=10), now=NOW)
    assert service.send_expiry_reminders(now=NOW) == 0
    assert service.send_expiry_reminders(now=NOW + timedelta(days=4)) == 1
    assert service.send_expiry_reminders(now=NOW + timedelta(days=4, hours=1)) == 0
    assert service.send_expiry_reminders(now=NOW + timedelta(days=9, hours=1)) == 1
    assert service.send_expiry_reminders(now=NOW + timedelta(days=9, hours=2)) == 0
    reminders = [p for k, p in outbox(engine) if k == "credits.expiring"]
    assert [r["days_before"] for r in reminders] == [7, 1]
    assert all(r["remaining"] == 20 for r in reminders)


def test_spent_lots_get_no_reminder(engine: Engine) -> None:
    service = CreditService(engine)
    service.add_credits("ann", 20, expires_at=NOW + timedelta(days=3), now=NOW)
    service.deduct_credits("ann", 20, now=NOW)
    assert service.send_expiry_reminders(now=NOW) == 0


def test_reminder_sweeps_running_at_once_remind_each_lot_once(
    pg_engine: Engine,
) -> None:
    service = CreditService(pg_engine)
    for user in range(40):
        service.add_credits(f"user-{user}", 10, expires_at=NOW + timedelta(days=5), now=NOW)
    start = threading.Barrier(4)

    def sweep() -> None:
        start.wait()
        service.send_expiry_reminders(now=NOW)

    threads = [threading.Thread(target=sweep) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    per_lot = Counter(p["lot_id"] for k, p in outbox(pg_engine) if k == "credits.expiring")
    assert len(per_lot) == 40 and set(per_lot.values()) == {1}


def test_relay_publishes_each_pending_event_and_marks_it(engine: Engine) -> None:
    service = CreditService(engine, low_credit_threshold=10)
    for user in ("ann", "bob", "cid"):
        service.add_credits(user, 20)
        service.deduct_credits(user, 15)
    published: list[str] = []
    assert publish_pending(engine, lambda key, payload, event_id: published.append(event_id)) == 3
    assert pending_count(engine) == 0
    assert publish_pending(engine, lambda *args: published.append("again")) == 0
    assert len(set(published)) == 3


def test_a_relay_that_crashes_mid_chunk_loses_nothing(engine: Engine) -> None:
    service = CreditService(engine, low_credit_threshold=10)
    for user in ("ann", "bob", "cid", "dan"):
        service.add_credits(user, 20)
        service.deduct_credits(user, 15)
    attempts: list[str] = []

    def crash_on_third(key: str, payload: dict[str, Any], event_id: str) -> None:
        attempts.append(event_id)
        if len(attempts) == 3:
            raise ConnectionError("broker lost")

    with pytest.raises(ConnectionError):
        publish_pending(engine, crash_on_third)
    assert pending_count(engine) == 4  # nothing marked: the chunk rolled back
    delivered: list[str] = []
    publish_pending(engine, lambda key, payload, event_id: delivered.append(event_id))
    with Session(engine) as session:
        all_ids = set(session.scalars(select(OutboxEvent.event_id)))
        assert session.scalar(select(func.count()).select_from(OutboxEvent)) == 4
    assert set(delivered) == all_ids


def test_two_relays_at_once_publish_each_event_once(pg_engine: Engine) -> None:
    service = CreditService(pg_engine, low_credit_threshold=10)
    for user in range(300):
        service.add_credits(f"user-{user}", 20)
        service.deduct_credits(f"user-{user}", 15)
    published: list[str] = []
    lock = threading.Lock()

    def record(key: str, payload: dict[str, Any], event_id: str) -> None:
        with lock:
            published.append(event_id)

    threads = [
        threading.Thread(target=publish_pending, args=(pg_engine, record)) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(published) == 300 and len(set(published)) == 300
