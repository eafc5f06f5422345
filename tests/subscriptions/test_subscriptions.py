"""Plans and subscriptions on SQLite, PostgreSQL and MariaDB: every policy and every error."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from creditworker import CreditService, SubscriptionService
from creditworker.contract.errors import (
    DuplicatePlan,
    IdempotencyConflict,
    PlanInUse,
    UnknownPlan,
    UnknownSubscription,
    UnknownUser,
    ValidationFailed,
)
from creditworker.records.audit import audit
from creditworker.storage.tables import Lot, OutboxEvent
from tests.engine.test_credits import snapshot

T0 = datetime(2031, 1, 31, 10, 0, tzinfo=UTC)


@pytest.fixture
def subs(service: CreditService) -> SubscriptionService:
    return SubscriptionService(service)


def subscription_lots(engine: Engine, user: str) -> list[tuple[int, datetime | None]]:
    with Session(engine) as session:
        return [
            (lot.amount, lot.expires_at)
            for lot in session.scalars(
                select(Lot).where(Lot.user_id == user, Lot.source == "subscription").order_by(Lot.id)
            )
        ]


def events(engine: Engine, kind: str) -> list[dict[str, Any]]:
    with Session(engine) as session:
        return [
            row.payload
            for row in session.scalars(select(OutboxEvent).order_by(OutboxEvent.id))
            if row.routing_key == kind
        ]


# ---------------------------------------------------------------- plans


def test_plan_crud(subs: SubscriptionService) -> None:
    basic = subs.create_plan("basic", 100, price="9.99", currency="EUR", billing_period="monthly",
                             validity_days=40, now=T0)
    assert (basic.name, basic.credit_limit, basic.price, basic.currency) == ("basic", 100, Decimal("9.99"), "EUR")
    assert basic.billing_period == "monthly" and basic.validity_days == 40 and basic.active
    assert subs.get_plan("basic") == subs.get_plan(basic.id) == basic
    pro = subs.create_plan("pro", 1000, price=Decimal(49), billing_period="yearly", now=T0)
    assert [p.name for p in subs.list_plans()] == ["basic", "pro"]

    updated = subs.update_plan("pro", credit_limit=1200, name="pro-2", validity_days=None, now=T0)
    assert (updated.id, updated.name, updated.credit_limit, updated.validity_days) == (pro.id, "pro-2", 1200, None)
    subs.update_plan(pro.id, active=False)
    assert [p.name for p in subs.list_plans()] == ["basic"]
    assert [p.name for p in subs.list_plans(include_inactive=True)] == ["basic", "pro-2"]

    subs.delete_plan("pro-2")
    with pytest.raises(UnknownPlan):
        subs.get_plan("pro-2")


@pytest.mark.parametrize(
    "arguments",
    [
        {"name": "", "credit_limit": 10},
        {"name": "x" * 101, "credit_limit": 10},
        {"name": "p", "credit_limit": 0},
        {"name": "p", "credit_limit": -5},
        {"name": "p", "credit_limit": 10**13},
        {"name": "p", "credit_limit": "10"},
        {"name": "p", "credit_limit": 10.5},
        {"name": "p", "credit_limit": 10, "price": "-1"},
        {"name": "p", "credit_limit": 10, "price": "1.00001"},
        {"name": "p", "credit_limit": 10, "price": "NaN"},
        {"name": "p", "credit_limit": 10, "price": "123456789012345.5"},  # 18 digits fit, 15 before the point do not
        {"name": "p", "credit_limit": 10, "price": "1e14"},
        {"name": "p", "credit_limit": 10, "currency": "euro"},
        {"name": "p", "credit_limit": 10, "billing_period": "weekly"},
        {"name": "p", "credit_limit": 10, "validity_days": 0},
    ],
)
def test_invalid_plans_are_refused_and_change_nothing(
    subs: SubscriptionService, engine: Engine, arguments: dict[str, Any]
) -> None:
    before = snapshot(engine)
    with pytest.raises(ValidationFailed):
        subs.create_plan(**arguments)
    assert snapshot(engine) == before


def test_plan_errors(subs: SubscriptionService, engine: Engine) -> None:
    subs.create_plan("basic", 100)
    subs.create_plan("pro", 200)
    before = snapshot(engine)
    with pytest.raises(DuplicatePlan):
        subs.create_plan("basic", 5)
    with pytest.raises(DuplicatePlan):
        subs.update_plan("pro", name="basic")
    with pytest.raises(UnknownPlan):
        subs.update_plan("gold", credit_limit=5)
    with pytest.raises(UnknownPlan):
        subs.delete_plan(987654)
    with pytest.raises(ValidationFailed):
        subs.update_plan("pro", credit_limit=0)
    with pytest.raises(ValidationFailed):
        subs.update_plan("pro", billing_period="yearly")  # cannot change: see update_plan
    assert snapshot(engine) == before


def test_a_plan_in_use_is_deactivated_not_deleted(subs: SubscriptionService) -> None:
    subs.create_plan("basic", 100)
    subs.assign_plan("alice", "basic", now=T0)
    with pytest.raises(PlanInUse) as caught:
        subs.delete_plan("basic")
    assert "deactivated" in str(caught.value) and caught.value.details["active_subscriptions"] == 1
    assert not subs.get_plan("basic").active
    assert subs.get_user_subscription("alice").plan_id == subs.get_plan("basic").id
    with pytest.raises(ValidationFailed, match="not active"):
        subs.assign_plan("bob", "basic", now=T0)


# ---------------------------------------------------------------- assignment


def test_plan_update_and_delete_repeated_with_a_key_answer_as_the_first_time(subs: SubscriptionService) -> None:
    """What a redelivered message does (its key is `task:<task id>`): no `unknown_plan`."""
    subs.create_plan("old-name", 100)
    renamed = subs.update_plan("old-name", name="new-name", idempotency_key="rename-1")
    assert subs.update_plan("old-name", name="new-name", idempotency_key="rename-1") == renamed
    subs.delete_plan("new-name", idempotency_key="delete-1")
    subs.delete_plan("new-name", idempotency_key="delete-1")
    with pytest.raises(UnknownPlan):
        subs.get_plan("new-name")
    subs.create_plan("kept", 100)
    subs.assign_plan("alice", "kept", now=T0)
    for _ in range(2):
        with pytest.raises(PlanInUse):
            subs.delete_plan("kept", idempotency_key="delete-2")


def test_an_update_that_clears_a_field_is_not_the_update_that_leaves_it(subs: SubscriptionService) -> None:
    subs.create_plan("weekly-ish", 100, validity_days=7)
    subs.update_plan("weekly-ish", credit_limit=5, idempotency_key="u-1")
    with pytest.raises(IdempotencyConflict):
        subs.update_plan("weekly-ish", credit_limit=5, validity_days=None, idempotency_key="u-1")


def test_assign_grants_the_first_period_at_once(subs: SubscriptionService, service: CreditService) -> None:
    subs.create_plan("basic", 100, validity_days=10)
    subs.create_plan("monthly", 50)
    sub = subs.assign_plan("alice", "basic", now=T0)
    assert (sub.user_id, sub.status, sub.period_index) == ("alice", "active", 0)
    assert (sub.current_period_start, sub.current_period_end) == (T0, datetime(2031, 2, 28, 10, tzinfo=UTC))
    assert service.get_user_credits_info("alice", now=T0).available == 100
    assert subscription_lots(subs.engine, "alice") == [(100, T0 + timedelta(days=10))]

    subs.assign_plan("bob", "monthly", now=T0)  # no validity: credits last the period
    assert subscription_lots(subs.engine, "bob") == [(50, sub.current_period_end)]
    assert [e["credits"] for e in events(subs.engine, "subscription.allocated")] == [100, 50]


def test_assign_with_a_past_start_grants_the_current_period(subs: SubscriptionService) -> None:
    subs.create_plan("daily", 10, billing_period="daily")
    sub = subs.assign_plan("alice", "daily", start_at=T0 - timedelta(days=3, hours=1), now=T0)
    assert sub.period_index == 3
    assert sub.current_period_start == T0 - timedelta(hours=1)
    assert subscription_lots(subs.engine, "alice") == [(10, T0 + timedelta(hours=23))]


def test_assign_is_idempotent_by_key(subs: SubscriptionService, engine: Engine) -> None:
    subs.create_plan("basic", 100)
    subs.create_plan("pro", 500)
    first = subs.assign_plan("alice", "basic", idempotency_key="signup-1", now=T0)
    before = snapshot(engine)
    assert subs.assign_plan("alice", "basic", idempotency_key="signup-1", now=T0) == first
    assert snapshot(engine) == before
    with pytest.raises(IdempotencyConflict):
        subs.assign_plan("alice", "pro", idempotency_key="signup-1", now=T0)
    assert snapshot(engine) == before


def test_assign_errors_change_nothing(subs: SubscriptionService, service: CreditService, engine: Engine) -> None:
    subs.create_plan("basic", 100)
    subs.assign_plan("alice", "basic", now=T0)
    service.add_credits("carol", 5)  # an account without a subscription
    before = snapshot(engine)
    with pytest.raises(ValidationFailed, match="already has an active subscription"):
        subs.assign_plan("alice", "basic", now=T0)
    with pytest.raises(UnknownPlan):
        subs.assign_plan("bob", "gold", now=T0)
    with pytest.raises(ValidationFailed, match="future"):
        subs.assign_plan("bob", "basic", start_at=T0 + timedelta(days=1), now=T0)
    with pytest.raises(ValidationFailed):
        subs.assign_plan("", "basic", now=T0)
    with pytest.raises(ValidationFailed):
        subs.assign_plan("bob", 1.5, now=T0)  # type: ignore[arg-type]
    with pytest.raises(UnknownSubscription):
        subs.get_user_subscription("carol")
    with pytest.raises(UnknownSubscription):
        subs.change_plan("carol", "basic", now=T0)
    with pytest.raises(UnknownSubscription):
        subs.remove_plan("carol", now=T0)
    with pytest.raises(UnknownUser):
        subs.change_plan("bob", "basic", now=T0)
    with pytest.raises(UnknownUser):
        subs.remove_plan("bob", now=T0)
    assert snapshot(engine) == before


# ---------------------------------------------------------------- allocation


def test_allocation_grants_each_period_once_however_often_it_runs(subs: SubscriptionService) -> None:
    subs.create_plan("daily", 10, billing_period="daily", validity_days=3)
    subs.assign_plan("alice", "daily", now=T0)
    assert subs.allocate_due(now=T0 + timedelta(hours=23)) == 0  # not due yet
    day1 = T0 + timedelta(days=1)
    assert subs.allocate_due(now=day1) == 1
    assert subs.allocate_due(now=day1) == 0
    assert subs.allocate_due(now=day1 + timedelta(hours=5)) == 0
    assert subscription_lots(subs.engine, "alice") == [(10, T0 + timedelta(days=3)), (10, day1 + timedelta(days=3))]
    assert subs.get_user_subscription("alice").period_index == 1
    allocated = events(subs.engine, "subscription.allocated")
    assert [e["period_index"] for e in allocated] == [0, 1]
    assert audit(subs.engine).passed


def test_catch_up_grants_the_current_period_only_unless_backfill(subs: SubscriptionService) -> None:
    subs.create_plan("daily", 10, billing_period="daily", validity_days=3)
    subs.assign_plan("alice", "daily", now=T0)
    subs.assign_plan("bob", "daily", now=T0)
    later = T0 + timedelta(days=5, hours=2)  # periods 1..5 are due; the workers were down
    sub = subs.get_user_subscription("alice")
    assert subs.allocate([sub.id], now=later) == 1
    assert [lot[1] for lot in subscription_lots(subs.engine, "alice")][1:] == [T0 + timedelta(days=8)]
    # backfill grants the missed periods whose credits are still valid (3 days): 3, 4, 5
    assert subs.allocate_due(now=later, backfill=True) == 3
    assert [lot[1] for lot in subscription_lots(subs.engine, "bob")] == [
        T0 + timedelta(days=d) for d in (3, 6, 7, 8)
    ]
    assert subs.allocate_due(now=later, backfill=True) == 0


def test_allocation_works_in_chunks(service: CreditService, monkeypatch: pytest.MonkeyPatch) -> None:
    subs = SubscriptionService(service, chunk_size=3)
    subs.create_plan("daily", 1, billing_period="daily")
    for n in range(8):
        subs.assign_plan(f"user-{n}", "daily", now=T0)
    calls: list[int] = []
    original = subs.allocate
    monkeypatch.setattr(subs, "allocate", lambda ids, **kw: calls.append(len(ids)) or original(ids, **kw))
    assert subs.allocate_due(now=T0 + timedelta(days=1)) == 8
    assert calls == [3, 3, 2]


def test_plan_limit_changes_apply_from_the_next_period(subs: SubscriptionService) -> None:
    subs.create_plan("daily", 10, billing_period="daily")
    subs.assign_plan("alice", "daily", now=T0)
    subs.update_plan("daily", credit_limit=25)
    subs.allocate_due(now=T0 + timedelta(days=1))
    assert [lot[0] for lot in subscription_lots(subs.engine, "alice")] == [10, 25]


# ---------------------------------------------------------------- plan changes


def test_upgrade_takes_effect_now_with_the_prorated_difference(subs: SubscriptionService, service: CreditService) -> None:
    start = datetime(2031, 4, 1, tzinfo=UTC)
    subs.create_plan("basic", 100)
    subs.create_plan("pro", 400)
    subs.assign_plan("alice", "basic", now=start)
    changed = subs.change_plan("alice", "pro", now=start + timedelta(days=10))  # 20 of 30 days left
    assert changed.plan_id == subs.get_plan("pro").id and changed.pending_plan_id is None
    end = datetime(2031, 5, 1, tzinfo=UTC)
    assert subscription_lots(subs.engine, "alice") == [(100, end), (200, end)]
    assert service.get_user_credits_info("alice", now=start).total == 300
    (event,) = events(subs.engine, "subscription.changed")
    assert event["credits_granted"] == 200 and event["new_plan_id"] == changed.plan_id
    subs.allocate_due(now=end)
    assert subscription_lots(subs.engine, "alice")[-1] == (400, datetime(2031, 6, 1, tzinfo=UTC))


def test_downgrade_takes_effect_at_the_next_period(subs: SubscriptionService) -> None:
    start = datetime(2031, 4, 1, tzinfo=UTC)
    subs.create_plan("pro", 400)
    basic = subs.create_plan("basic", 100)
    subs.assign_plan("alice", "pro", now=start)
    changed = subs.change_plan("alice", "basic", now=start + timedelta(days=3))
    assert changed.pending_plan_id == basic.id and changed.plan_id != basic.id
    assert len(subscription_lots(subs.engine, "alice")) == 1
    (event,) = events(subs.engine, "subscription.changed")
    assert event["credits_granted"] == 0 and event["effective_at"].startswith("2031-05-01")
    subs.allocate_due(now=datetime(2031, 5, 1, tzinfo=UTC))
    sub = subs.get_user_subscription("alice")
    assert (sub.plan_id, sub.pending_plan_id) == (basic.id, None)
    assert [lot[0] for lot in subscription_lots(subs.engine, "alice")] == [400, 100]


def test_a_change_of_billing_period_starts_at_the_next_period(subs: SubscriptionService) -> None:
    start = datetime(2031, 4, 1, tzinfo=UTC)
    subs.create_plan("monthly", 100)
    yearly = subs.create_plan("yearly", 2000, billing_period="yearly")
    subs.assign_plan("alice", "monthly", now=start)
    assert subs.change_plan("alice", "yearly", now=start).pending_plan_id == yearly.id
    may = datetime(2031, 5, 1, tzinfo=UTC)
    subs.allocate_due(now=may + timedelta(hours=1))
    sub = subs.get_user_subscription("alice")
    assert (sub.plan_id, sub.anchor_at, sub.period_index) == (yearly.id, may, 0)
    assert sub.current_period_end == datetime(2032, 5, 1, tzinfo=UTC)
    assert subscription_lots(subs.engine, "alice")[-1] == (2000, sub.current_period_end)


def test_change_errors_change_nothing(subs: SubscriptionService, engine: Engine) -> None:
    subs.create_plan("basic", 100)
    subs.create_plan("retired", 300, active=False)
    subs.assign_plan("alice", "basic", now=T0)
    before = snapshot(engine)
    with pytest.raises(ValidationFailed, match="already on plan"):
        subs.change_plan("alice", "basic", now=T0)
    with pytest.raises(ValidationFailed, match="not active"):
        subs.change_plan("alice", "retired", now=T0)
    with pytest.raises(UnknownPlan):
        subs.change_plan("alice", "gold", now=T0)
    assert snapshot(engine) == before


# ---------------------------------------------------------------- removal


def test_removal_at_period_end_grants_nothing_more(subs: SubscriptionService) -> None:
    subs.create_plan("daily", 10, billing_period="daily")
    subs.assign_plan("alice", "daily", now=T0)
    removed = subs.remove_plan("alice", now=T0 + timedelta(hours=2))
    assert removed.status == "active" and removed.cancel_at_period_end
    assert subs.allocate_due(now=T0 + timedelta(days=1)) == 0
    with pytest.raises(UnknownSubscription):
        subs.get_user_subscription("alice")
    (ended,) = events(subs.engine, "subscription.ended")
    assert ended["user_id"] == "alice"
    assert len(subscription_lots(subs.engine, "alice")) == 1
    subs.assign_plan("alice", "daily", now=T0 + timedelta(days=2))  # may subscribe again


def test_removal_now_ends_at_once_and_keeps_granted_credits(subs: SubscriptionService, service: CreditService) -> None:
    subs.create_plan("basic", 100)
    subs.assign_plan("alice", "basic", now=T0)
    removed = subs.remove_plan("alice", at_period_end=False, now=T0 + timedelta(days=1))
    assert (removed.status, removed.ended_at) == ("ended", T0 + timedelta(days=1))
    assert service.get_user_credits_info("alice", now=T0).total == 100
    assert len(events(subs.engine, "subscription.ended")) == 1


# ---------------------------------------------------------------- concurrency


def test_parallel_allocation_grants_once(pg_engine: Engine, tmp_path: Any) -> None:
    subs = SubscriptionService(CreditService(pg_engine, ledger_path=str(tmp_path / "ledger.jsonl")))
    subs.create_plan("daily", 7, billing_period="daily")
    for n in range(40):
        subs.assign_plan(f"user-{n}", "daily", now=T0)
    due = T0 + timedelta(days=1, minutes=1)
    results: list[int] = []
    barrier = threading.Barrier(4)

    def allocate() -> None:
        barrier.wait()
        results.append(subs.allocate_due(now=due))

    threads = [threading.Thread(target=allocate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(results) == 40
    with Session(pg_engine) as session:
        assert len(list(session.scalars(select(Lot).where(Lot.source == "subscription")))) == 80
    assert audit(pg_engine).passed
