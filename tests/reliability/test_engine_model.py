"""Model-based test: random sequences of every engine operation against a simple reference.

Hypothesis drives adds (with expiries and priorities), deducts, reservations, commits
(below, at and above the hold), releases, clock moves, both sweeps, replays of a used key,
conflicting reuse of a key, and the corrections: voids (all or part of a lot), refunds (all
or part of a deduction or commit, also of lots expired since) and expiry changes (into the
future or the past). After every step each balance, hold and history length
must match the reference model, and the ledger invariants must hold in SQL. Every credit
operation on an account first releases that account's holds past their TTL (each with its
entry), whatever the operation's own outcome: the model does the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from creditworker import CreditService
from creditworker.contract.errors import (
    IdempotencyConflict,
    InsufficientCredits,
    ReservationNotActive,
    UnknownUser,
    ValidationFailed,
)
from creditworker.records.audit import audit
from creditworker.storage.tables import Account, Entry, Lot
from tests.conftest import engine_for, wipe

USERS = ["ann", "bob"]
START = datetime(2031, 3, 1, tzinfo=UTC)


@dataclass
class ModelLot:
    id: int
    remaining: int
    priority: int
    expires_at: datetime | None


@dataclass
class ModelAccount:
    balance: int = 0
    reserved: int = 0
    entries: int = 0
    lots: list[ModelLot] = field(default_factory=list)

    @property
    def available(self) -> int:
        return self.balance - self.reserved

    def draw(self, amount: int) -> list[dict[str, int]]:
        """Take `amount` in the draw-down order; the draws, as the entry lists them."""
        draws = []
        order = sorted(
            (lot for lot in self.lots if lot.remaining > 0),
            key=lambda lot: (
                lot.priority,
                lot.expires_at is None,
                lot.expires_at or START,
                lot.id,
            ),
        )
        for lot in order:
            taken = min(lot.remaining, amount)
            if taken <= 0:
                break
            lot.remaining -= taken
            amount -= taken
            draws.append({"lot_id": lot.id, "amount": taken})
        return draws

    def lot(self, index: int) -> ModelLot | None:
        return self.lots[index % len(self.lots)] if self.lots else None


@dataclass
class ModelCharge:
    """A deduction or commit, for refunds: the lots it drew and how much was given back."""

    entry_id: int
    user: str
    draws: list[dict[str, int]]
    refunded: int = 0


@dataclass
class ModelHold:
    id: str
    user: str
    amount: int
    expires_at: datetime
    active: bool = True


class EngineMachine(RuleBasedStateMachine):
    engine: Engine

    holds = Bundle("holds")
    used_keys = Bundle("used_keys")

    def __init__(self) -> None:
        super().__init__()
        wipe(self.engine)
        self.service = CreditService(self.engine)
        self.now = START
        self.accounts: dict[str, ModelAccount] = {}
        self.key_counter = 0
        self.holds_by_id: dict[str, ModelHold] = {}
        self.charges: list[ModelCharge] = []

    def _key(self) -> str:
        self.key_counter += 1
        return f"k{self.key_counter}"

    def _account(self, user: str) -> ModelAccount:
        return self.accounts.setdefault(user, ModelAccount())

    def _expire_stale(self, user: str) -> None:
        """What a write on `user`'s account does first: release its holds past their TTL."""
        account = self.accounts.get(user)
        for hold in self.holds_by_id.values():
            if account is not None and hold.user == user and hold.active and hold.expires_at <= self.now:
                hold.active = False
                account.reserved -= hold.amount
                account.entries += 1

    @initialize()
    def start(self) -> None:
        pass

    @rule(
        target=used_keys,
        user=st.sampled_from(USERS),
        amount=st.integers(1, 60),
        expires_in_hours=st.none() | st.integers(1, 72),
        priority=st.none() | st.integers(0, 2),
    )
    def add(
        self, user: str, amount: int, expires_in_hours: int | None, priority: int | None
    ) -> tuple[str, dict[str, Any]]:
        key = self._key()
        expires_at = None if expires_in_hours is None else self.now + timedelta(hours=expires_in_hours)
        request = {"amount": amount, "expires_at": expires_at, "priority": priority}
        self._expire_stale(user)
        entry = self.service.add_credits(
            user, amount, expires_at=expires_at, priority=priority, idempotency_key=key, now=self.now
        )
        account = self._account(user)
        debt = max(0, -account.balance)
        account.balance += amount
        account.entries += 1
        assert entry.lot_id is not None
        account.lots.append(
            ModelLot(entry.lot_id, amount - min(debt, amount), priority or 0, expires_at)
        )
        assert entry.balance_after == account.balance
        return key, {"op": "add", "user": user, **request}

    @rule(user=st.sampled_from(USERS), amount=st.integers(1, 80))
    def deduct(self, user: str, amount: int) -> None:
        account = self.accounts.get(user)
        self._expire_stale(user)
        try:
            entry = self.service.deduct_credits(user, amount, idempotency_key=self._key(), now=self.now)
        except UnknownUser:
            assert account is None
            return
        except InsufficientCredits:
            assert account is not None and amount > account.available
            return
        assert account is not None and amount <= account.available
        account.balance -= amount
        account.entries += 1
        draws = account.draw(amount)
        assert entry.balance_after == account.balance and entry.draws == draws
        self.charges.append(ModelCharge(entry.id, user, draws))

    @rule(
        target=holds,
        user=st.sampled_from(USERS),
        amount=st.integers(1, 40),
        ttl_hours=st.integers(1, 24),
    )
    def reserve(self, user: str, amount: int, ttl_hours: int) -> ModelHold | None:
        account = self.accounts.get(user)
        self._expire_stale(user)
        try:
            hold = self.service.reserve_credits(
                user, amount, ttl_seconds=ttl_hours * 3600, idempotency_key=self._key(), now=self.now
            )
        except UnknownUser:
            assert account is None
            return None
        except InsufficientCredits:
            assert account is not None and amount > account.available
            return None
        assert account is not None and amount <= account.available
        account.reserved += amount
        account.entries += 1
        model_hold = ModelHold(hold.id, user, amount, self.now + timedelta(hours=ttl_hours))
        self.holds_by_id[hold.id] = model_hold
        return model_hold

    @rule(hold=consumes(holds), delta=st.integers(-40, 20), use_held=st.booleans())
    def commit(self, hold: ModelHold | None, delta: int, use_held: bool) -> None:
        if hold is None:
            return
        charged = hold.amount if use_held else max(0, hold.amount + delta)
        account = self.accounts[hold.user]
        expired_before = not hold.active
        self._expire_stale(hold.user)
        try:
            entry = self.service.commit_reservation(
                hold.id, None if use_held else charged, idempotency_key=self._key(), now=self.now
            )
        except ReservationNotActive:
            assert expired_before or hold.expires_at <= self.now
            return
        except InsufficientCredits:
            assert charged > account.available + hold.amount
            return
        assert hold.active and hold.expires_at > self.now
        hold.active = False
        account.reserved -= hold.amount
        account.balance -= charged
        account.entries += 1
        draws = account.draw(charged)
        assert entry.draws == draws
        self.charges.append(ModelCharge(entry.id, hold.user, draws))

    @rule(hold=consumes(holds))
    def release(self, hold: ModelHold | None) -> None:
        if hold is None:
            return
        expired_before = not hold.active
        self._expire_stale(hold.user)
        try:
            self.service.release_reservation(hold.id, idempotency_key=self._key(), now=self.now)
        except ReservationNotActive:
            assert expired_before or hold.expires_at <= self.now
            return
        hold.active = False
        account = self.accounts[hold.user]
        account.reserved -= hold.amount
        account.entries += 1

    @rule(hours=st.integers(1, 30))
    def advance_clock(self, hours: int) -> None:
        self.now += timedelta(hours=hours)

    @rule()
    def release_stale(self) -> None:
        self.service.release_stale_reservations(now=self.now)
        for hold in self.holds_by_id.values():
            if hold.active and hold.expires_at <= self.now:
                hold.active = False
                account = self.accounts[hold.user]
                account.reserved -= hold.amount
                account.entries += 1

    @rule()
    def expire(self) -> None:
        self.service.expire_credits(now=self.now)
        for account in self.accounts.values():
            unheld = account.available
            for lot in sorted(account.lots, key=lambda lot: lot.id):
                if lot.expires_at is None or lot.expires_at > self.now or lot.remaining <= 0:
                    continue
                taken = min(lot.remaining, unheld)
                if taken <= 0:
                    continue
                lot.remaining -= taken
                unheld -= taken
                account.balance -= taken
                account.entries += 1

    @rule(user=st.sampled_from(USERS), index=st.integers(0, 20), amount=st.none() | st.integers(1, 60))
    def void(self, user: str, index: int, amount: int | None) -> None:
        account = self.accounts.get(user)
        lot = account.lot(index) if account is not None else None
        if account is None or lot is None:
            return
        self._expire_stale(user)
        wanted = lot.remaining if amount is None else amount
        try:
            entry = self.service.void_lot(lot.id, amount=amount, reason="fraud", idempotency_key=self._key(),
                                          now=self.now)
        except InsufficientCredits:
            assert wanted <= 0 or wanted > min(lot.remaining, max(0, account.available))
            return
        assert 0 < wanted <= min(lot.remaining, account.available)
        lot.remaining -= wanted
        account.balance -= wanted
        account.entries += 1
        assert entry.balance_after == account.balance

    @rule(index=st.integers(0, 20), amount=st.none() | st.integers(1, 60))
    def refund(self, index: int, amount: int | None) -> None:
        if not self.charges:
            return
        charge = self.charges[index % len(self.charges)]
        account = self.accounts[charge.user]
        self._expire_stale(charge.user)
        refundable = sum(draw["amount"] for draw in charge.draws) - charge.refunded
        wanted = refundable if amount is None else amount
        try:
            entry = self.service.refund_deduction(charge.entry_id, amount=amount, reason="refund",
                                                  idempotency_key=self._key(), now=self.now)
        except ValidationFailed:
            assert wanted <= 0 or wanted > refundable
            return
        assert 0 < wanted <= refundable
        skip, left = charge.refunded, wanted
        charge.refunded += wanted
        account.balance += wanted
        account.entries += 1
        lots = {lot.id: lot for lot in account.lots}
        for draw in charge.draws:
            room = draw["amount"] - min(skip, draw["amount"])
            skip -= draw["amount"] - room
            given = min(room, left)
            left -= given
            if given <= 0:
                continue
            lot = lots[draw["lot_id"]]
            if lot.expires_at is not None and lot.expires_at <= self.now:  # reinstated, expired at once
                account.balance -= given
                account.entries += 1
            else:
                lot.remaining += given
        assert entry.amount == wanted

    @rule(user=st.sampled_from(USERS), index=st.integers(0, 20), hours=st.integers(-48, 72))
    def change_expiry(self, user: str, index: int, hours: int) -> None:
        account = self.accounts.get(user)
        lot = account.lot(index) if account is not None else None
        if account is None or lot is None:
            return
        self._expire_stale(user)
        expires_at = self.now + timedelta(hours=hours)
        self.service.change_lot_expiry(lot.id, expires_at, idempotency_key=self._key(), now=self.now)
        lot.expires_at = expires_at
        account.entries += 1
        if expires_at <= self.now:
            taken = min(lot.remaining, max(0, account.available))
            if taken > 0:
                lot.remaining -= taken
                account.balance -= taken
                account.entries += 1

    @rule(used=used_keys)
    def replay_is_a_no_op(self, used: tuple[str, dict[str, Any]]) -> None:
        key, request = used
        self._expire_stale(request["user"])
        entry = self.service.add_credits(
            request["user"], request["amount"], expires_at=request["expires_at"],
            priority=request["priority"], idempotency_key=key, now=self.now,
        )
        assert entry.idempotency_key == key

    @rule(used=used_keys)
    def conflicting_reuse_is_refused(self, used: tuple[str, dict[str, Any]]) -> None:
        key, request = used
        self._expire_stale(request["user"])
        with pytest.raises(IdempotencyConflict):
            self.service.deduct_credits(request["user"], 1, idempotency_key=key, now=self.now)

    @invariant()
    def balances_match_the_model(self) -> None:
        with Session(self.engine) as session:
            stored = {
                row.user_id: (row.balance, row.reserved)
                for row in session.scalars(select(Account))
            }
            entry_counts = dict(
                session.execute(select(Entry.user_id, func.count()).group_by(Entry.user_id)).all()
            )
            sums = dict(
                session.execute(
                    select(Entry.user_id, func.sum(Entry.amount)).group_by(Entry.user_id)
                ).all()
            )
            lot_sums = dict(
                session.execute(
                    select(Lot.user_id, func.sum(Lot.remaining)).group_by(Lot.user_id)
                ).all()
            )
        assert set(stored) == set(self.accounts)
        for user, account in self.accounts.items():
            assert stored[user] == (account.balance, account.reserved), user
            assert entry_counts.get(user, 0) == account.entries, user
            assert int(sums.get(user) or 0) == account.balance
            assert int(lot_sums.get(user) or 0) == max(account.balance, 0)
            assert account.balance >= account.reserved >= 0
            assert [lot.remaining for lot in account.lots] == self._stored_lots(user)

    @invariant()
    def the_audit_passes(self) -> None:
        report = audit(self.engine)
        assert report.passed, report.problems

    def _stored_lots(self, user: str) -> list[int]:
        with Session(self.engine) as session:
            return list(
                session.scalars(select(Lot.remaining).where(Lot.user_id == user).order_by(Lot.id))
            )


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
