"""The one reference model of the credit engine that the stateful tests hold it to.

Each user's totals in each credit type are a separate account as far as the rules go: no
draw, void or refund ever crosses types, so a machine with one type runs the same model with
one type. Each operation method takes the engine's call, says how it must answer (the typed
refusal, or the entry it writes), runs it, and makes the change the engine should have made;
`check_store` then compares each type's stored totals, entries and lots with the model.

Stale holds: a write on a user releases its default type's holds past their TTL (the account
is locked) and those of the type it loads (as `UnitOfWork` does), each with an entry. A credit
operation that is refused (deduct, reserve, commit, release, a reused key) keeps those
releases: a batch commits its refusals. A refused correction (void, refund) changes nothing:
its transaction rolls back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from creditworker import CreditService
from creditworker.contract.credits import DEFAULT_CREDIT_TYPE, LedgerEntry, Reservation
from creditworker.contract.errors import (
    CreditError,
    InsufficientCredits,
    ReservationNotActive,
    UnknownUser,
    ValidationFailed,
)
from creditworker.records.audit import audit
from creditworker.storage.tables import Account, Entry, Lot, TypeBalance
from tests.conftest import wipe

USERS = ["ann", "bob"]
START = datetime(2031, 3, 1, tzinfo=UTC)

T = TypeVar("T")
Key = tuple[str, str]
"""(user, credit type): one separate account of the model."""


def outcome(refusal: type[CreditError] | None, call: Callable[[], T]) -> T | None:
    """Run the engine's `call`: it must refuse with exactly `refusal` (then None), or, where
    the model expects no refusal, succeed (its result)."""
    try:
        result = call()
    except CreditError as error:
        assert type(error) is refusal, f"the engine refused with {error!r}, the model expected {refusal}"
        return None
    assert refusal is None, f"the engine did what the model expected it to refuse with {refusal.__name__}"
    return result


@dataclass
class ModelLot:
    id: int
    remaining: int
    priority: int
    expires_at: datetime | None


@dataclass
class ModelBalance:
    """One user's totals in one type, with its history length (entries)."""

    balance: int = 0
    reserved: int = 0
    entries: int = 0
    lots: list[ModelLot] = field(default_factory=list)

    @property
    def available(self) -> int:
        return self.balance - self.reserved

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

    def expire(self, lots: list[ModelLot], now: datetime) -> int:
        """What `rules.expire` does: take what is left of lots past their expiry, in id order,
        never the credits an active hold backs, an entry per lot; how many entries."""
        unheld, written = self.available, 0
        for lot in sorted(lots, key=lambda lot: lot.id):
            if lot.expires_at is None or lot.expires_at > now:
                continue
            taken = min(lot.remaining, unheld)
            if taken <= 0:
                continue
            lot.remaining -= taken
            unheld -= taken
            self.balance -= taken
            self.entries += 1
            written += 1
        return written


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


