"""Rollover of unused plan credits on SQLite, PostgreSQL and MariaDB: the rule, the boundary
in the allocation's transaction, holds that end after it, rolled lots' expiry, plan changes
and bad input (engine/rollover.py, `rules.roll_over`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from creditworker import CreditService, SubscriptionService
from creditworker.contract.errors import ValidationFailed
from creditworker.engine import rules
from creditworker.records.audit import audit
from creditworker.storage.tables import Entry, Lot, OutboxEvent
from tests.engine.test_credits import snapshot

T0 = datetime(2031, 3, 1, 0, 0, tzinfo=UTC)
DAY = timedelta(days=1)


@pytest.fixture
def subs(service: CreditService) -> SubscriptionService:
    return SubscriptionService(service)


def lots(engine: Engine, user: str) -> list[dict[str, Any]]:
    """The user's lots in id order, with their rollover columns."""
    with Session(engine) as session:
        return [
            {"id": lot.id, "amount": lot.amount, "remaining": lot.remaining, "expires_at": lot.expires_at,
             "rolls_over": lot.rolls_over, "rolled_from": lot.rolled_from_lot_id}
            for lot in session.scalars(select(Lot).where(Lot.user_id == user).order_by(Lot.id))
        ]


def entries(engine: Engine, user: str, kind: str) -> list[Entry]:
    with Session(engine) as session:
        return list(session.scalars(select(Entry).where(Entry.user_id == user, Entry.kind == kind)
                                    .order_by(Entry.id)))


def available(service: CreditService, user: str, at: datetime) -> int:
    return service.get_user_credits_info(user, now=at).available


def audited(engine: Engine) -> None:
    report = audit(engine)
    assert report.passed, report.problems


# ---------------------------------------------------------------- the rule (plain Python)


def _lot(lot_id: int, amount: int, remaining: int) -> rules.Lot:
    return rules.Lot(lot_id, "u", amount, remaining, 0, T0, "subscription", T0 - DAY, f"k{lot_id}", age=lot_id)


def test_rule_rolls_what_is_free_up_to_the_limit_and_forfeits_the_rest() -> None:
    source = _lot(1, 100, 70)
    account = rules.Account("u", 70, 0, None, False, lots=[source], lots_loaded=True)
    postings = rules.roll_over(account, [source], 50, at=T0, key="k", expires_at=T0 + DAY)
    assert [(p.kind, p.amount) for p in postings] == [("rollover", 0), ("expire", -20)]
    rolled = postings[0].lot
    assert rolled is not None and (rolled.amount, rolled.remaining, rolled.rolled_from) == (50, 50, 1)
    assert postings[1].metadata == {"rollover_forfeited": 20}
    assert source.remaining == 0 and not source.rolls_over and source.rollover_left is None
    assert account.balance == 50


def test_rule_leaves_held_credits_on_their_source_with_what_may_still_roll() -> None:
    source = _lot(1, 100, 100)
    account = rules.Account("u", 100, 30, None, False, lots=[source], lots_loaded=True)
    postings = rules.roll_over(account, [source], 80, at=T0, key="k", expires_at=T0 + DAY)
    assert [(p.kind, p.amount) for p in postings] == [("rollover", 0)]
    assert postings[0].lot is not None and postings[0].lot.amount == 70
    assert (source.remaining, source.rollover_left, source.rollover_expires_at) == (30, 10, T0 + DAY)


def test_rule_rolls_nothing_into_a_lot_already_expired() -> None:
    source = _lot(1, 100, 40)
    account = rules.Account("u", 40, 0, None, False, lots=[source], lots_loaded=True)
    postings = rules.roll_over(account, [source], 100, at=T0, key="k", expires_at=T0)
    assert [(p.kind, p.amount) for p in postings] == [("expire", -40)]


def test_percent_limit_is_of_the_allocation_rounded_down() -> None:
    assert rules.rollover_limit([_lot(1, 99, 0)], max_credits=None, max_percent=50) == 49
    assert rules.rollover_limit([_lot(1, 99, 0)], max_credits=7, max_percent=None) == 7
    assert rules.rollover_limit([_lot(1, 99, 0)], max_credits=None, max_percent=None) == 0


# ---------------------------------------------------------------- the boundary


