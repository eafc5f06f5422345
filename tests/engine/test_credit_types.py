"""Credit types on SQLite, PostgreSQL and MariaDB: every lot, hold and entry belongs to one
type, and types never mix (a deduct of `images` never draws `credits`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from creditworker import CreditService
from creditworker.contract.credits import TypeTotals
from creditworker.contract.errors import (
    IdempotencyConflict,
    InsufficientCredits,
    UnknownUser,
    ValidationFailed,
)
from creditworker.records.audit import audit
from creditworker.storage.tables import Entry, Lot, TypeBalance

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def invariants_hold_afterwards(engine: Engine) -> Any:
    yield
    report = audit(engine)
    assert report.passed, report.problems


def remaining(engine: Engine, user_id: str) -> dict[str, list[int]]:
    """Each type's lots' remaining credits, in id order."""
    found: dict[str, list[int]] = {}
    with Session(engine) as session:
        for credit_type, left in session.execute(
                select(Lot.credit_type, Lot.remaining).where(Lot.user_id == user_id).order_by(Lot.id)):
            found.setdefault(credit_type, []).append(left)
    return found


def test_a_deduct_of_one_type_never_draws_another(service: CreditService, engine: Engine) -> None:
    service.add_credits("ann", 100, now=NOW)
    service.add_credits("ann", 10, credit_type="images", now=NOW)
    with pytest.raises(InsufficientCredits) as refused:
        service.deduct_credits("ann", 11, credit_type="images", now=NOW)
    assert refused.value.details["credit_type"] == "images"
    assert refused.value.details["available"] == 10
    entry = service.deduct_credits("ann", 4, credit_type="images", now=NOW)
    assert (entry.credit_type, entry.amount, entry.balance_after) == ("images", -4, 6)
    assert remaining(engine, "ann") == {"credits": [100], "images": [6]}
    assert service.get_user_credits_info("ann").total == 100
    assert service.get_user_credits_info("ann", credit_type="images").total == 6


def test_info_without_a_type_is_the_default_one_with_every_type_by_type(service: CreditService) -> None:
    service.add_credits("bob", 50, now=NOW)
    service.add_credits("bob", 7, credit_type="images", now=NOW)
    service.reserve_credits("bob", 3, credit_type="images", ttl_seconds=600, now=NOW)
    info = service.get_user_credits_info("bob", now=NOW)
    assert (info.credit_type, info.total, info.reserved, info.available) == ("credits", 50, 0, 50)
    assert info.by_type == {"credits": TypeTotals(total=50, reserved=0, available=50),
                            "images": TypeTotals(total=7, reserved=3, available=4)}
    images = service.get_user_credits_info("bob", credit_type="images", now=NOW)
    assert (images.credit_type, images.total, images.reserved, images.available, images.by_type) == (
        "images", 7, 3, 4, None)
    assert service.get_user_credits_info("bob", credit_type="videos", now=NOW).total == 0


def test_a_reservation_holds_and_commits_its_own_type(service: CreditService, engine: Engine) -> None:
    service.add_credits("cy", 20, now=NOW)
    service.add_credits("cy", 20, credit_type="api_tokens", now=NOW)
    hold = service.reserve_credits("cy", 15, credit_type="api_tokens", now=NOW)
    assert hold.credit_type == "api_tokens"
    with pytest.raises(InsufficientCredits):
        service.reserve_credits("cy", 6, credit_type="api_tokens", now=NOW)
    committed = service.commit_reservation(hold.id, 12, now=NOW)
    assert (committed.credit_type, committed.amount, committed.balance_after, committed.reserved_after) == (
        "api_tokens", -12, 8, 0)
    released = service.release_reservation(service.reserve_credits("cy", 5, credit_type="api_tokens",
                                                                   now=NOW).id, now=NOW)
    assert released.credit_type == "api_tokens"
    assert remaining(engine, "cy") == {"credits": [20], "api_tokens": [8]}
    assert service.get_user_credits_info("cy", credit_type="api_tokens", now=NOW).available == 8


def test_a_batch_mixes_types_and_keeps_them_apart(service: CreditService, engine: Engine) -> None:
    outcomes = service.apply_batch([
        {"op": "add", "user_id": "dee", "amount": 30},
        {"op": "add", "user_id": "dee", "amount": 5, "credit_type": "images"},
        {"op": "deduct", "user_id": "dee", "amount": 3, "credit_type": "images"},
        {"op": "deduct", "user_id": "dee", "amount": 10},
        {"op": "deduct", "user_id": "dee", "amount": 3, "credit_type": "images"},
    ], now=NOW)
    assert [outcome.ok for outcome in outcomes] == [True, True, True, True, False]
    assert outcomes[4].error is not None and outcomes[4].error["code"] == "insufficient_credits"
    assert remaining(engine, "dee") == {"credits": [20], "images": [2]}
    with Session(engine) as session:
        assert session.get(TypeBalance, ("dee", "images")).balance == 2  # type: ignore[union-attr]
        kinds = session.execute(select(Entry.credit_type, Entry.amount).where(Entry.user_id == "dee")
                                .order_by(Entry.id)).all()
    assert [tuple(row) for row in kinds] == [("credits", 30), ("images", 5), ("images", -3), ("credits", -10)]


def test_the_same_key_with_another_type_is_a_conflict_and_a_repeat_replays(service: CreditService) -> None:
    service.add_credits("eve", 10, credit_type="images", now=NOW)
    first = service.deduct_credits("eve", 2, credit_type="images", idempotency_key="d1", now=NOW)
    assert service.deduct_credits("eve", 2, credit_type="images", idempotency_key="d1", now=NOW) == first
    with pytest.raises(IdempotencyConflict) as conflict:
        service.deduct_credits("eve", 2, idempotency_key="d1", now=NOW)
    assert conflict.value.code == "idempotency_conflict"


@pytest.mark.parametrize("bad", ["", "Images", "1st", "with space", "dash-ed", "x" * 33, "é"])
def test_a_credit_type_that_is_not_an_identifier_is_refused_and_changes_nothing(
        service: CreditService, engine: Engine, bad: str) -> None:
    with pytest.raises(ValidationFailed) as refused:
        service.add_credits("fay", 5, credit_type=bad, now=NOW)
    assert refused.value.code == "invalid_input"
    assert "credit_type" in refused.value.message
    with pytest.raises(UnknownUser):
        service.get_user_credits_info("fay")


def test_other_types_expire_and_their_holds_lapse_on_their_own(service: CreditService, engine: Engine) -> None:
    service.add_credits("gus", 9, now=NOW)
    service.add_credits("gus", 6, credit_type="images", expires_at=NOW + timedelta(days=1), now=NOW)
    service.reserve_credits("gus", 2, credit_type="images", ttl_seconds=60, now=NOW)
    later = NOW + timedelta(days=2)
    assert service.release_stale_reservations(now=later) == 1
    assert service.expire_credits(now=later) == 1
    assert remaining(engine, "gus") == {"credits": [9], "images": [0]}
    info = service.get_user_credits_info("gus", now=later)
    assert info.total == 9 and info.by_type is not None
    assert info.by_type["images"] == TypeTotals(total=0, reserved=0, available=0)


def test_balance_at_a_moment_is_per_type(service: CreditService) -> None:
    service.add_credits("hal", 40, now=NOW)
    service.add_credits("hal", 8, credit_type="images", now=NOW + timedelta(hours=1))
    service.deduct_credits("hal", 5, credit_type="images", now=NOW + timedelta(hours=2))
    at = NOW + timedelta(hours=1, minutes=30)
    assert service.get_user_credits_info("hal", at=at).total == 40
    assert service.get_user_credits_info("hal", at=at, credit_type="images").total == 8
    assert service.get_user_credits_info("hal", at=NOW + timedelta(hours=3), credit_type="images").total == 3


def test_corrections_act_on_the_lots_own_type(service: CreditService, engine: Engine) -> None:
    service.add_credits("ivy", 10, now=NOW)
    grant = service.add_credits("ivy", 10, credit_type="images", now=NOW)
    deduct = service.deduct_credits("ivy", 4, credit_type="images", now=NOW)
    refund = service.refund_deduction(deduct.id, reason="correction", now=NOW)
    assert (refund.credit_type, refund.balance_after) == ("images", 10)
    assert grant.lot_id is not None
    voided = service.void_lot(grant.lot_id, reason="refund", amount=3, now=NOW)
    assert (voided.credit_type, voided.balance_after) == ("images", 7)
    assert service.get_user_credits_info("ivy").total == 10


def test_history_of_one_credit_type_pages_newest_first(service: CreditService) -> None:
    service.add_credits("jon", 10, now=NOW)
    images = [service.add_credits("jon", 5, credit_type="images", now=NOW),
              service.deduct_credits("jon", 2, credit_type="images", now=NOW)]
    service.deduct_credits("jon", 3, now=NOW)
    images.append(service.deduct_credits("jon", 1, credit_type="images", now=NOW))
    found = service.get_history("jon", credit_type="images")
    assert [entry.id for entry in found] == [entry.id for entry in reversed(images)]
    assert {entry.credit_type for entry in found} == {"images"}
    older = service.get_history("jon", credit_type="images", before=found[0].id, limit=1, kinds=["deduct"])
    assert [entry.id for entry in older] == [images[1].id]
    assert [entry.kind for entry in service.get_history("jon", credit_type="credits")] == ["deduct", "add"]
    assert len(service.get_history("jon")) == 5
    assert service.get_history("jon", credit_type="videos") == []
    with pytest.raises(ValidationFailed):
        service.get_history("jon", credit_type="Not An Id")


def test_promotional_credits_are_drawn_before_paid_ones_at_equal_priority_and_expiry(
        service: CreditService, engine: Engine) -> None:
    ends = NOW + timedelta(days=30)
    service.add_credits("jo", 10, source="purchase", expires_at=ends, now=NOW)
    service.add_credits("jo", 10, source="bonus", expires_at=ends, now=NOW)
    service.add_credits("jo", 10, source="promotional", now=NOW)  # no expiry: drawn after both
    service.add_credits("jo", 10, source="purchase", priority=-1, now=NOW)  # a lower priority comes first
    service.deduct_credits("jo", 25, now=NOW)
    assert remaining(engine, "jo") == {"credits": [5, 0, 10, 0]}
    service.deduct_credits("jo", 10, now=NOW)
    assert remaining(engine, "jo") == {"credits": [0, 0, 5, 0]}


# ---------------------------------------------------------------- grant attributes


def test_a_grant_effective_later_is_pending_until_its_moment_with_no_job(
        service: CreditService, engine: Engine) -> None:
    monday = NOW + timedelta(days=3)
    service.add_credits("kim", 10, now=NOW)
    service.add_credits("kim", 50, effective_at=monday, source="promotional", now=NOW)
    info = service.get_user_credits_info("kim", now=NOW)
    assert (info.total, info.pending, info.available) == (60, 50, 10)
    assert info.by_type is not None and info.by_type["credits"].pending == 50
    with pytest.raises(InsufficientCredits) as refused:
        service.deduct_credits("kim", 11, now=NOW)
    assert (refused.value.details["available"], refused.value.details["pending"]) == (10, 50)
    with pytest.raises(InsufficientCredits):
        service.reserve_credits("kim", 11, now=NOW)
    service.deduct_credits("kim", 10, now=NOW)  # draws the effective lot only
    assert remaining(engine, "kim") == {"credits": [0, 50]}
    after = monday + timedelta(seconds=1)
    info = service.get_user_credits_info("kim", now=after)
    assert (info.total, info.pending, info.available) == (50, 0, 50)
    service.deduct_credits("kim", 20, now=after)
    assert remaining(engine, "kim") == {"credits": [0, 30]}


def test_a_pending_grant_of_another_type_and_in_a_batch(service: CreditService, engine: Engine) -> None:
    later = NOW + timedelta(hours=1)
    outcomes = service.apply_batch([
        {"op": "add", "user_id": "lee", "amount": 5, "credit_type": "images"},
        {"op": "add", "user_id": "lee", "amount": 7, "credit_type": "images", "effective_at": later.isoformat()},
        {"op": "deduct", "user_id": "lee", "amount": 6, "credit_type": "images"},
        {"op": "deduct", "user_id": "lee", "amount": 5, "credit_type": "images"},
    ], now=NOW)
    assert [outcome.ok for outcome in outcomes] == [True, True, False, True]
    images = service.get_user_credits_info("lee", credit_type="images", now=NOW)
    assert (images.total, images.pending, images.available) == (7, 7, 0)
    service.deduct_credits("lee", 7, credit_type="images", now=later)
    assert remaining(engine, "lee") == {"images": [0, 0]}


def test_a_pending_lot_can_be_voided_and_bad_grant_attributes_change_nothing(
        service: CreditService, engine: Engine) -> None:
    service.add_credits("max", 4, now=NOW)
    grant = service.add_credits("max", 9, effective_at=NOW + timedelta(days=1), now=NOW)
    assert grant.lot_id is not None
    service.void_lot(grant.lot_id, reason="refund", now=NOW)
    assert service.get_user_credits_info("max", now=NOW).pending == 0
    for bad in ({"effective_at": datetime(1969, 12, 31, tzinfo=UTC)},
                {"cost_basis": {"amount": "0.01", "currency": "usd"}},
                {"cost_basis": {"amount": "0.01", "currency": "EURO"}},
                {"cost_basis": {"amount": "-1", "currency": "USD"}},
                {"effective_at": NOW + timedelta(days=2), "expires_at": NOW + timedelta(days=1)}):
        with pytest.raises(ValidationFailed) as refused:
            service.add_credits("max", 1, now=NOW, **bad)  # type: ignore[arg-type]
        assert refused.value.code == "invalid_input"
    assert remaining(engine, "max") == {"credits": [4, 0]}


def test_the_cost_basis_is_kept_on_the_lot_and_carried_onto_each_draw(
        service: CreditService, engine: Engine) -> None:
    service.add_credits("nia", 100, cost_basis={"amount": Decimal("0.02"), "currency": "USD"}, priority=0,
                        now=NOW)
    service.add_credits("nia", 100, source="bonus", priority=1, now=NOW)  # free credits, drawn after
    entry = service.deduct_credits("nia", 120, now=NOW)
    assert [(draw["amount"], draw.get("unit_cost"), draw.get("currency")) for draw in entry.draws] == [
        (100, "0.02", "USD"), (20, None, None)]
    with Session(engine) as session:
        lot = session.scalars(select(Lot).where(Lot.user_id == "nia").order_by(Lot.id)).first()
    assert lot is not None and (lot.cost_basis_amount, lot.cost_basis_currency) == (Decimal("0.02"), "USD")
    assert service.get_history("nia", kinds=["deduct"])[0].draws == entry.draws


def test_usage_values_consumption_with_the_cost_basis_per_type(service: CreditService) -> None:
    service.add_credits("oli", 100, cost_basis={"amount": "0.02", "currency": "USD"}, now=NOW)
    service.add_credits("oli", 10, credit_type="images", cost_basis={"amount": "0.5", "currency": "EUR"}, now=NOW)
    spent = service.deduct_credits("oli", 30, now=NOW)
    service.refund_deduction(spent.id, amount=10, reason="correction", now=NOW)
    service.deduct_credits("oli", 4, credit_type="images", now=NOW)
    window = {"start": NOW - timedelta(days=1), "end": NOW + timedelta(days=1)}
    (every,) = service.get_usage("oli", **window)
    assert (every.consumed, every.refunded, every.consumed_cost) == (
        34, 10, {"USD": Decimal("0.40"), "EUR": Decimal("2.0")})
    (images,) = service.get_usage("oli", credit_type="images", **window)
    assert (images.granted, images.consumed, images.consumed_cost) == (10, 4, {"EUR": Decimal("2.0")})


def test_events_on_the_notification_exchange_carry_their_credit_type(service: CreditService, engine: Engine) -> None:
    from creditworker.contract.events import parse_event
    from creditworker.storage.tables import OutboxEvent

    service.add_credits("pat", 5, credit_type="images", expires_at=NOW + timedelta(days=1), now=NOW)
    service.add_credits("pat", 5, expires_at=NOW + timedelta(days=1), now=NOW)
    service.reserve_credits("pat", 1, credit_type="images", ttl_seconds=60, now=NOW)
    later = NOW + timedelta(days=2)
    service.release_stale_reservations(now=later)
    service.expire_credits(now=later)
    with Session(engine) as session:
        payloads = list(session.scalars(select(OutboxEvent.payload).order_by(OutboxEvent.id)))
    sent = sorted((event["type"], event["credit_type"]) for event in payloads if event["user_id"] == "pat")
    # each type's expiry took its available to zero: depleted, each of its own type
    assert sent == [("credits.depleted", "credits"), ("credits.depleted", "images"), ("credits.expired", "credits"),
                    ("credits.expired", "images"), ("reservation.expired", "images")]
    assert all(parse_event(event).credit_type in ("credits", "images") for event in payloads  # type: ignore[attr-defined]
               if event["user_id"] == "pat")


def test_a_pending_grant_pays_a_debt_off_at_once_and_no_debt_is_made_beside_pending_credits(
        engine: Engine) -> None:
    service = CreditService(engine, overage_policy="allow_negative")
    service.add_credits("quin", 10, now=NOW)
    hold = service.reserve_credits("quin", 10, now=NOW)
    service.commit_reservation(hold.id, 14, now=NOW)  # 4 of debt
    service.add_credits("quin", 20, effective_at=NOW + timedelta(days=1), now=NOW)
    info = service.get_user_credits_info("quin", now=NOW)
    assert (info.total, info.pending, info.available) == (16, 16, 0)
    then = service.get_user_credits_info("quin", at=NOW, now=NOW + timedelta(days=3))  # the same moment, read later
    assert (then.total, then.pending, then.available) == (16, 16, 0)
    hold = service.reserve_credits("quin", 1, now=NOW + timedelta(days=2))
    assert hold.amount == 1
    service.add_credits("quin", 5, effective_at=NOW + timedelta(days=9), now=NOW + timedelta(days=2))
    with pytest.raises(InsufficientCredits):  # above what is spendable, with credits pending
        service.commit_reservation(hold.id, 30, now=NOW + timedelta(days=2))
    assert service.get_user_credits_info("quin", now=NOW + timedelta(days=2)).total == 21


def test_an_events_account_snapshot_is_of_its_own_credit_type(service: CreditService, engine: Engine) -> None:
    from creditworker.storage.tables import OutboxEvent

    service.add_credits("rae", 100, now=NOW)
    service.add_credits("rae", 8, credit_type="images", expires_at=NOW + timedelta(days=1), now=NOW)
    service.reserve_credits("rae", 3, credit_type="images", ttl_seconds=60, now=NOW)
    service.release_stale_reservations(now=NOW + timedelta(hours=1))
    with Session(engine) as session:
        payloads = [payload for payload in session.scalars(select(OutboxEvent.payload).order_by(OutboxEvent.id))
                    if payload["user_id"] == "rae"]
    released = next(payload for payload in payloads if payload["type"] == "reservation.expired")
    assert released["credit_type"] == "images"
    assert released["account"] == {"balance": 8, "reserved": 0, "available": 8, "credit_type": "images"}
