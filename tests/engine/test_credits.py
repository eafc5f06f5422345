"""The credit engine on SQLite, PostgreSQL and MariaDB: every operation and every error."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from creditworker import CreditService
from creditworker.contract.credits import MAX_AMOUNT, MAX_BALANCE
from creditworker.contract.errors import (
    IdempotencyConflict,
    InsufficientCredits,
    ReservationNotActive,
    UnknownReservation,
    UnknownUser,
    ValidationFailed,
)
from creditworker.records.audit import audit
from creditworker.storage.tables import Base, Lot

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)


def snapshot(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, to prove a refused operation changed nothing (but the
    `error` record of the refusal itself: ledger_records, tests/cli/test_ledger_records.py)."""
    with engine.connect() as connection:
        return {
            table.name: sorted(map(tuple, connection.execute(table.select()).all()), key=repr)
            for table in Base.metadata.sorted_tables if table.name != "ledger_records"
        }


def lots(engine: Engine, user: str) -> list[int]:
    with Session(engine) as session:
        return list(session.scalars(select(Lot.remaining).where(Lot.user_id == user).order_by(Lot.id)))


@pytest.fixture(autouse=True)
def invariants_hold_afterwards(engine: Engine) -> Any:
    yield
    report = audit(engine, allow_negative=True)
    assert report.passed, report.problems


def test_add_creates_the_account_and_a_lot(service: CreditService) -> None:
    entry = service.add_credits("ann", 100, source="bonus", description="welcome", metadata={"campaign": "x"})
    assert (entry.kind, entry.amount, entry.balance_after, entry.available_after) == ("add", 100, 100, 100)
    assert entry.lot_id is not None and entry.metadata == {"campaign": "x"}
    info = service.get_user_credits_info("ann")
    assert (info.total, info.reserved, info.available) == (100, 0, 100)


def test_deduct_consumes_lowest_priority_value_first(service: CreditService, engine: Engine) -> None:
    service.add_credits("ann", 10, priority=5, now=NOW)
    service.add_credits("ann", 10, priority=1, now=NOW)
    entry = service.deduct_credits("ann", 12, now=NOW)
    assert lots(engine, "ann") == [8, 0]
    assert [draw["amount"] for draw in entry.draws] == [10, 2]


def test_deduct_consumes_soonest_expiring_lot_first_and_unexpiring_last(
    service: CreditService, engine: Engine
) -> None:
    service.add_credits("ann", 10, now=NOW)
    service.add_credits("ann", 10, expires_at=NOW + timedelta(days=30), now=NOW)
    service.add_credits("ann", 10, expires_at=NOW + timedelta(days=2), now=NOW)
    service.deduct_credits("ann", 15, now=NOW)
    assert lots(engine, "ann") == [10, 5, 0]


def test_deduct_takes_the_oldest_of_equal_lots_first(service: CreditService, engine: Engine) -> None:
    service.add_credits("ann", 10, now=NOW)
    service.add_credits("ann", 10, now=NOW + timedelta(seconds=1))
    service.deduct_credits("ann", 4, now=NOW)
    assert lots(engine, "ann") == [6, 10]


def test_insufficient_credits_changes_nothing(service: CreditService, engine: Engine) -> None:
    service.add_credits("ann", 10)
    before = snapshot(engine)
    with pytest.raises(InsufficientCredits) as refused:
        service.deduct_credits("ann", 11)
    assert refused.value.details["available"] == 10
    assert snapshot(engine) == before


def test_reserve_holds_credits_out_of_available(service: CreditService) -> None:
    service.add_credits("ann", 50)
    hold = service.reserve_credits("ann", 20, ttl_seconds=60)
    assert hold.status == "active" and hold.amount == 20
    info = service.get_user_credits_info("ann")
    assert (info.total, info.reserved, info.available) == (50, 20, 30)
    with pytest.raises(InsufficientCredits):
        service.deduct_credits("ann", 31)