def test_unused_credits_roll_up_to_the_cap_and_the_rest_is_forfeited(
    subs: SubscriptionService, service: CreditService, engine: Engine,
) -> None:
    subs.create_plan("daily", 100, billing_period="daily", rollover_max=50, now=T0)
    subs.assign_plan("alice", "daily", now=T0)
    service.deduct_credits("alice", 30, now=T0 + timedelta(hours=1))
    assert lots(engine, "alice")[0]["rolls_over"]

    assert subs.allocate_due(now=T0 + DAY) == 1
    source, rolled, granted = lots(engine, "alice")
    assert (source["remaining"], source["rolls_over"]) == (0, False)
    assert (rolled["amount"], rolled["rolled_from"], rolled["expires_at"]) == (50, source["id"], T0 + 2 * DAY)
    assert (granted["amount"], granted["rolls_over"]) == (100, True)
    forfeited = entries(engine, "alice", "expire")
    assert [(e.amount, e.lot_id, e.entry_metadata) for e in forfeited] == [
        (-20, source["id"], {"rollover_forfeited": 20})]
    (rollover,) = entries(engine, "alice", "rollover")
    assert (rollover.amount, rollover.lot_id, rollover.draws) == (0, rolled["id"], [{"lot_id": source["id"], "amount": 50}])
    assert available(service, "alice", T0 + DAY) == 150
    with Session(engine) as session:
        expired = [row.payload for row in session.scalars(select(OutboxEvent).order_by(OutboxEvent.id))
                   if row.routing_key == "credits.expired"]
    assert [(event["lot_id"], event["amount"]) for event in expired] == [(source["id"], 20)]
    audited(engine)


def test_percent_of_the_allocation_rolls(subs: SubscriptionService, service: CreditService, engine: Engine) -> None:
    subs.create_plan("daily", 100, billing_period="daily", rollover_max_percent=25, now=T0)
    subs.assign_plan("alice", "daily", now=T0)
    subs.allocate_due(now=T0 + DAY)
    assert [lot["amount"] for lot in lots(engine, "alice")] == [100, 25, 100]
    assert available(service, "alice", T0 + DAY) == 125
    audited(engine)


def test_a_period_rolls_once_however_often_allocation_runs(
    subs: SubscriptionService, service: CreditService, engine: Engine,
) -> None:
    subs.create_plan("daily", 100, billing_period="daily", rollover_max=60, now=T0)
    subs.assign_plan("alice", "daily", now=T0)
    assert subs.allocate_due(now=T0 + DAY) == 1
    before = snapshot(engine)
    assert subs.allocate_due(now=T0 + DAY + timedelta(minutes=1)) == 0
    assert subs.allocate([1], now=T0 + DAY + timedelta(minutes=2)) == 0
    after = snapshot(engine)
    assert after["credit_lots"] == before["credit_lots"] and after["ledger_entries"] == before["ledger_entries"]
    assert available(service, "alice", T0 + DAY) == 160
    audited(engine)


def test_the_expiry_sweep_leaves_a_rolling_lot_to_the_allocation(
    subs: SubscriptionService, service: CreditService, engine: Engine,
) -> None:
    subs.create_plan("daily", 100, billing_period="daily", rollover_max=100, now=T0)
    subs.assign_plan("alice", "daily", now=T0)
    assert service.expire_credits(now=T0 + DAY + timedelta(hours=2)) == 0  # beat's allocation is late
    assert lots(engine, "alice")[0]["remaining"] == 100
    subs.allocate_due(now=T0 + DAY + timedelta(hours=3))
    assert [lot["amount"] for lot in lots(engine, "alice")] == [100, 100, 100]
    assert available(service, "alice", T0 + DAY + timedelta(hours=3)) == 200
    audited(engine)


def test_rolled_credits_expire_after_the_plan_s_number_of_periods(
    subs: SubscriptionService, service: CreditService, engine: Engine,
) -> None:
    subs.create_plan("daily", 100, billing_period="daily", rollover_max=10, rollover_expires_after_periods=3, now=T0)
    subs.assign_plan("alice", "daily", now=T0)
    for day in range(1, 5):
        subs.allocate_due(now=T0 + day * DAY)
        service.expire_credits(now=T0 + day * DAY)
    first_rolled = next(lot for lot in lots(engine, "alice") if lot["rolled_from"] is not None)
    assert first_rolled["expires_at"] == T0 + 4 * DAY and first_rolled["remaining"] == 0
    live = [lot for lot in lots(engine, "alice") if lot["remaining"]]
    # day 4's allocation, and the 10 rolled at each of days 2, 3 and 4 (each lives 3 days)
    assert sorted(lot["amount"] for lot in live) == [10, 10, 10, 100]
    assert available(service, "alice", T0 + 4 * DAY) == 130
    audited(engine)