class ReferenceModel:
    """What the engine should do to every (user, credit type), and when it must refuse."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self.users: set[str] = set()
        self.balances: dict[Key, ModelBalance] = {}
        self.holds: dict[str, ModelHold] = {}
        self.charges: list[ModelCharge] = []

    def totals(self, user: str, credit_type: str) -> ModelBalance:
        return self.balances.setdefault((user, credit_type), ModelBalance())

    def lots(self, user: str | None = None) -> list[tuple[str, str, ModelLot]]:
        """Every lot (of `user`, if given) in id order, with its owner and type: the lot's type
        decides which totals a correction changes."""
        return sorted(((owner, credit_type, lot) for (owner, credit_type), model in self.balances.items()
                       for lot in model.lots if user in (None, owner)), key=lambda found: found[2].id)

    def _stale(self, user: str, credit_type: str) -> list[ModelHold]:
        """The holds a write on `user` in `credit_type` releases first: stale holds of the
        default type (the account is locked) and of `credit_type` (it is loaded)."""
        if user not in self.users:
            return []
        return [hold for hold in self.holds.values()
                if hold.user == user and hold.active and hold.expires_at <= self.now
                and hold.credit_type in (DEFAULT_CREDIT_TYPE, credit_type)]

    def _free(self, hold: ModelHold) -> None:
        hold.active = False
        self.totals(hold.user, hold.credit_type).reserved -= hold.amount

    def _release(self, hold: ModelHold) -> None:
        """A release of its own (not a commit): an entry."""
        self._free(hold)
        self.totals(hold.user, hold.credit_type).entries += 1

    def write_on(self, user: str, credit_type: str) -> None:
        for hold in self._stale(user, credit_type):
            self._release(hold)

    def _refusal(self, user: str, short: bool) -> type[CreditError] | None:
        return UnknownUser if user not in self.users else InsufficientCredits if short else None

    def add(self, user: str, credit_type: str, amount: int, priority: int | None, expires_at: datetime | None,
            call: Callable[[], LedgerEntry]) -> LedgerEntry:
        """A grant (priority None: the default 0) opens the account; it pays off a debt first."""
        self.write_on(user, credit_type)
        entry = call()
        self.users.add(user)
        model = self.totals(user, credit_type)
        debt = max(0, -model.balance)
        model.balance += amount
        model.entries += 1
        assert entry.lot_id is not None
        model.lots.append(ModelLot(entry.lot_id, amount - min(debt, amount), priority or 0, expires_at))
        assert (entry.credit_type, entry.balance_after) == (credit_type, model.balance)
        return entry

    def deduct(self, user: str, credit_type: str, amount: int, call: Callable[[], LedgerEntry]) -> None:
        self.write_on(user, credit_type)
        model = self.totals(user, credit_type)
        entry = outcome(self._refusal(user, amount > model.available), call)
        if entry is None:
            return
        model.balance -= amount
        model.entries += 1
        draws = model.draw(amount)
        assert (entry.credit_type, entry.balance_after, entry.draws) == (credit_type, model.balance, draws)
        self.charges.append(ModelCharge(entry.id, user, credit_type, draws))

    def reserve(self, user: str, credit_type: str, amount: int, ttl: timedelta,
                call: Callable[[], Reservation]) -> ModelHold | None:
        self.write_on(user, credit_type)
        model = self.totals(user, credit_type)
        made = outcome(self._refusal(user, amount > model.available), call)
        if made is None:
            return None
        model.reserved += amount
        model.entries += 1
        hold = ModelHold(made.id, user, credit_type, amount, self.now + ttl)
        assert (made.credit_type, made.amount, made.expires_at) == (credit_type, amount, hold.expires_at)
        self.holds[hold.id] = hold
        return hold

    def commit(self, hold: ModelHold, charged: int, call: Callable[[], LedgerEntry]) -> None:
        """A commit charges `charged` (below, at or above the hold) and ends the hold, in one entry."""
        self.write_on(hold.user, hold.credit_type)
        model = self.totals(hold.user, hold.credit_type)
        refusal = (ReservationNotActive if not hold.active
                   else InsufficientCredits if charged > model.available + hold.amount else None)
        entry = outcome(refusal, call)
        if entry is None:
            return
        self._free(hold)
        model.balance -= charged
        model.entries += 1
        draws = model.draw(charged)
        assert (entry.credit_type, entry.balance_after, entry.draws) == (hold.credit_type, model.balance, draws)
        self.charges.append(ModelCharge(entry.id, hold.user, hold.credit_type, draws))

    def release(self, hold: ModelHold, call: Callable[[], LedgerEntry]) -> None:
        self.write_on(hold.user, hold.credit_type)
        entry = outcome(None if hold.active else ReservationNotActive, call)
        if entry is None:
            return
        self._release(hold)
        assert entry.credit_type == hold.credit_type

    def release_stale(self, call: Callable[[], int]) -> None:
        """The sweep releases every stale hold, of every user and type; it says how many."""
        stale = [hold for hold in self.holds.values() if hold.active and hold.expires_at <= self.now]
        assert call() == len(stale)
        for hold in stale:
            self._release(hold)

    def expire(self, call: Callable[[], int]) -> None:
        """The sweep expires every type's lots past their expiry; it says how many entries."""
        written = call()
        assert written == sum(model.expire(model.lots, self.now) for model in self.balances.values())

    def _available_after_write(self, user: str, credit_type: str) -> int:
        """What a correction in `credit_type` sees as available once stale holds are released
        (without releasing them in the model: a refused correction rolls that back too)."""
        model = self.totals(user, credit_type)
        freed = sum(hold.amount for hold in self._stale(user, credit_type) if hold.credit_type == credit_type)
        return model.available + freed

    def void(self, user: str, credit_type: str, lot: ModelLot, amount: int | None,
             call: Callable[[], LedgerEntry]) -> None:
        """A void (amount None: all that is left) takes only credits no active hold backs."""
        model = self.totals(user, credit_type)
        wanted = lot.remaining if amount is None else amount
        free = min(lot.remaining, max(0, self._available_after_write(user, credit_type)))
        entry = outcome(InsufficientCredits if wanted <= 0 or wanted > free else None, call)
        if entry is None:
            return
        self.write_on(user, credit_type)
        lot.remaining -= wanted
        model.balance -= wanted
        model.entries += 1
        assert (entry.credit_type, entry.amount, entry.balance_after) == (credit_type, -wanted, model.balance)

    def refund(self, charge: ModelCharge, amount: int | None, call: Callable[[], LedgerEntry]) -> None:
        """A refund (amount None: all not yet given back) goes back to the lots in the order
        drawn, past what was given back; a lot expired since gets it and expires it at once."""
        model = self.totals(charge.user, charge.credit_type)
        refundable = sum(draw["amount"] for draw in charge.draws) - charge.refunded
        wanted = refundable if amount is None else amount
        entry = outcome(ValidationFailed if wanted <= 0 or wanted > refundable else None, call)
        if entry is None:
            return
        self.write_on(charge.user, charge.credit_type)
        skip, left = charge.refunded, wanted
        charge.refunded += wanted
        model.balance += wanted
        model.entries += 1
        lots = {lot.id: lot for lot in model.lots}
        for draw in charge.draws:
            room = draw["amount"] - min(skip, draw["amount"])
            skip -= draw["amount"] - room
            given = min(room, left)
            left -= given
            if given <= 0:
                continue
            lot = lots[draw["lot_id"]]  # a KeyError here: a refund crossed credit types
            if lot.expires_at is not None and lot.expires_at <= self.now:  # reinstated, expired at once
                model.balance -= given
                model.entries += 1
            else:
                lot.remaining += given
        assert (entry.credit_type, entry.amount) == (charge.credit_type, wanted)

    def change_expiry(self, user: str, credit_type: str, lot: ModelLot, expires_at: datetime,
                      call: Callable[[], LedgerEntry]) -> None:
        """Into the future or the past: a moment already past expires what is left now."""
        entry = call()
        self.write_on(user, credit_type)
        model = self.totals(user, credit_type)
        lot.expires_at = expires_at
        model.entries += 1
        model.expire([lot], self.now)
        assert entry.credit_type == credit_type

    def check_store(self, engine: Engine) -> None:
        """Each (user, type)'s stored totals, entries (count and sum) and lots are the model's;
        nothing is stored for a pair the model has nothing in."""
        with Session(engine) as session:
            users = set(session.scalars(select(Account.user_id)))
            stored = {(row.user_id, DEFAULT_CREDIT_TYPE): (row.balance, row.reserved)
                      for row in session.scalars(select(Account))}
            stored.update(((row.user_id, row.credit_type), (row.balance, row.reserved))
                          for row in session.scalars(select(TypeBalance)))
            per_type = (Entry.user_id, Entry.credit_type)
            entries = {(user, credit_type): (count, int(total or 0)) for user, credit_type, count, total
                       in session.execute(select(*per_type, func.count(), func.sum(Entry.amount)).group_by(*per_type))}
            lots: dict[Key, list[int]] = {}
            for lot in session.scalars(select(Lot).order_by(Lot.id)):
                lots.setdefault((lot.user_id, lot.credit_type), []).append(lot.remaining)
        assert users == self.users
        known = {key for key in self.balances if key[0] in self.users}
        for key in sorted(known | set(stored) | set(entries) | set(lots)):
            model = self.balances.get(key, ModelBalance())
            assert stored.get(key, (0, 0)) == (model.balance, model.reserved), key
            assert entries.get(key, (0, 0)) == (model.entries, model.balance), key
            assert lots.get(key, []) == [lot.remaining for lot in model.lots], key
            assert sum(lots.get(key, [])) == max(model.balance, 0), key
            assert model.balance >= model.reserved >= 0, key