def test_commit_below_the_hold_charges_the_actual_amount_and_frees_the_rest(service: CreditService) -> None:
    service.add_credits("ann", 50)
    hold = service.reserve_credits("ann", 20)
    entry = service.commit_reservation(hold.id, 12)
    assert (entry.kind, entry.amount, entry.held) == ("commit", -12, -20)
    info = service.get_user_credits_info("ann")
    assert (info.total, info.reserved, info.available) == (38, 0, 38)
    assert service.get_reservation(hold.id).committed_amount == 12


def test_commit_without_amount_charges_the_hold(service: CreditService) -> None:
    service.add_credits("ann", 50)
    hold = service.reserve_credits("ann", 20)
    assert service.commit_reservation(hold.id).amount == -20


def test_commit_above_the_hold_charges_the_extra_when_available_covers_it(service: CreditService) -> None:
    service.add_credits("ann", 50)
    hold = service.reserve_credits("ann", 20)
    service.commit_reservation(hold.id, 45)
    assert service.get_user_credits_info("ann").total == 5


def test_commit_above_what_is_available_is_rejected_by_default(service: CreditService, engine: Engine) -> None:
    service.add_credits("ann", 50)
    hold = service.reserve_credits("ann", 20)
    before = snapshot(engine)
    with pytest.raises(InsufficientCredits):
        service.commit_reservation(hold.id, 51)
    assert snapshot(engine) == before
    assert service.get_reservation(hold.id).status == "active"


def test_allow_negative_records_the_debt_and_the_next_grant_pays_it(engine: Engine) -> None:
    service = CreditService(engine, overage_policy="allow_negative")
    service.add_credits("ann", 50)
    hold = service.reserve_credits("ann", 20)
    service.commit_reservation(hold.id, 60)
    assert service.get_user_credits_info("ann").total == -10
    service.add_credits("ann", 25)
    assert service.get_user_credits_info("ann").total == 15
    assert lots(engine, "ann") == [0, 15]


def test_release_gives_the_hold_back(service: CreditService) -> None:
    service.add_credits("ann", 50)
    hold = service.reserve_credits("ann", 20)
    entry = service.release_reservation(hold.id)
    assert (entry.kind, entry.amount, entry.held) == ("release", 0, -20)
    assert service.get_user_credits_info("ann").available == 50
    with pytest.raises(ReservationNotActive):
        service.commit_reservation(hold.id)


def test_a_hold_past_its_ttl_cannot_be_committed_and_that_write_releases_it(service: CreditService) -> None:
    service.add_credits("ann", 50, now=NOW)
    hold = service.reserve_credits("ann", 20, ttl_seconds=60, now=NOW)
    later = NOW + timedelta(seconds=61)
    with pytest.raises(ReservationNotActive) as refused:
        service.commit_reservation(hold.id, now=later)
    assert refused.value.details["status"] == "expired"
    assert service.get_reservation(hold.id).status == "expired"
    assert service.get_history("ann", limit=1)[0].kind == "reservation_expired"
    assert service.release_stale_reservations(now=later) == 0
    assert service.get_user_credits_info("ann").available == 50


def test_the_sweep_releases_a_hold_past_its_ttl_once_when_no_write_came(service: CreditService) -> None:
    service.add_credits("ann", 50, now=NOW)
    hold = service.reserve_credits("ann", 20, ttl_seconds=60, now=NOW)
    later = NOW + timedelta(seconds=61)
    assert service.release_stale_reservations(now=later) == 1
    assert service.release_stale_reservations(now=later) == 0
    assert service.get_reservation(hold.id).status == "expired"
    assert service.get_history("ann", limit=1)[0].kind == "reservation_expired"


def test_a_hold_past_its_ttl_stops_counting_at_once_and_the_next_write_releases_it(
    service: CreditService,
) -> None:
    service.add_credits("ann", 50, now=NOW)
    stale = service.reserve_credits("ann", 40, ttl_seconds=60, now=NOW)
    fresh = service.reserve_credits("ann", 5, ttl_seconds=600, now=NOW)
    later = NOW + timedelta(seconds=61)
    before_any_write = service.get_user_credits_info("ann", now=later)
    assert (before_any_write.reserved, before_any_write.available) == (5, 45)
    assert service.get_reservation(stale.id).status == "active"  # not released yet: nothing wrote
    again = service.reserve_credits("ann", 45, ttl_seconds=60, now=later)  # needs the stale hold's credits
    assert service.get_reservation(stale.id).status == "expired"
    kinds = [(e.kind.value, e.reservation_id) for e in reversed(service.get_history("ann", limit=2))]
    assert kinds == [("reservation_expired", stale.id), ("reserve", again.id)]
    assert service.get_reservation(fresh.id).status == "active"
    info = service.get_user_credits_info("ann", now=later)
    assert (info.total, info.reserved, info.available) == (50, 50, 0)
    assert service.release_stale_reservations(now=later) == 0


