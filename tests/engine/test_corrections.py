"""Corrections on SQLite, PostgreSQL and MariaDB: void a grant, refund a deduction or commit,
move a grant's expiry. Each is a new ledger entry; a refused one changes nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from creditworker import CreditService
from creditworker.contract.errors import (
    IdempotencyConflict,
    InsufficientCredits,
    UnknownEntry,
    UnknownLot,
    ValidationFailed,
)
from creditworker.records.audit import audit
from creditworker.storage.tables import Lot, OutboxEvent
from tests.engine.test_credits import lots, snapshot

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(days=10)


@pytest.fixture(autouse=True)
def invariants_hold_afterwards(engine: Engine) -> Any:
    yield
    report = audit(engine)
    assert report.passed, report.problems


def events(engine: Engine, routing_key: str) -> list[dict[str, Any]]:
    with Session(engine) as session:
        return list(session.scalars(select(OutboxEvent.payload).where(OutboxEvent.routing_key == routing_key)
                                    .order_by(OutboxEvent.id)))


# ---------------------------------------------------------------- void


def test_void_removes_what_is_left_and_consumed_credits_stay_consumed(service: CreditService,
                                                                       engine: Engine) -> None:
    grant = service.add_credits("ann", 100, now=NOW)
    service.deduct_credits("ann", 30, now=NOW)
    assert grant.lot_id is not None
    voided = service.void_lot(grant.lot_id, reason="chargeback", now=NOW)
    assert (voided.kind, voided.amount, voided.balance_after, voided.lot_id) == ("void", -70, 0, grant.lot_id)
    assert voided.metadata == {"reason": "chargeback"}
    assert lots(engine, "ann") == [0]
    assert service.get_user_credits_info("ann").total == 0
    assert [(e["lot_id"], e["amount"], e["reason"]) for e in events(engine, "credits.voided")] == [
        (grant.lot_id, 70, "chargeback")]


def test_void_of_part_and_the_same_key_returns_the_first_result(service: CreditService, engine: Engine) -> None:
    grant = service.add_credits("ann", 100, now=NOW)
    assert grant.lot_id is not None
    first = service.void_lot(grant.lot_id, reason="fraud", amount=40, idempotency_key="v-1", now=NOW)
    again = service.void_lot(grant.lot_id, reason="fraud", amount=40, idempotency_key="v-1", now=NOW)
    assert again == first and lots(engine, "ann") == [60]
    with pytest.raises(IdempotencyConflict):
        service.void_lot(grant.lot_id, reason="fraud", amount=41, idempotency_key="v-1", now=NOW)


def test_held_credits_cannot_be_voided_away(service: CreditService, engine: Engine) -> None:
    grant = service.add_credits("ann", 100, now=NOW)
    service.reserve_credits("ann", 80, now=NOW)
    assert grant.lot_id is not None
    before = snapshot(engine)
    with pytest.raises(InsufficientCredits) as refused:
        service.void_lot(grant.lot_id, reason="refund", now=NOW)  # all of it: 80 are held
    assert refused.value.details["free"] == 20
    with pytest.raises(InsufficientCredits):
        service.void_lot(grant.lot_id, reason="refund", amount=21, now=NOW)
    assert snapshot(engine) == before
    voided = service.void_lot(grant.lot_id, reason="refund", amount=20, now=NOW)
    assert (voided.balance_after, voided.reserved_after, voided.available_after) == (80, 80, 0)


def test_a_hold_past_its_ttl_no_longer_keeps_credits_from_a_void(service: CreditService) -> None:
    grant = service.add_credits("ann", 100, now=NOW)
    service.reserve_credits("ann", 80, ttl_seconds=60, now=NOW)
    assert grant.lot_id is not None
    voided = service.void_lot(grant.lot_id, reason="refund", now=NOW + timedelta(minutes=2))
    assert (voided.amount, voided.reserved_after) == (-100, 0)


def test_void_of_an_unknown_lot_or_a_spent_one_is_refused(service: CreditService, engine: Engine) -> None:
    grant = service.add_credits("ann", 10, now=NOW)
    service.deduct_credits("ann", 10, now=NOW)
    assert grant.lot_id is not None
    before = snapshot(engine)
    with pytest.raises(UnknownLot) as unknown:
        service.void_lot(grant.lot_id + 1000, reason="refund", now=NOW)
    assert unknown.value.code == "unknown_lot"
    with pytest.raises(InsufficientCredits):
        service.void_lot(grant.lot_id, reason="refund", now=NOW)
    for bad in ({"reason": ""}, {"reason": "x", "amount": 0}, {"reason": "x", "amount": -1}):
        with pytest.raises(ValidationFailed):
            service.void_lot(grant.lot_id, now=NOW, **bad)
    assert snapshot(engine) == before


# ---------------------------------------------------------------- refund


def test_refund_gives_back_to_the_lots_drawn_never_more_than_charged(service: CreditService,
                                                                     engine: Engine) -> None:
    service.add_credits("ann", 50, priority=0, now=NOW)
    service.add_credits("ann", 50, priority=1, now=NOW)
    charge = service.deduct_credits("ann", 70, now=NOW)
    assert lots(engine, "ann") == [0, 30]
    part = service.refund_deduction(charge.id, reason="failed export", amount=60, now=NOW)
    assert (part.kind, part.amount, part.balance_after) == ("refund", 60, 90)
    assert part.metadata == {"reason": "failed export", "refund_of": charge.id}
    assert lots(engine, "ann") == [50, 40]  # in the order the deduct drew them
    before = snapshot(engine)
    with pytest.raises(ValidationFailed) as too_much:
        service.refund_deduction(charge.id, reason="again", amount=11, now=NOW)
    assert too_much.value.details["refundable"] == 10
    assert snapshot(engine) == before
    rest = service.refund_deduction(charge.id, reason="again", now=NOW)
    assert rest.amount == 10 and lots(engine, "ann") == [50, 50]
    with pytest.raises(ValidationFailed):
        service.refund_deduction(charge.id, reason="third", now=NOW)
    assert [(e["entry_id"], e["amount"]) for e in events(engine, "credits.refunded")] == [
        (charge.id, 60), (charge.id, 10)]


def test_refund_of_a_commit(service: CreditService, engine: Engine) -> None:
    service.add_credits("ann", 100, now=NOW)
    hold = service.reserve_credits("ann", 40, now=NOW)
    commit = service.commit_reservation(hold.id, 30, now=NOW)
    refund = service.refund_deduction(commit.id, reason="correction", idempotency_key="r-1", now=NOW)
    assert refund.amount == 30 and lots(engine, "ann") == [100]
    assert service.refund_deduction(commit.id, reason="correction", idempotency_key="r-1", now=NOW) == refund


def test_a_lot_that_expired_meanwhile_is_reinstated_and_expires_at_once(service: CreditService,
                                                                        engine: Engine) -> None:
    service.add_credits("ann", 50, expires_at=NOW + timedelta(days=3), now=NOW)
    service.add_credits("ann", 50, now=NOW)
    charge = service.deduct_credits("ann", 70, now=NOW)  # 50 from the expiring lot, 20 from the other
    service.expire_credits(now=LATER)
    refund = service.refund_deduction(charge.id, reason="refund", now=LATER)
    assert refund.amount == 70
    assert refund.metadata is not None
    assert refund.metadata["expired_at_once"] == [{"lot_id": charge.draws[0]["lot_id"], "amount": 50}]
    expired = service.get_history("ann", limit=1)[0]
    assert (expired.kind, expired.amount, expired.idempotency_key) == ("expire", -50, refund.idempotency_key)
    assert service.get_user_credits_info("ann").total == 50 and lots(engine, "ann") == [0, 50]


def test_refund_of_what_is_not_a_deduction_or_an_unknown_entry_is_refused(service: CreditService,
                                                                           engine: Engine) -> None:
    grant = service.add_credits("ann", 10, now=NOW)
    before = snapshot(engine)
    with pytest.raises(ValidationFailed) as not_refundable:
        service.refund_deduction(grant.id, reason="x", now=NOW)
    assert not_refundable.value.details["reason"] == "not_refundable"
    with pytest.raises(UnknownEntry) as unknown:
        service.refund_deduction(grant.id + 1000, reason="x", now=NOW)
    assert unknown.value.code == "unknown_entry"
    assert snapshot(engine) == before


# ---------------------------------------------------------------- expiry


def test_extend_and_shorten_a_grant(service: CreditService, engine: Engine) -> None:
    grant = service.add_credits("ann", 100, expires_at=NOW + timedelta(days=3), now=NOW)
    assert grant.lot_id is not None
    moved = service.change_lot_expiry(grant.lot_id, NOW + timedelta(days=30), now=NOW)
    assert (moved.kind, moved.amount, moved.lot_id) == ("expiry_changed", 0, grant.lot_id)
    assert service.expire_credits(now=LATER) == 0  # no longer due on day 10
    with Session(engine) as session:
        expires_at = session.scalar(select(Lot.expires_at).where(Lot.id == grant.lot_id))
    assert expires_at == NOW + timedelta(days=30)
    assert [e["lot_id"] for e in events(engine, "credits.expiry_changed")] == [grant.lot_id]


def test_shortening_into_the_past_expires_it_now_but_not_what_a_hold_backs(service: CreditService,
                                                                           engine: Engine) -> None:
    grant = service.add_credits("ann", 100, expires_at=NOW + timedelta(days=30), now=NOW)
    hold = service.reserve_credits("ann", 30, now=NOW)
    assert grant.lot_id is not None
    service.change_lot_expiry(grant.lot_id, NOW - timedelta(days=1), now=NOW)
    assert lots(engine, "ann") == [30]
    assert [e["amount"] for e in events(engine, "credits.expired")] == [70]
    service.release_reservation(hold.id, now=NOW)
    assert service.expire_credits(now=NOW) == 1 and lots(engine, "ann") == [0]


def test_change_of_an_unknown_lot_is_refused(service: CreditService, engine: Engine) -> None:
    before = snapshot(engine)
    with pytest.raises(UnknownLot):
        service.change_lot_expiry(12345, NOW, now=NOW)
    assert snapshot(engine) == before


def test_an_id_past_the_bigint_range_is_invalid_input_not_a_database_error(service: CreditService) -> None:
    """Found by the gateway's fuzz test: such an id reached PostgreSQL and came back a 503."""
    service.add_credits("ida", 10, idempotency_key="ida-grant")
    with pytest.raises(ValidationFailed):
        service.void_lot(2**63, reason="fraud")
    with pytest.raises(ValidationFailed):
        service.refund_deduction(2**63, reason="refund")
    assert service.get_user_credits_info("ida").total == 10