def test_a_plan_without_rollover_expires_as_before(
    subs: SubscriptionService, service: CreditService, engine: Engine,
) -> None:
    subs.create_plan("daily", 100, billing_period="daily", now=T0)
    subs.assign_plan("alice", "daily", now=T0)
    assert not lots(engine, "alice")[0]["rolls_over"]
    subs.allocate_due(now=T0 + DAY)
    assert service.expire_credits(now=T0 + DAY) == 1
    assert entries(engine, "alice", "rollover") == []
    assert available(service, "alice", T0 + DAY) == 100


# ---------------------------------------------------------------- holds across the boundary


def _held_across_the_boundary(subs: SubscriptionService, service: CreditService, rollover_max: int) -> str:
    subs.create_plan("daily", 100, billing_period="daily", rollover_max=rollover_max, now=T0)
    subs.assign_plan("alice", "daily", now=T0)
    hold = service.reserve_credits("alice", 40, ttl_seconds=3 * 86400, now=T0 + timedelta(hours=20))
    subs.allocate_due(now=T0 + DAY)
    return hold.id


def test_a_hold_released_after_the_boundary_returns_to_the_rolled_over_credits(
    subs: SubscriptionService, service: CreditService, engine: Engine,
) -> None:
    reservation = _held_across_the_boundary(subs, service, rollover_max=80)
    source, rolled, _granted = lots(engine, "alice")
    assert (source["remaining"], rolled["amount"]) == (40, 60)  # held credits wait on their source
    service.release_reservation(reservation, now=T0 + DAY + timedelta(hours=1))
    source, _rolled, _granted, rolled_again = lots(engine, "alice")
    assert source["remaining"] == 0
    assert (rolled_again["amount"], rolled_again["rolled_from"], rolled_again["expires_at"]) == (
        20, source["id"], T0 + 2 * DAY)
    assert [e.entry_metadata for e in entries(engine, "alice", "expire")] == [{"rollover_forfeited": 20}]
    assert available(service, "alice", T0 + DAY + timedelta(hours=1)) == 180
    audited(engine)


def test_a_hold_released_when_nothing_more_may_roll_expires_at_once(
    subs: SubscriptionService, service: CreditService, engine: Engine,
) -> None:
    reservation = _held_across_the_boundary(subs, service, rollover_max=60)
    service.release_reservation(reservation, now=T0 + DAY + timedelta(hours=1))
    assert lots(engine, "alice")[0]["remaining"] == 0
    assert [(e.amount, e.entry_metadata) for e in entries(engine, "alice", "expire")] == [
        (-40, {"rollover_forfeited": 40})]
    assert available(service, "alice", T0 + DAY + timedelta(hours=1)) == 160
    audited(engine)


def test_a_committed_hold_draws_its_source_and_the_rest_rolls(
    subs: SubscriptionService, service: CreditService, engine: Engine,
) -> None:
    reservation = _held_across_the_boundary(subs, service, rollover_max=80)
    service.commit_reservation(reservation, 25, now=T0 + DAY + timedelta(hours=1))
    assert lots(engine, "alice")[0]["remaining"] == 0
    assert [lot["amount"] for lot in lots(engine, "alice")] == [100, 60, 100, 15]
    assert available(service, "alice", T0 + DAY + timedelta(hours=1)) == 175
    audited(engine)


def test_a_hold_committed_for_nothing_after_the_boundary_rolls_as_a_release_does(
    subs: SubscriptionService, service: CreditService, engine: Engine,
) -> None:
    """A commit charging nothing draws no lot: the source past its boundary must still be
    found (on PostgreSQL the lots' read sends every lot past its expiry, not only the prefix
    a draw can reach, which is empty here)."""
    reservation = _held_across_the_boundary(subs, service, rollover_max=80)
    service.commit_reservation(reservation, 0, now=T0 + DAY + timedelta(hours=1))
    source, _rolled, _granted, rolled_again = lots(engine, "alice")
    assert source["remaining"] == 0
    assert (rolled_again["amount"], rolled_again["rolled_from"]) == (20, source["id"])
    assert [e.entry_metadata for e in entries(engine, "alice", "expire")] == [{"rollover_forfeited": 20}]
    assert available(service, "alice", T0 + DAY + timedelta(hours=1)) == 180
    audited(engine)


