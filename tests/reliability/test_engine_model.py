"""Model-based test: random sequences of every engine operation on the default credit type
against the reference model (`reference_model`, here with one type).

Hypothesis drives adds (with expiries and priorities), deducts, reservations, commits
(below, at and above the hold), releases, clock moves, both sweeps, replays of a used key,
conflicting reuse of a key, and the corrections: voids (all or part of a lot), refunds (all
or part of a deduction or commit, also of lots expired since) and expiry changes (into the
future or the past). Every operation carries an idempotency key. After every step each
balance, hold, history length and lot must match the model, and the audit must pass.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, consumes, rule
from sqlalchemy.engine import Engine

from creditworker.contract.credits import DEFAULT_CREDIT_TYPE as CREDITS
from creditworker.contract.errors import IdempotencyConflict
from tests.conftest import engine_for
from tests.reliability.reference_model import USERS, ModelHold, ModelMachine

Used = tuple[str, dict[str, Any]]
"""An add's idempotency key and its request, to replay or to reuse for something else."""


class EngineMachine(ModelMachine):
    """The model with the default type only, and every key kept: replays and key reuse."""

    used_keys = Bundle("used_keys")

    @rule(target=used_keys, user=st.sampled_from(USERS), amount=st.integers(1, 60),
          expires_in_hours=st.none() | st.integers(1, 72), priority=st.none() | st.integers(0, 2))
    def add(self, user: str, amount: int, expires_in_hours: int | None, priority: int | None) -> Used:
        key, now = self._key(), self.model.now
        expires_at = None if expires_in_hours is None else now + timedelta(hours=expires_in_hours)
        self.model.add(user, CREDITS, amount, priority, expires_at, lambda: self.service.add_credits(
            user, amount, expires_at=expires_at, priority=priority, idempotency_key=key, now=now))
        return key, {"user": user, "amount": amount, "expires_at": expires_at, "priority": priority}

    @rule(user=st.sampled_from(USERS), amount=st.integers(1, 80))
    def deduct(self, user: str, amount: int) -> None:
        self.model.deduct(user, CREDITS, amount, lambda: self.service.deduct_credits(
            user, amount, idempotency_key=self._key(), now=self.model.now))

    @rule(target=ModelMachine.holds, user=st.sampled_from(USERS), amount=st.integers(1, 40),
          ttl_hours=st.integers(1, 24))
    def reserve(self, user: str, amount: int, ttl_hours: int) -> ModelHold | None:
        return self.model.reserve(user, CREDITS, amount, timedelta(hours=ttl_hours),
                                  lambda: self.service.reserve_credits(
                                      user, amount, ttl_seconds=ttl_hours * 3600, idempotency_key=self._key(),
                                      now=self.model.now))

    @rule(hold=consumes(ModelMachine.holds), delta=st.integers(-40, 20), use_held=st.booleans())
    def commit(self, hold: ModelHold | None, delta: int, use_held: bool) -> None:
        """`use_held`: commit without an amount, which charges what is held."""
        if hold is None:
            return
        charged = hold.amount if use_held else max(0, hold.amount + delta)
        self.model.commit(hold, charged, lambda: self.service.commit_reservation(
            hold.id, None if use_held else charged, idempotency_key=self._key(), now=self.model.now))

    @rule(user=st.sampled_from(USERS), index=st.integers(0, 20), amount=st.none() | st.integers(1, 60))
    def void(self, user: str, index: int, amount: int | None) -> None:
        """Of one of `user`'s lots."""
        self.void_one(index, amount, user)

    @rule(index=st.integers(0, 20), amount=st.none() | st.integers(1, 60))
    def refund(self, index: int, amount: int | None) -> None:
        self.refund_one(index, amount)

    @rule(user=st.sampled_from(USERS), index=st.integers(0, 20), hours=st.integers(-48, 72))
    def change_expiry(self, user: str, index: int, hours: int) -> None:
        """Of one of `user`'s lots."""
        self.change_expiry_of_one(index, hours, user)

    @rule(used=used_keys)
    def replay_is_a_no_op(self, used: Used) -> None:
        """The same add again under its key: the stored entry, and nothing changes (but the
        write releases stale holds first, like any other)."""
        key, request = used
        self.model.write_on(request["user"], CREDITS)
        entry = self.service.add_credits(
            request["user"], request["amount"], expires_at=request["expires_at"],
            priority=request["priority"], idempotency_key=key, now=self.model.now,
        )
        assert entry.idempotency_key == key

    @rule(used=used_keys)
    def conflicting_reuse_is_refused(self, used: Used) -> None:
        key, request = used
        self.model.write_on(request["user"], CREDITS)
        with pytest.raises(IdempotencyConflict):
            self.service.deduct_credits(request["user"], 1, idempotency_key=key, now=self.model.now)


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
def test_engine_matches_reference_model(
    dialect: str, request: pytest.FixtureRequest, migrated_engines: dict[str, Engine]
) -> None:
    url: str = request.getfixturevalue(f"{dialect}_url")
    engine = engine_for(url, migrated_engines)

    class Machine(EngineMachine):
        pass

    Machine.engine = engine
    Machine.TestCase.settings = settings(
        max_examples=35,  # the suite's time budget
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    Machine.TestCase().runTest()
