"""Corrections through the producer, a real worker, a real broker and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from creditworker.contract.errors import InsufficientCredits, UnknownEntry, UnknownLot
from tests.e2e.conftest import RunningWorker

pytestmark = pytest.mark.e2e


def test_void_refund_and_expiry_change_run_through_the_worker(worker: RunningWorker) -> None:
    client = worker.client
    grant = client.add_credits("ann", 100, expires_at=datetime.now(UTC) + timedelta(days=3)).get()
    assert grant.lot_id is not None
    charge = client.deduct_credits("ann", 40).get()
    refund = client.refund_deduction(charge.id, reason="failed export", amount=15).get()
    assert (refund.kind, refund.amount, refund.balance_after) == ("refund", 15, 75)
    later = datetime.now(UTC) + timedelta(days=30)
    moved = client.change_lot_expiry(grant.lot_id, later, idempotency_key="move-1").get()
    assert moved.kind == "expiry_changed" and moved.metadata is not None
    assert client.change_lot_expiry(grant.lot_id, later, idempotency_key="move-1").get() == moved
    voided = client.void_lot(grant.lot_id, reason="chargeback", amount=25).get()
    assert (voided.kind, voided.amount, voided.balance_after) == ("void", -25, 50)
    with pytest.raises(InsufficientCredits):
        client.void_lot(grant.lot_id, reason="chargeback", amount=51).get()
    with pytest.raises(UnknownLot):
        client.void_lot(grant.lot_id + 1000, reason="chargeback").get()
    with pytest.raises(UnknownEntry):
        client.refund_deduction(charge.id + 1000, reason="x").get()
    assert worker.service.get_user_credits_info("ann").total == 50