def test_a_hold_that_ran_out_rolls_at_the_next_expiry_sweep(
    subs: SubscriptionService, service: CreditService, engine: Engine,
) -> None:
    subs.create_plan("daily", 100, billing_period="daily", rollover_max=80, now=T0)
    subs.assign_plan("alice", "daily", now=T0)
    service.reserve_credits("alice", 40, ttl_seconds=6 * 3600, now=T0 + timedelta(hours=20))
    subs.allocate_due(now=T0 + DAY)
    service.release_stale_reservations(now=T0 + DAY + timedelta(hours=3))
    service.expire_credits(now=T0 + DAY + timedelta(hours=3))
    assert lots(engine, "alice")[0]["remaining"] == 0
    assert sorted(lot["amount"] for lot in lots(engine, "alice") if lot["rolled_from"]) == [20, 60]
    assert available(service, "alice", T0 + DAY + timedelta(hours=3)) == 180
    audited(engine)


# ---------------------------------------------------------------- plan changes


def test_an_upgrade_rolls_the_whole_period_under_the_new_plan_and_keeps_rolled_lots(
    subs: SubscriptionService, service: CreditService, engine: Engine,
) -> None:
    subs.create_plan("small", 100, billing_period="daily", rollover_max=30, now=T0)
    subs.create_plan("large", 200, billing_period="daily", rollover_max=150, now=T0)
    subs.assign_plan("alice", "small", now=T0)
    subs.allocate_due(now=T0 + DAY)  # 30 rolled under small
    subs.change_plan("alice", "large", now=T0 + DAY + timedelta(hours=12))  # +50 prorated, now
    subs.allocate_due(now=T0 + 2 * DAY)
    amounts = [(lot["amount"], lot["remaining"]) for lot in lots(engine, "alice")]
    # small's 100 (30 rolled, 70 forfeited), the 30 rolled, small's 2nd period 100, the
    # prorated 50; at day 2 large's rule rolls 150 of the 150 allocated; large's 200
    assert amounts == [(100, 0), (30, 30), (100, 0), (50, 0), (100, 100), (50, 50), (200, 200)]
    assert available(service, "alice", T0 + 2 * DAY) == 380
    audited(engine)


def test_a_downgrade_rolls_the_ending_period_under_the_old_plan(
    subs: SubscriptionService, service: CreditService, engine: Engine,
) -> None:
    subs.create_plan("large", 200, billing_period="daily", rollover_max=150, now=T0)
    subs.create_plan("none", 50, billing_period="daily", now=T0)
    subs.assign_plan("alice", "large", now=T0)
    subs.change_plan("alice", "none", now=T0 + timedelta(hours=12))  # at the boundary
    subs.allocate_due(now=T0 + DAY)
    assert [(lot["amount"], lot["rolls_over"]) for lot in lots(engine, "alice")] == [
        (200, False), (150, False), (50, False)]
    subs.allocate_due(now=T0 + 2 * DAY)
    service.expire_credits(now=T0 + 2 * DAY)
    assert entries(engine, "alice", "rollover")[-1].created_at == T0 + DAY  # none rolls under "none"
    assert available(service, "alice", T0 + 2 * DAY) == 50
    audited(engine)


def test_an_ended_subscription_rolls_nothing(
    subs: SubscriptionService, service: CreditService, engine: Engine,
) -> None:
    subs.create_plan("daily", 100, billing_period="daily", rollover_max=100, now=T0)
    subs.assign_plan("alice", "daily", now=T0)
    subs.remove_plan("alice", now=T0 + timedelta(hours=1))
    subs.allocate_due(now=T0 + DAY)
    assert service.expire_credits(now=T0 + DAY) == 1
    assert entries(engine, "alice", "rollover") == []
    assert available(service, "alice", T0 + DAY) == 0
    audited(engine)


# ---------------------------------------------------------------- plans and bad input


def test_plans_carry_their_rollover_and_updates_switch_the_limit(subs: SubscriptionService) -> None:
    plan = subs.create_plan("p", 100, rollover_max=40, rollover_expires_after_periods=2, now=T0)
    assert (plan.rollover_max, plan.rollover_max_percent, plan.rollover_expires_after_periods) == (40, None, 2)
    plan = subs.update_plan("p", rollover_max_percent=10, now=T0)
    assert (plan.rollover_max, plan.rollover_max_percent) == (None, 10)
    plan = subs.update_plan("p", rollover_max_percent=None, rollover_expires_after_periods=None, now=T0)
    assert (plan.rollover_max, plan.rollover_max_percent, plan.rollover_expires_after_periods) == (None, None, None)
    assert subs.get_plan("p") == plan


