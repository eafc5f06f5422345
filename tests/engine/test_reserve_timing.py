"""A reservation's TTL runs from when the caller asked, and nothing is held after its
caller's deadline: a late reserve changes nothing, and a retry with its key stays safe."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from creditworker import CreditService
from creditworker.contract.errors import ValidationFailed
from creditworker.records.audit import audit
from creditworker.storage.tables import Hold


@pytest.fixture(autouse=True)
def invariants_hold_afterwards(engine: Engine) -> object:
    yield
    assert audit(engine).passed


def holds(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.scalar(select(func.count()).select_from(Hold)) or 0)


def test_the_ttl_runs_from_when_the_caller_asked(service: CreditService) -> None:
    service.add_credits("ann", 100)
    now = datetime.now(UTC)
    hold = service.reserve_credits("ann", 10, ttl_seconds=300, requested_at=now - timedelta(seconds=120), now=now)
    assert hold.expires_at == now + timedelta(seconds=180)
    assert hold.created_at == now


def test_a_producer_clock_running_ahead_cannot_lengthen_a_hold(service: CreditService) -> None:
    service.add_credits("ben", 100)
    now = datetime.now(UTC)
    hold = service.reserve_credits("ben", 10, ttl_seconds=300, requested_at=now + timedelta(hours=1), now=now)
    assert hold.expires_at == now + timedelta(seconds=300)


def test_a_reserve_that_arrives_after_its_ttl_holds_nothing(service: CreditService, engine: Engine) -> None:
    service.add_credits("cat", 100)
    now = datetime.now(UTC)
    with pytest.raises(ValidationFailed) as refused:
        service.reserve_credits("cat", 10, ttl_seconds=60, requested_at=now - timedelta(seconds=61), now=now)
    assert refused.value.details["applied"] is False
    assert holds(engine) == 0
    assert service.get_user_credits_info("cat").available == 100


def test_a_reserve_past_its_callers_deadline_is_not_applied_and_its_key_stays_usable(
    service: CreditService, engine: Engine,
) -> None:
    service.add_credits("dan", 100)
    now = datetime.now(UTC)
    with pytest.raises(ValidationFailed) as refused:
        service.reserve_credits("dan", 10, deadline=now - timedelta(seconds=1), idempotency_key="dan-1")
    assert refused.value.details["applied"] is False
    assert holds(engine) == 0
    hold = service.reserve_credits("dan", 10, requested_at=now, idempotency_key="dan-1")
    # a later retry of the applied reservation (another time asked, a passed deadline)
    # is the same request: it returns the hold and holds nothing more
    again = service.reserve_credits("dan", 10, requested_at=now + timedelta(seconds=5),
                                    deadline=now - timedelta(seconds=1), idempotency_key="dan-1")
    assert again == hold
    assert service.get_user_credits_info("dan").reserved == 10


def test_in_a_batch_a_late_reserve_fails_alone(service: CreditService, engine: Engine) -> None:
    service.add_credits("eve", 100)
    late = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    outcomes = service.apply_batch([
        {"op": "reserve", "user_id": "eve", "amount": 5, "deadline": late},
        {"op": "reserve", "user_id": "eve", "amount": 7},
    ])
    assert outcomes[0].error is not None and outcomes[0].error["code"] == "invalid_input"
    assert outcomes[0].error["details"]["applied"] is False
    assert outcomes[1].ok
    assert holds(engine) == 1
