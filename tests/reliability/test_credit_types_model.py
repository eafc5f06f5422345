"""Model-based test with two credit types: random adds (with expiries), deducts,
reservations, commits, releases, clock moves, both sweeps and the corrections (voids,
refunds, expiry changes) on two users' `credits` and `images`, against the reference model
(`reference_model`), in which the types are separate accounts: no draw, void or refund ever
crosses types.

After every step each type's stored balance, reserved credits, history length and lots must
match the model, and the audit must pass. What a write releases first (stale holds of the
default type and of the type it loads) and what a refusal leaves are the model's rules.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import consumes, initialize, rule
from sqlalchemy.engine import Engine

from tests.conftest import engine_for
from tests.reliability.reference_model import USERS, ModelHold, ModelMachine

TYPES = ["credits", "images"]


class CreditTypesMachine(ModelMachine):
    """The model with two types: every operation picks one, a correction follows its lot's."""

    @initialize(target=ModelMachine.holds, credits=st.integers(1, 50), images=st.integers(1, 50),
                expires_in_hours=st.integers(1, 48), held=st.integers(1, 20), held_type=st.sampled_from(TYPES))
    def ann_holds_both_types(self, credits: int, images: int, expires_in_hours: int, held: int,
                             held_type: str) -> ModelHold | None:
        """Ann starts with a grant of each type, one expiring, and a hold on one of them, so
        that most steps find something to draw, void, refund or expire, and a void can meet
        held credits; bob starts unknown."""
        self.add("ann", "credits", credits, 1, expires_in_hours)
        self.add("ann", "images", images, 1, None)
        return self.reserve("ann", held_type, held, 12)

    @rule(user=st.sampled_from(USERS), credit_type=st.sampled_from(TYPES), amount=st.integers(1, 50),
          priority=st.integers(0, 2), expires_in_hours=st.none() | st.integers(1, 72))
    def add(self, user: str, credit_type: str, amount: int, priority: int, expires_in_hours: int | None) -> None:
        now = self.model.now
        expires_at = None if expires_in_hours is None else now + timedelta(hours=expires_in_hours)
        self.model.add(user, credit_type, amount, priority, expires_at, lambda: self.service.add_credits(
            user, amount, priority=priority, expires_at=expires_at, credit_type=credit_type, now=now))

    @rule(user=st.sampled_from(USERS), credit_type=st.sampled_from(TYPES), amount=st.integers(1, 30))
    def deduct(self, user: str, credit_type: str, amount: int) -> None:
        self.model.deduct(user, credit_type, amount, lambda: self.service.deduct_credits(
            user, amount, credit_type=credit_type, now=self.model.now))

    @rule(target=ModelMachine.holds, user=st.sampled_from(USERS), credit_type=st.sampled_from(TYPES),
          amount=st.integers(1, 40), ttl_hours=st.integers(1, 24))
    def reserve(self, user: str, credit_type: str, amount: int, ttl_hours: int) -> ModelHold | None:
        return self.model.reserve(user, credit_type, amount, timedelta(hours=ttl_hours),
                                  lambda: self.service.reserve_credits(
                                      user, amount, ttl_seconds=ttl_hours * 3600, credit_type=credit_type,
                                      now=self.model.now))

    @rule(hold=consumes(ModelMachine.holds), delta=st.integers(-30, 10))
    def commit(self, hold: ModelHold | None, delta: int) -> None:
        if hold is None:
            return
        charged = max(0, hold.amount + delta)
        self.model.commit(hold, charged, lambda: self.service.commit_reservation(
            hold.id, charged, now=self.model.now))

    @rule(index=st.integers(0, 40), amount=st.none() | st.integers(1, 40))
    def void(self, index: int, amount: int | None) -> None:
        """Of any user's lot of any type."""
        self.void_one(index, amount)

    @rule(index=st.integers(0, 40), amount=st.none() | st.integers(1, 10))
    def refund(self, index: int, amount: int | None) -> None:
        self.refund_one(index, amount)

    @rule(index=st.integers(0, 40), hours=st.integers(-12, 72))
    def change_expiry(self, index: int, hours: int) -> None:
        """Of any user's lot of any type."""
        self.change_expiry_of_one(index, hours)


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
def test_credit_types_match_the_reference_model(
    dialect: str, request: pytest.FixtureRequest, migrated_engines: dict[str, Engine]
) -> None:
    url: str = request.getfixturevalue(f"{dialect}_url")

    class Machine(CreditTypesMachine):
        pass

    Machine.engine = engine_for(url, migrated_engines)
    Machine.TestCase.settings = settings(
        max_examples=25, stateful_step_count=30, deadline=None,  # the suite's time budget
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    Machine.TestCase().runTest()