class ModelMachine(RuleBasedStateMachine):
    """What both machines share: an empty database, the model, the holds made, the clock, the
    sweeps, a release, and the checks after every step. A subclass sets `engine`."""

    engine: Engine
    holds = Bundle("holds")

    def __init__(self) -> None:
        super().__init__()
        wipe(self.engine)
        self.service = CreditService(self.engine)
        self.model = ReferenceModel(START)
        self.key_counter = 0

    def _key(self) -> str:
        self.key_counter += 1
        return f"k{self.key_counter}"

    def pick_lot(self, index: int, user: str | None = None) -> tuple[str, str, ModelLot] | None:
        """One of every lot (of `user`, if given), fully drawn ones too, with its owner and type."""
        lots = self.model.lots(user)
        return lots[index % len(lots)] if lots else None

    def void_one(self, index: int, amount: int | None, user: str | None = None) -> None:
        """Void all or `amount` of the lot `pick_lot` picks."""
        picked = self.pick_lot(index, user)
        if picked is not None:
            owner, credit_type, lot = picked
            self.model.void(owner, credit_type, lot, amount, lambda: self.service.void_lot(
                lot.id, amount=amount, reason="fraud", idempotency_key=self._key(), now=self.model.now))

    def refund_one(self, index: int, amount: int | None) -> None:
        """Refund all or `amount` of one of the deductions and commits so far."""
        if self.model.charges:
            charge = self.model.charges[index % len(self.model.charges)]
            self.model.refund(charge, amount, lambda: self.service.refund_deduction(
                charge.entry_id, amount=amount, reason="refund", idempotency_key=self._key(), now=self.model.now))

    def change_expiry_of_one(self, index: int, hours: int, user: str | None = None) -> None:
        """Move the expiry of the lot `pick_lot` picks to `hours` from now (maybe past)."""
        picked = self.pick_lot(index, user)
        if picked is not None:
            owner, credit_type, lot = picked
            expires_at = self.model.now + timedelta(hours=hours)
            self.model.change_expiry(owner, credit_type, lot, expires_at, lambda: self.service.change_lot_expiry(
                lot.id, expires_at, idempotency_key=self._key(), now=self.model.now))

    @rule(hold=consumes(holds))
    def release(self, hold: ModelHold | None) -> None:
        if hold is not None:
            self.model.release(hold, lambda: self.service.release_reservation(
                hold.id, idempotency_key=self._key(), now=self.model.now))

    @rule(hours=st.integers(1, 30))
    def advance_clock(self, hours: int) -> None:
        self.model.now += timedelta(hours=hours)

    @rule()
    def release_stale(self) -> None:
        self.model.release_stale(lambda: self.service.release_stale_reservations(now=self.model.now))

    @rule()
    def expire(self) -> None:
        self.model.expire(lambda: self.service.expire_credits(now=self.model.now))

    @invariant()
    def the_store_matches_the_model(self) -> None:
        self.model.check_store(self.engine)

    @invariant()
    def the_audit_passes(self) -> None:
        report = audit(self.engine)
        assert report.passed, report.problems