def test_expire_credits_takes_expired_lots_once(service: CreditService) -> None:
    service.add_credits("ann", 30, expires_at=NOW + timedelta(days=1), now=NOW)
    service.add_credits("ann", 5, now=NOW)
    assert service.expire_credits(now=NOW + timedelta(days=2)) == 1
    assert service.expire_credits(now=NOW + timedelta(days=2)) == 0
    assert service.get_user_credits_info("ann").total == 5
    expired = service.get_history("ann", kinds=["expire"])
    assert [(e.amount, e.balance_after) for e in expired] == [(-30, 5)]


def test_held_credits_do_not_expire_until_the_hold_ends(service: CreditService) -> None:
    service.add_credits("ann", 30, expires_at=NOW + timedelta(days=1), now=NOW)
    hold = service.reserve_credits("ann", 20, ttl_seconds=7 * 86400, now=NOW)
    after = NOW + timedelta(days=2)
    service.expire_credits(now=after)
    assert service.get_user_credits_info("ann", now=after).total == 20
    service.commit_reservation(hold.id, 15, now=after)
    service.expire_credits(now=after)
    assert service.get_user_credits_info("ann", now=after).total == 0


def test_expiring_credits_and_expiring_soon(service: CreditService) -> None:
    service.add_credits("ann", 10, expires_at=NOW + timedelta(days=3), now=NOW)
    service.add_credits("ann", 20, expires_at=NOW + timedelta(days=20), now=NOW)
    service.add_credits("ann", 40, now=NOW)
    soon = service.get_expiring_credits("ann", 7, now=NOW)
    assert [(lot.remaining, lot.source) for lot in soon] == [(10, "purchase")]
    assert [lot.remaining for lot in service.get_expiring_credits("ann", 30, now=NOW)] == [10, 20]
    assert service.get_user_credits_info("ann", now=NOW).expiring_soon == 10


def test_history_is_newest_first_and_pages_with_before(service: CreditService) -> None:
    for amount in range(1, 8):
        service.add_credits("ann", amount)
    first = service.get_history("ann", limit=3)
    assert [e.amount for e in first] == [7, 6, 5]
    second = service.get_history("ann", limit=3, before=first[-1].id)
    assert [e.amount for e in second] == [4, 3, 2]
    assert [e.amount for e in service.get_history("ann", limit=3, before=second[-1].id)] == [1]


def test_same_key_and_request_returns_the_first_result_and_changes_nothing(
    service: CreditService, engine: Engine
) -> None:
    service.add_credits("ann", 50)
    first = service.deduct_credits("ann", 10, idempotency_key="order-1")
    before = snapshot(engine)
    again = service.deduct_credits("ann", 10, idempotency_key="order-1")
    assert again == first
    assert snapshot(engine) == before


def test_same_key_with_a_different_request_is_a_conflict(service: CreditService, engine: Engine) -> None:
    service.add_credits("ann", 50)
    service.deduct_credits("ann", 10, idempotency_key="order-1")
    before = snapshot(engine)
    with pytest.raises(IdempotencyConflict):
        service.deduct_credits("ann", 11, idempotency_key="order-1")
    with pytest.raises(IdempotencyConflict):
        service.add_credits("ann", 10, idempotency_key="order-1")
    assert snapshot(engine) == before


def test_reservation_replay_returns_the_same_hold(service: CreditService) -> None:
    service.add_credits("ann", 50)
    first = service.reserve_credits("ann", 10, idempotency_key="r-1")
    assert service.reserve_credits("ann", 10, idempotency_key="r-1") == first
    assert service.get_user_credits_info("ann").reserved == 10


