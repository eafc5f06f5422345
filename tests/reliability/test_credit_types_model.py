"""Model-based test with two credit types: random adds, deducts, reservations, commits,
releases, clock moves and the stale-hold sweep on two users' `credits` and `images`.

After every step each type's stored balance, reserved credits and lots must match a plain
Python reference in which the types are separate accounts (so no draw ever crosses types),
and the audit (each type's entries sum to its balance, its lots to its balance, its active
holds to its reserved) must pass. A write on a user releases its default type's holds past
their TTL; a write that loads another type releases that type's (as `UnitOfWork` does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from creditworker import CreditService
from creditworker.contract.errors import InsufficientCredits, ReservationNotActive, UnknownUser
from creditworker.records.audit import audit
from creditworker.storage.tables import Account, Lot, TypeBalance
from tests.conftest import engine_for, wipe

USERS = ["ann", "bob"]
TYPES = ["credits", "images"]
START = datetime(2031, 3, 1, tzinfo=UTC)


@dataclass
class ModelLot:
    id: int
    remaining: int
    priority: int


@dataclass
class ModelBalance:
    """One user's totals in one type: a separate account as far as the rules go."""

    balance: int = 0
    reserved: int = 0
    lots: list[ModelLot] = field(default_factory=list)

    def draw(self, amount: int) -> None:
        for lot in sorted(self.lots, key=lambda lot: (lot.priority, lot.id)):
            taken = min(lot.remaining, amount)
            lot.remaining -= taken
            amount -= taken
        assert amount == 0


@dataclass
class ModelHold:
    id: str
    user: str
    credit_type: str
    amount: int
    expires_at: datetime
    active: bool = True


