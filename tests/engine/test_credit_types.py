"""Credit types on SQLite, PostgreSQL and MariaDB: every lot, hold and entry belongs to one
type, and types never mix (a deduct of `images` never draws `credits`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
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
