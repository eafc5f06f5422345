"""Model-based test with two credit types: random adds (with expiries), deducts,
reservations, commits, releases, clock moves, both sweeps and the corrections (voids,
refunds, expiry changes) on two users' `credits` and `images`.

After every step each type's stored balance, reserved credits and lots must match a plain
Python reference in which the types are separate accounts (so no draw, void or refund ever
crosses types), and the audit (each type's entries sum to its balance, its lots to its
balance and stay within their grants, its active holds to its reserved, no refund above its
charge) must pass. A write on a user releases its default type's holds past their TTL; a
write that loads another type releases that type's (as `UnitOfWork` does). A deduct or
reserve that is refused still releases them; a refused correction changes nothing (its
transaction rolls back).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, rule
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from creditworker import CreditService
from creditworker.contract.errors import (
    InsufficientCredits,
    ReservationNotActive,
    UnknownUser,
    ValidationFailed,
)
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
    expires_at: datetime | None


@dataclass
class ModelBalance:
    """One user's totals in one type: a separate account as far as the rules go."""

    balance: int = 0
    reserved: int = 0
    lots: list[ModelLot] = field(default_factory=list)

    def draw(self, amount: int) -> list[dict[str, int]]:
        """Take `amount` in the draw-down order (priority, soonest expiry, no expiry last,
        age); the draws, as the entry lists them."""
        draws = []
        order = sorted((lot for lot in self.lots if lot.remaining > 0),
                       key=lambda lot: (lot.priority, lot.expires_at is None, lot.expires_at or START, lot.id))
        for lot in order:
            taken = min(lot.remaining, amount)
            if taken <= 0:
                break
            lot.remaining -= taken
            amount -= taken
            draws.append({"lot_id": lot.id, "amount": taken})
        assert amount == 0
        return draws

    def expire(self, lots: list[ModelLot], now: datetime) -> None:
        """What `rules.expire` does: take what is left of lots past their expiry, in id
        order, never the credits an active hold backs."""
        unheld = self.balance - self.reserved
        for lot in sorted(lots, key=lambda lot: lot.id):
            if lot.expires_at is None or lot.expires_at > now:
                continue
            taken = min(lot.remaining, unheld)
            if taken <= 0:
                continue
            lot.remaining -= taken
            unheld -= taken
            self.balance -= taken