class CreditTypesMachine(RuleBasedStateMachine):
    engine: Engine
    holds = Bundle("holds")

    def __init__(self) -> None:
        super().__init__()
        wipe(self.engine)
        self.service = CreditService(self.engine)
        self.now = START
        self.users: set[str] = set()
        self.balances: dict[tuple[str, str], ModelBalance] = {}
        self.holds_by_id: dict[str, ModelHold] = {}

    def _balance(self, user: str, credit_type: str) -> ModelBalance:
        return self.balances.setdefault((user, credit_type), ModelBalance())

    def _release(self, hold: ModelHold) -> None:
        hold.active = False
        self._balance(hold.user, hold.credit_type).reserved -= hold.amount

    def _write_on(self, user: str, credit_type: str) -> None:
        """What a write on `user` in `credit_type` releases first: stale holds of the default
        type (the account is locked) and of `credit_type` (it is loaded)."""
        if user not in self.users:
            return
        for hold in self.holds_by_id.values():
            if (hold.user == user and hold.active and hold.expires_at <= self.now
                    and hold.credit_type in ("credits", credit_type)):
                self._release(hold)

    @rule(user=st.sampled_from(USERS), credit_type=st.sampled_from(TYPES), amount=st.integers(1, 50),
          priority=st.integers(0, 2))
    def add(self, user: str, credit_type: str, amount: int, priority: int) -> None:
        self._write_on(user, credit_type)
        entry = self.service.add_credits(user, amount, priority=priority, credit_type=credit_type, now=self.now)
        self.users.add(user)
        model = self._balance(user, credit_type)
        model.balance += amount
        assert entry.lot_id is not None and entry.credit_type == credit_type
        model.lots.append(ModelLot(entry.lot_id, amount, priority))
        assert entry.balance_after == model.balance

    @rule(user=st.sampled_from(USERS), credit_type=st.sampled_from(TYPES), amount=st.integers(1, 60))
    def deduct(self, user: str, credit_type: str, amount: int) -> None:
        self._write_on(user, credit_type)
        model = self._balance(user, credit_type)
        try:
            entry = self.service.deduct_credits(user, amount, credit_type=credit_type, now=self.now)
        except UnknownUser:
            assert user not in self.users
            return
        except InsufficientCredits:
            assert amount > model.balance - model.reserved
            return
        assert amount <= model.balance - model.reserved
        model.balance -= amount
        model.draw(amount)
        assert (entry.credit_type, entry.balance_after) == (credit_type, model.balance)
        drawn = {draw["lot_id"] for draw in entry.draws}
        assert drawn <= {lot.id for lot in model.lots}, "a draw crossed credit types"

    @rule(target=holds, user=st.sampled_from(USERS), credit_type=st.sampled_from(TYPES),
          amount=st.integers(1, 40), ttl_hours=st.integers(1, 24))
    def reserve(self, user: str, credit_type: str, amount: int, ttl_hours: int) -> ModelHold | None:
        self._write_on(user, credit_type)
        model = self._balance(user, credit_type)
        try:
            made = self.service.reserve_credits(user, amount, ttl_seconds=ttl_hours * 3600,
                                                credit_type=credit_type, now=self.now)
        except UnknownUser:
            assert user not in self.users
            return None
        except InsufficientCredits:
            assert amount > model.balance - model.reserved
            return None
        assert made.credit_type == credit_type
        model.reserved += amount
        hold = ModelHold(made.id, user, credit_type, amount, made.expires_at)
        self.holds_by_id[hold.id] = hold
        return hold

    @rule(hold=consumes(holds), delta=st.integers(-30, 10))
    def commit(self, hold: ModelHold | None, delta: int) -> None:
        if hold is None:
            return
        self._write_on(hold.user, hold.credit_type)
        model = self._balance(hold.user, hold.credit_type)
        charged = max(0, hold.amount + delta)
        try:
            entry = self.service.commit_reservation(hold.id, charged, now=self.now)
        except ReservationNotActive:
            assert not hold.active
            return
        except InsufficientCredits:
            assert hold.active and charged > model.balance - model.reserved + hold.amount
            return
        assert hold.active
        model.draw(charged)
        model.balance -= charged
        self._release(hold)
        assert (entry.credit_type, entry.balance_after) == (hold.credit_type, model.balance)

    @rule(hold=consumes(holds))
    def release(self, hold: ModelHold | None) -> None:
        if hold is None:
            return
        self._write_on(hold.user, hold.credit_type)
        try:
            entry = self.service.release_reservation(hold.id, now=self.now)
        except ReservationNotActive:
            assert not hold.active
            return
        assert hold.active
        self._release(hold)
        assert entry.credit_type == hold.credit_type

    @rule(hours=st.integers(1, 30))
    def advance_clock(self, hours: int) -> None:
        self.now += timedelta(hours=hours)

    @rule()
    def release_stale(self) -> None:
        stale = [hold for hold in self.holds_by_id.values() if hold.active and hold.expires_at <= self.now]
        assert self.service.release_stale_reservations(now=self.now) == len(stale)
        for hold in stale:
            self._release(hold)

    @invariant()
    def each_type_matches_the_model(self) -> None:
        with Session(self.engine) as session:
            stored = {(row.user_id, "credits"): (row.balance, row.reserved)
                      for row in session.scalars(select(Account))}
            stored.update(((row.user_id, row.credit_type), (row.balance, row.reserved))
                          for row in session.scalars(select(TypeBalance)))
            lots: dict[tuple[str, str], list[int]] = {}
            for lot in session.scalars(select(Lot).order_by(Lot.id)):
                lots.setdefault((lot.user_id, lot.credit_type), []).append(lot.remaining)
        for (user, credit_type), model in self.balances.items():
            if user not in self.users:
                continue
            assert stored.get((user, credit_type), (0, 0)) == (model.balance, model.reserved), (user, credit_type)
            assert lots.get((user, credit_type), []) == [lot.remaining for lot in model.lots], (user, credit_type)

    @invariant()
    def the_audit_passes(self) -> None:
        report = audit(self.engine)
        assert report.passed, report.problems


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