@pytest.mark.parametrize("fields", [
    {"rollover_max": -1},
    {"rollover_max_percent": 101},
    {"rollover_max_percent": -5},
    {"rollover_expires_after_periods": 0},
    {"rollover_max": 10, "rollover_max_percent": 10},
    {"rollover_max": "10"},
])
def test_bad_rollover_is_refused_and_changes_nothing(
    subs: SubscriptionService, engine: Engine, fields: dict[str, Any],
) -> None:
    subs.create_plan("p", 100, now=T0)
    before = snapshot(engine)
    with pytest.raises(ValidationFailed) as created:
        subs.create_plan("q", 100, **fields)
    with pytest.raises(ValidationFailed) as updated:
        subs.update_plan("p", **fields)
    assert snapshot(engine) == before
    field = next(iter(fields))
    assert field in str(created.value) or "not both" in str(created.value)
    assert updated.value.code == "invalid_input"


def test_two_holds_released_in_one_batch_roll_the_credits_they_held_once(
    subs: SubscriptionService, service: CreditService, engine: Engine,
) -> None:
    subs.create_plan("daily", 100, billing_period="daily", rollover_max=80, now=T0)
    subs.assign_plan("alice", "daily", now=T0)
    first = service.reserve_credits("alice", 30, ttl_seconds=3 * 86400, now=T0 + timedelta(hours=20))
    second = service.reserve_credits("alice", 20, ttl_seconds=3 * 86400, now=T0 + timedelta(hours=20))
    subs.allocate_due(now=T0 + DAY)
    service.apply_batch([{"op": "release", "reservation_id": first.id},
                         {"op": "release", "reservation_id": second.id}], now=T0 + DAY + timedelta(hours=1))
    assert sorted(lot["amount"] for lot in lots(engine, "alice") if lot["rolled_from"]) == [30, 50]
    assert lots(engine, "alice")[0]["remaining"] == 0
    assert available(service, "alice", T0 + DAY + timedelta(hours=1)) == 180
    audited(engine)


def test_a_refund_after_the_boundary_to_a_spent_allocation_expires_at_once(
    subs: SubscriptionService, service: CreditService, engine: Engine,
) -> None:
    subs.create_plan("daily", 100, billing_period="daily", rollover_max=80, now=T0)
    subs.assign_plan("alice", "daily", now=T0)
    spent = service.deduct_credits("alice", 100, now=T0 + timedelta(hours=1))
    subs.allocate_due(now=T0 + DAY)
    assert not lots(engine, "alice")[0]["rolls_over"]  # spent, yet no longer waiting for a boundary
    service.refund_deduction(spent.id, amount=40, reason="outage", now=T0 + DAY + timedelta(hours=1))
    assert lots(engine, "alice")[0]["remaining"] == 0
    assert available(service, "alice", T0 + DAY + timedelta(hours=1)) == 100
    audited(engine)


def test_a_lot_with_its_own_validity_does_not_roll(
    subs: SubscriptionService, service: CreditService, engine: Engine,
) -> None:
    subs.create_plan("daily", 100, billing_period="daily", validity_days=3, rollover_max=100, now=T0)
    subs.assign_plan("alice", "daily", now=T0)
    assert not lots(engine, "alice")[0]["rolls_over"]
    subs.allocate_due(now=T0 + DAY)
    assert entries(engine, "alice", "rollover") == []
    assert available(service, "alice", T0 + DAY) == 200  # the first lot lives its 3 days


def test_an_allocation_too_late_for_the_rolled_lot_forfeits_everything(
    subs: SubscriptionService, service: CreditService, engine: Engine,
) -> None:
    subs.create_plan("daily", 100, billing_period="daily", rollover_max=100, now=T0)
    subs.assign_plan("alice", "daily", now=T0)
    subs.allocate_due(now=T0 + 3 * DAY)  # the workers were down: the rolled lot would have ended on day 2
    assert entries(engine, "alice", "rollover") == []
    assert [(e.amount, e.entry_metadata) for e in entries(engine, "alice", "expire")] == [
        (-100, {"rollover_forfeited": 100})]
    assert available(service, "alice", T0 + 3 * DAY) == 100
    audited(engine)