@dataclass
class ModelCharge:
    """A deduction or commit, for refunds: the lots it drew and how much was given back."""

    entry_id: int
    user: str
    credit_type: str
    draws: list[dict[str, int]]
    refunded: int = 0


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
        self.charges: list[ModelCharge] = []
        self.key_counter = 0

    def _key(self) -> str:
        self.key_counter += 1
        return f"k{self.key_counter}"

    def _balance(self, user: str, credit_type: str) -> ModelBalance:
        return self.balances.setdefault((user, credit_type), ModelBalance())

    def _release(self, hold: ModelHold) -> None:
        hold.active = False
        self._balance(hold.user, hold.credit_type).reserved -= hold.amount

    def _pick_lot(self, index: int) -> tuple[str, str, ModelLot] | None:
        """One of every user's lots of every type (the lot's type decides which totals a
        correction changes)."""
        lots = sorted(((user, credit_type, lot) for (user, credit_type), model in self.balances.items()
                       for lot in model.lots), key=lambda found: found[2].id)
        return lots[index % len(lots)] if lots else None

    def _stale(self, user: str, credit_type: str) -> list[ModelHold]:
        """The holds a write on `user` in `credit_type` releases first: stale holds of the
        default type (the account is locked) and of `credit_type` (it is loaded)."""
        if user not in self.users:
            return []
        return [hold for hold in self.holds_by_id.values()
                if hold.user == user and hold.active and hold.expires_at <= self.now
                and hold.credit_type in ("credits", credit_type)]

    def _write_on(self, user: str, credit_type: str) -> None:
        for hold in self._stale(user, credit_type):
            self._release(hold)

    def _available_after_write(self, user: str, credit_type: str) -> int:
        """What a correction in `credit_type` sees as available once stale holds are released
        (without releasing them in the model: a refused correction rolls that back too)."""
        model = self._balance(user, credit_type)
        freed = sum(hold.amount for hold in self._stale(user, credit_type) if hold.credit_type == credit_type)
        return model.balance - model.reserved + freed

    @initialize(target=holds, credits=st.integers(1, 50), images=st.integers(1, 50),
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
        self._write_on(user, credit_type)
        expires_at = None if expires_in_hours is None else self.now + timedelta(hours=expires_in_hours)
        entry = self.service.add_credits(user, amount, priority=priority, expires_at=expires_at,
                                         credit_type=credit_type, now=self.now)
        self.users.add(user)
        model = self._balance(user, credit_type)
        model.balance += amount
        assert entry.lot_id is not None and entry.credit_type == credit_type
        model.lots.append(ModelLot(entry.lot_id, amount, priority, expires_at))
        assert entry.balance_after == model.balance

    @rule(user=st.sampled_from(USERS), credit_type=st.sampled_from(TYPES), amount=st.integers(1, 30))
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
        draws = model.draw(amount)
        assert (entry.credit_type, entry.balance_after) == (credit_type, model.balance)
        assert [{"lot_id": draw["lot_id"], "amount": draw["amount"]} for draw in entry.draws] == draws
        self.charges.append(ModelCharge(entry.id, user, credit_type, draws))

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
        draws = model.draw(charged)
        model.balance -= charged
        self._release(hold)
        assert (entry.credit_type, entry.balance_after) == (hold.credit_type, model.balance)
        assert [{"lot_id": draw["lot_id"], "amount": draw["amount"]} for draw in entry.draws] == draws
        self.charges.append(ModelCharge(entry.id, hold.user, hold.credit_type, draws))

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

    @rule()
    def expire(self) -> None:
        self.service.expire_credits(now=self.now)
        for model in self.balances.values():
            model.expire(model.lots, self.now)

    @rule(index=st.integers(0, 40), amount=st.none() | st.integers(1, 40))
    def void(self, index: int, amount: int | None) -> None:
        picked = self._pick_lot(index)
        if picked is None:
            return
        user, credit_type, lot = picked
        model = self._balance(user, credit_type)
        wanted = lot.remaining if amount is None else amount
        free = min(lot.remaining, max(0, self._available_after_write(user, credit_type)))
        try:
            entry = self.service.void_lot(lot.id, amount=amount, reason="fraud", idempotency_key=self._key(),
                                          now=self.now)
        except InsufficientCredits:
            assert wanted <= 0 or wanted > free
            return
        assert 0 < wanted <= free
        self._write_on(user, credit_type)
        lot.remaining -= wanted
        model.balance -= wanted
        assert (entry.credit_type, entry.amount, entry.balance_after) == (credit_type, -wanted, model.balance)

    @rule(index=st.integers(0, 40), amount=st.none() | st.integers(1, 10))
    def refund(self, index: int, amount: int | None) -> None:
        if not self.charges:
            return
        charge = self.charges[index % len(self.charges)]
        model = self._balance(charge.user, charge.credit_type)
        refundable = sum(draw["amount"] for draw in charge.draws) - charge.refunded
        wanted = refundable if amount is None else amount
        try:
            entry = self.service.refund_deduction(charge.entry_id, amount=amount, reason="refund",
                                                  idempotency_key=self._key(), now=self.now)
        except ValidationFailed:
            assert wanted <= 0 or wanted > refundable
            return
        assert 0 < wanted <= refundable
        self._write_on(charge.user, charge.credit_type)
        skip, left = charge.refunded, wanted
        charge.refunded += wanted
        model.balance += wanted
        lots = {lot.id: lot for lot in model.lots}
        for draw in charge.draws:  # back to the lots in the order drawn, past what was given back
            room = draw["amount"] - min(skip, draw["amount"])
            skip -= draw["amount"] - room
            given = min(room, left)
            left -= given
            if given <= 0:
                continue
            lot = lots[draw["lot_id"]]  # a KeyError here: a refund crossed credit types
            if lot.expires_at is not None and lot.expires_at <= self.now:  # reinstated, expired at once
                model.balance -= given
            else:
                lot.remaining += given
        assert (entry.credit_type, entry.amount) == (charge.credit_type, wanted)

    @rule(index=st.integers(0, 40), hours=st.integers(-12, 72))
    def change_expiry(self, index: int, hours: int) -> None:
        picked = self._pick_lot(index)
        if picked is None:
            return
        user, credit_type, lot = picked
        model = self._balance(user, credit_type)
        expires_at = self.now + timedelta(hours=hours)
        entry = self.service.change_lot_expiry(lot.id, expires_at, idempotency_key=self._key(), now=self.now)
        self._write_on(user, credit_type)
        lot.expires_at = expires_at
        model.expire([lot], self.now)  # a moment already past expires what is left now
        assert entry.credit_type == credit_type

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