def test_a_refused_key_can_be_used_again_later(service: CreditService) -> None:
    service.add_credits("ann", 5)
    with pytest.raises(InsufficientCredits):
        service.deduct_credits("ann", 10, idempotency_key="retry-me")
    service.add_credits("ann", 5)
    assert service.deduct_credits("ann", 10, idempotency_key="retry-me").balance_after == 0


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.deduct_credits("nobody", 1),
        lambda s: s.reserve_credits("nobody", 1),
        lambda s: s.get_user_credits_info("nobody"),
        lambda s: s.get_history("nobody"),
        lambda s: s.get_expiring_credits("nobody", 7),
    ],
)
def test_unknown_users_are_named(service: CreditService, call: Any) -> None:
    with pytest.raises(UnknownUser):
        call(service)


@pytest.mark.parametrize(
    "call",
    [lambda s: s.commit_reservation("missing"), lambda s: s.release_reservation("missing")],
)
def test_unknown_reservations_are_named(service: CreditService, call: Any) -> None:
    with pytest.raises(UnknownReservation):
        call(service)


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.add_credits("ann", 0),
        lambda s: s.add_credits("ann", -5),
        lambda s: s.add_credits("ann", 1.5),
        lambda s: s.add_credits("ann", "10"),
        lambda s: s.add_credits("ann", True),
        lambda s: s.add_credits("ann", MAX_AMOUNT + 1),
        lambda s: s.add_credits("", 10),
        lambda s: s.add_credits(" ann", 10),
        lambda s: s.add_credits("a" * 129, 10),
        lambda s: s.add_credits("ann\x00", 10),
        lambda s: s.add_credits("\ud800", 10),
        lambda s: s.add_credits("ann", 10, source="stolen"),
        lambda s: s.add_credits("ann", 10, expires_at=NOW - timedelta(days=1), now=NOW),
        lambda s: s.add_credits("ann", 10, metadata={"blob": "x" * 9000}),
        lambda s: s.deduct_credits("ann", float("nan")),
        lambda s: s.reserve_credits("ann", 1, ttl_seconds=0),
        lambda s: s.reserve_credits("ann", 1, ttl_seconds=8 * 86400),
        lambda s: s.get_history("ann", limit=0),
    ],
)
def test_invalid_input_is_refused_and_changes_nothing(service: CreditService, engine: Engine, call: Any) -> None:
    service.add_credits("ann", 10, now=NOW)
    before = snapshot(engine)
    with pytest.raises(ValidationFailed):
        call(service)
    assert snapshot(engine) == before


def test_balance_cannot_exceed_the_maximum(
    service: CreditService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real ceiling is 2**62; lowered here so the test needs two grants, not millions."""
    assert MAX_BALANCE == 2**62
    monkeypatch.setattr("creditworker.engine.rules.MAX_BALANCE", 15)
    service.add_credits("ann", 10)
    with pytest.raises(ValidationFailed):
        service.add_credits("ann", 6)
    assert service.get_user_credits_info("ann").total == 10


def test_user_ids_are_compared_exactly(service: CreditService) -> None:
    service.add_credits("Ann", 10)
    with pytest.raises(UnknownUser):
        service.get_user_credits_info("ann")


def test_ledger_file_gets_one_line_per_entry_and_one_per_refusal(service: CreditService, ledger_path: Path) -> None:
    service.add_credits("ann", 10, idempotency_key="g")
    service.add_credits("ann", 10, idempotency_key="g")  # replay: nothing new
    with pytest.raises(InsufficientCredits):
        service.deduct_credits("ann", 11)
    with pytest.raises(ValidationFailed):
        service.deduct_credits("ann", -1)
    records = [json.loads(line) for line in ledger_path.read_text().splitlines()]
    assert [r["record"] for r in records] == ["entry", "error", "error"]
    assert records[0]["idempotency_key"] == "g" and records[0]["balance_after"] == 10
    assert [r["error"]["code"] for r in records[1:]] == ["insufficient_credits", "invalid_input"]
