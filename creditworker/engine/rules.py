"""The money rules in plain Python: what an operation does to an account, or why it is refused.

No database and no ORM here: an `Account` holds what the rules need (its totals, the live
lots loaded with it, the holds a unit of work named), and every rule either raises a typed
error having changed nothing, or changes the account in memory and returns the `Posting`
(the ledger entry) that says what it did. The unit of work collects the postings and the
writer turns them into SQL; this module is the one place that decides a balance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from creditworker.contract.credits import (
    DEFAULT_CREDIT_TYPE,
    MAX_BALANCE,
    PROMOTIONAL_SOURCES,
    EntryKind,
    OveragePolicy,
    ReservationStatus,
)
from creditworker.contract.errors import InsufficientCredits, ReservationNotActive, ValidationFailed

_NEW_LOT_ORDER = 2**62
"""Lots granted in this unit of work have no id yet; they are newer than every stored lot."""
_NO_EXPIRY = datetime.min.replace(tzinfo=UTC)
"""Stands in for a missing expiry in the sort key (the flag before it already sorts it last)."""


@dataclass(slots=True, eq=False)
class Lot:
    """A grant of credits; `id` is None until the writer inserts it."""

    id: int | None
    user_id: str
    amount: int
    remaining: int
    priority: int
    expires_at: datetime | None
    source: str
    created_at: datetime
    idempotency_key: str
    credit_type: str = DEFAULT_CREDIT_TYPE
    effective_at: datetime | None = None
    """Before this moment the lot is pending: in the balance, never drawn."""
    unit_cost: Decimal | None = None
    """The cost basis per credit (in `currency`), carried onto every draw of the lot."""
    currency: str | None = None
    age: int = 0
    """Orders equal lots oldest first: the id of a stored lot, a larger number for a new one."""
    expiry_changed: bool = False
    """True when a correction moved `expires_at` (the writer then writes it)."""
    rolls_over: bool = False
    """A period's allocation that rolls over at its boundary (see `roll_over`)."""
    rolled_from: int | None = None
    """On a rolled lot: the id of the allocation it rolled from."""
    rollover_left: int | None = None
    """On a source past its boundary: how much more of it may roll when a hold ends."""
    rollover_expires_at: datetime | None = None
    """On a source past its boundary: when credits rolled from it expire."""


def draw_order(lot: Lot) -> tuple[Any, ...]:
    """The draw-down order: lowest priority value, soonest expiry (none last), promotional
    before paid (`PROMOTIONAL_SOURCES`), oldest."""
    return (lot.priority, lot.expires_at is None, lot.expires_at or _NO_EXPIRY,
            lot.source not in PROMOTIONAL_SOURCES, lot.age)


@dataclass(slots=True, eq=False)
class Hold:
    """A reservation: credits held out of `available` until settled, released or expired."""

    id: str
    user_id: str
    amount: int
    status: str
    expires_at: datetime
    created_at: datetime
    idempotency_key: str
    committed_amount: int | None = None
    finalized_at: datetime | None = None
    credit_type: str = DEFAULT_CREDIT_TYPE
    stored: bool = True
    """False for a hold made in this unit of work (the writer inserts it, not updates it)."""


@dataclass(slots=True, eq=False)
class Account:
    """One user's totals in one credit type, with that type's live lots loaded with it (in
    draw-down order). Types never mix: every rule works on one type's account."""

    user_id: str
    balance: int
    reserved: int
    low_credit_threshold: int | None
    low_credit_alerted: bool
    overdraft_limit: int = 0
    """How far below zero `available` may go (raised only by an allowed overage)."""
    lots: list[Lot] = field(default_factory=list)
    lots_loaded: bool = False
    """True when `lots` holds every live lot, so that the account may be drawn from."""
    credit_type: str = DEFAULT_CREDIT_TYPE
    stored: bool = True
    """False for another type's totals not stored yet (the writer inserts their row)."""
    pending_until: datetime | None = None
    """The latest `effective_at` of the account's grants (stored; see `pending`)."""
    pending: int = 0
    """What its lots not yet effective hold: read when `pending_until` is still ahead."""
    topup_threshold: int | None = None
    """On the default type's totals: the highest threshold of the account's enabled auto
    top-up rules (engine/topups.py), None without one; stored, never written by the writer."""

    @property
    def available(self) -> int:
        """What the stored totals say (the CHECK constraints hold it to the overdraft)."""
        return self.balance - self.reserved

    @property
    def spendable(self) -> int:
        """What a deduct, hold or commit may take now: `available` without pending grants."""
        return self.balance - self.reserved - self.pending


def is_pending(lot: Lot, at: datetime) -> bool:
    return lot.effective_at is not None and lot.effective_at > at


@dataclass(slots=True, eq=False)
class Posting:
    """One ledger entry decided by a rule; the writer gives it its id."""

    user_id: str
    kind: str
    amount: int
    held: int
    balance_after: int
    reserved_after: int
    idempotency_key: str
    created_at: datetime
    lot: Lot | None = None
    hold: Hold | None = None
    draws: list[tuple[Lot, int]] = field(default_factory=list)
    description: str | None = None
    metadata: dict[str, Any] | None = None
    id: int | None = None
    record: dict[str, Any] | None = None
    """The entry as JSON, built once after the writer gave it its id (see `results`)."""
    refund_of: int | None = None
    """On a `refund`: the entry it gives back."""
    credit_type: str = DEFAULT_CREDIT_TYPE


def _posting(account: Account, kind: EntryKind, key: str, at: datetime, *, amount: int = 0,
             held: int = 0, **details: Any) -> Posting:
    """Apply a change to the account's totals and describe it as a ledger entry."""
    account.balance += amount
    account.reserved += held
    return Posting(account.user_id, kind.value, amount, held, account.balance, account.reserved,
                   key, at, credit_type=account.credit_type, **details)


def _insufficient(account: Account, amount: int) -> InsufficientCredits:
    extra: dict[str, Any] = {} if account.credit_type == DEFAULT_CREDIT_TYPE else {"credit_type": account.credit_type}
    if account.pending:
        extra["pending"] = account.pending
    return InsufficientCredits(
        f"user {account.user_id!r} has {account.spendable} {account.credit_type} available, {amount} requested",
        user_id=account.user_id, available=account.spendable, requested=amount, **extra,
    )


# ---------------------------------------------------------------- the rules


def grant(account: Account, amount: int, *, at: datetime, key: str, expires_at: datetime | None = None,
          priority: int = 0, source: str = "purchase", description: str | None = None,
          metadata: dict[str, Any] | None = None, effective_at: datetime | None = None,
          unit_cost: Decimal | None = None, currency: str | None = None) -> Posting:
    """A new lot; a negative balance (from an overage) is paid off from it first. A lot
    effective later is pending until then: in the balance, not spendable."""
    if account.balance + amount > MAX_BALANCE:
        raise ValidationFailed(f"the balance would exceed the maximum of {MAX_BALANCE}",
                               user_id=account.user_id)
    if expires_at is not None and expires_at <= at:
        raise ValidationFailed("expires_at must be in the future", user_id=account.user_id)
    debt = max(0, -account.balance)
    lot = Lot(None, account.user_id, amount, amount - min(debt, amount), priority, expires_at,
              source, at, key, account.credit_type, effective_at, unit_cost, currency,
              age=_NEW_LOT_ORDER + len(account.lots))
    if is_pending(lot, at):
        assert effective_at is not None
        account.pending += lot.remaining
        account.pending_until = max(account.pending_until or effective_at, effective_at)
    if account.lots_loaded:
        account.lots.append(lot)
        account.lots.sort(key=draw_order)
    return _posting(account, EntryKind.ADD, key, at, amount=amount, lot=lot,
                    description=description, metadata=metadata)


def draw(account: Account, amount: int, at: datetime) -> list[tuple[Lot, int]]:
    """Take `amount` from the live lots in the draw-down order (pending lots are skipped)."""
    assert account.lots_loaded, f"account {account.user_id!r} was loaded without its lots"
    draws: list[tuple[Lot, int]] = []
    left = amount
    for lot in account.lots:
        if left <= 0:
            break
        if lot.remaining <= 0 or (lot.effective_at is not None and lot.effective_at > at):
            continue
        taken = min(lot.remaining, left)
        lot.remaining -= taken
        left -= taken
        draws.append((lot, taken))
    if left > 0:
        raise AssertionError(f"account {account.user_id!r} lots are short by {left}: run `audit`")
    return draws


def deduct(account: Account, amount: int, *, at: datetime, key: str, description: str | None = None,
           metadata: dict[str, Any] | None = None) -> Posting:
    """Consume credits now; refused when what is spendable cannot cover them."""
    if amount > account.spendable:
        raise _insufficient(account, amount)
    draws = draw(account, amount, at)
    return _posting(account, EntryKind.DEDUCT, key, at, amount=-amount, draws=draws,
                    description=description, metadata=metadata)


def hold_expiry(at: datetime, *, checked_at: datetime, ttl_seconds: int, requested_at: datetime | None = None,
                deadline: datetime | None = None) -> datetime:
    """When a new hold expires; raises, changing nothing, if it comes too late to apply.

    `checked_at` is the clock when the account is locked (or `at`, if later), so the
    deadline is checked right before the hold is written, not when the batch began. The TTL
    runs from the earlier of `requested_at` and `at` (a producer clock running ahead cannot
    lengthen a hold). Too late is `invalid_input`, as an `expires_at` in the past is for a
    grant: the request, as sent, can no longer be applied; the caller may send it again
    (same key) with new times.
    """
    if deadline is not None and checked_at > deadline:
        raise ValidationFailed(
            f"reservation not applied: it reached the engine at {checked_at.isoformat()}, after "
            f"its caller stopped waiting at {deadline.isoformat()}",
            applied=False, reason="deadline_passed", deadline=deadline.isoformat(),
        )
    asked = at if requested_at is None else min(requested_at, at)
    expires_at = asked + timedelta(seconds=ttl_seconds)
    if expires_at <= at:
        raise ValidationFailed(
            f"reservation not applied: its TTL of {ttl_seconds} s, counted from when it "
            f"was requested ({asked.isoformat()}), ran out before it reached the engine",
            applied=False, reason="ttl_elapsed", requested_at=asked.isoformat(),
        )
    return expires_at


def hold(account: Account, amount: int, *, hold_id: str, at: datetime, expires_at: datetime, key: str,
         description: str | None = None, metadata: dict[str, Any] | None = None) -> Posting:
    """Hold credits out of `available` until `expires_at`; the posting carries the new hold."""
    if amount > account.spendable:
        raise _insufficient(account, amount)
    new = Hold(hold_id, account.user_id, amount, ReservationStatus.ACTIVE.value,
               expires_at, at, key, credit_type=account.credit_type, stored=False)
    return _posting(account, EntryKind.RESERVE, key, at, held=amount, hold=new,
                    description=description, metadata=metadata)


def require_active(hold: Hold, at: datetime) -> None:
    """A hold past its TTL is expired even before the sweep has marked it."""
    status = hold.status
    if status == ReservationStatus.ACTIVE.value and hold.expires_at <= at:
        status = ReservationStatus.EXPIRED.value
    if status != ReservationStatus.ACTIVE.value:
        raise ReservationNotActive(f"reservation {hold.id!r} is {status}",
                                   reservation_id=hold.id, status=status)


def _finish(hold: Hold, status: ReservationStatus, at: datetime) -> None:
    hold.status = status.value
    hold.finalized_at = at


def settle(account: Account, hold: Hold, charged: int | None, *, policy: OveragePolicy, at: datetime,
           key: str, description: str | None = None, metadata: dict[str, Any] | None = None) -> Posting:
    """Commit a hold: charge `charged` (None = the held amount) and free the hold.

    A charge above the hold needs `available` to cover the extra, unless the policy is
    `allow_negative`: then what the lots cannot cover becomes a negative balance.
    """
    require_active(hold, at)
    charged = hold.amount if charged is None else charged
    covered = account.spendable + hold.amount
    if charged > covered and (policy is OveragePolicy.REJECT or account.pending):  # no debt beside pending credits
        raise InsufficientCredits(
            f"commit of {charged} exceeds the {hold.amount} held plus {covered - hold.amount} available",
            reservation_id=hold.id, user_id=hold.user_id, available=covered, requested=charged,
        )
    draws = draw(account, max(0, min(charged, account.balance - account.pending)), at)
    _finish(hold, ReservationStatus.COMMITTED, at)
    hold.committed_amount = charged
    posting = _posting(account, EntryKind.COMMIT, key, at, amount=-charged, held=-hold.amount, hold=hold,
                       draws=draws, description=description, metadata=metadata)
    account.overdraft_limit = max(account.overdraft_limit, -account.available)  # the debt allowed
    return posting


def release(account: Account, hold: Hold, *, at: datetime, key: str) -> Posting:
    """Give held credits back to `available` without charging anything."""
    require_active(hold, at)
    _finish(hold, ReservationStatus.RELEASED, at)
    return _posting(account, EntryKind.RELEASE, key, at, held=-hold.amount, hold=hold)


def expire_hold(account: Account, hold: Hold, *, at: datetime) -> Posting | None:
    """The stale-hold sweep: a hold still active past its TTL gives its credits back."""
    if hold.status != ReservationStatus.ACTIVE.value or hold.expires_at > at:
        return None
    _finish(hold, ReservationStatus.EXPIRED, at)
    return _posting(account, EntryKind.RESERVATION_EXPIRED, f"system:reservation_expired:{hold.id}", at,
                    held=-hold.amount, hold=hold)


def expire(account: Account, lots: list[Lot], *, at: datetime, key: str | None = None) -> list[Posting]:
    """Take what is left of expired lots (in id order), never the credits an active hold backs.

    Held credits expire on the first sweep after their hold ends, unless a commit drew them.
    The sweep keys each entry by lot, the sweep's moment and remaining: a refund can raise a
    lot's `remaining` back to a figure it had, so lot and remaining alone may recur; one
    sweep expires a lot once, and a second sweep at the same moment finds nothing left to
    take. A correction that expires a lot at once gives its own `key`.
    """
    postings: list[Posting] = []
    unheld = account.spendable
    for lot in sorted(lots, key=lambda lot: lot.age):
        if lot.expires_at is None or lot.expires_at > at:
            continue
        pending = is_pending(lot, at)  # no hold rests on a pending lot
        taken = lot.remaining if pending else min(lot.remaining, unheld)
        if taken <= 0:
            continue
        entry_key = key or f"system:expire:{lot.id}:{at:%Y%m%dT%H%M%S%f}:{lot.remaining}"
        lot.remaining -= taken
        if pending:
            account.pending -= taken
        else:
            unheld -= taken
        postings.append(_posting(account, EntryKind.EXPIRE, entry_key, at, amount=-taken, lot=lot))
    return postings


def rollover_limit(sources: list[Lot], *, max_credits: int | None, max_percent: int | None) -> int:
    """How many credits of a period's allocation (`sources`) may roll: a fixed number, or a
    percentage of what was allocated (rounded down); no limit set means none roll."""
    if max_credits is not None:
        return max_credits
    if max_percent is not None:
        return sum(lot.amount for lot in sources) * max_percent // 100
    return 0


def roll_over(account: Account, sources: list[Lot], limit: int, *, at: datetime, key: str,
              expires_at: datetime) -> list[Posting]:
    """At a period's boundary: what is left of its allocation lots (`sources`) and no active
    hold backs, up to `limit` in all, becomes a new lot linked to its source (a `rollover`
    entry, no change of balance); the rest of what is free expires (an `expire` entry with
    `rollover_forfeited` in its metadata). Nothing rolls into a lot that would already have
    expired.

    Which credits holds back is decided as `expire` decides it (the account's `spendable`,
    sources in id order). What a hold still backs stays on its source, which keeps what may
    still roll (`rollover_left`) and when it would expire: the hold's end, or the next
    expiry sweep once other credits (the new period's) back the hold, rolls it (this rule
    again, with that limit) and expires the rest at once.
    """
    postings: list[Posting] = []
    left = limit if expires_at > at else 0
    unheld = account.spendable
    for source in sorted(sources, key=lambda lot: lot.age):
        source.rolls_over = False
        free = max(0, min(source.remaining, unheld))
        unheld -= free
        rolled = min(free, left)
        left -= rolled
        forfeited = free - rolled
        if rolled > 0:
            source.remaining -= rolled
            lot = Lot(None, account.user_id, rolled, rolled, source.priority, expires_at, source.source, at, key,
                      account.credit_type, None, source.unit_cost, source.currency,
                      age=_NEW_LOT_ORDER + len(account.lots), rolled_from=source.id)
            if account.lots_loaded:
                account.lots.append(lot)
                account.lots.sort(key=draw_order)
            postings.append(_posting(account, EntryKind.ROLLOVER, key, at, lot=lot, draws=[(source, rolled)],
                                     metadata={"rolled_from_lot_id": source.id}))
        if forfeited > 0:
            source.remaining -= forfeited
            postings.append(_posting(account, EntryKind.EXPIRE, key, at, amount=-forfeited, lot=source,
                                     metadata={"rollover_forfeited": forfeited}))
        held = source.remaining > 0
        source.rollover_left = left if held else None
        source.rollover_expires_at = expires_at if held else None
    return postings


def void(account: Account, lot: Lot, amount: int | None, *, reason: str, at: datetime,
         key: str) -> Posting:
    """Remove `amount` (None: all that is left) of a lot, a `void` entry with its reason.

    Consumed credits stay consumed, and `available` never goes below zero: credits an active
    hold backs cannot be voided away, so a void larger than what is free is refused.
    """
    wanted = lot.remaining if amount is None else amount
    pending = is_pending(lot, at)  # no hold rests on a pending lot
    free = lot.remaining if pending else min(lot.remaining, max(0, account.spendable))
    if wanted <= 0 or wanted > free:
        raise InsufficientCredits(
            f"lot {lot.id} has {free} credits free to void ({lot.remaining} left, "
            f"{account.spendable} available to the account), {wanted} requested",
            user_id=account.user_id, lot_id=lot.id, remaining=lot.remaining, free=free,
            requested=wanted,
        )
    lot.remaining -= wanted
    if pending:
        account.pending -= wanted
    return _posting(account, EntryKind.VOID, key, at, amount=-wanted, lot=lot,
                    metadata={"reason": reason})


def change_expiry(account: Account, lot: Lot, expires_at: datetime, *, at: datetime,
                  key: str) -> list[Posting]:
    """Move a lot's expiry: an `expiry_changed` entry (no amount), then, for a moment already
    past, an `expire` entry (under the same key) for what is left that no active hold backs."""
    previous = lot.expires_at
    lot.expires_at = expires_at
    lot.expiry_changed = True
    metadata = {"expires_at": expires_at.isoformat(),
                "previous_expires_at": previous.isoformat() if previous is not None else None}
    postings = [_posting(account, EntryKind.EXPIRY_CHANGED, key, at, lot=lot, metadata=metadata)]
    if expires_at <= at:
        postings.extend(expire(account, [lot], at=at, key=key))
    return postings


def refund(account: Account, drawn: list[tuple[Lot, int]], refunded: int, amount: int | None, *,
           entry_id: int, reason: str, at: datetime, key: str) -> list[Posting]:
    """Give back `amount` (None: all that is left) of a deduction or commit that drew `drawn`
    (its draws, in order) and of which `refunded` was already given back.

    Refunds go back to the lots in the order the entry drew them, so the first `refunded`
    credits of that order are the ones already returned: no lot gets back more than was
    drawn from it, and no entry more than it drew. A debt (a negative balance from an
    allowed overage) is paid off first, as a grant does. A lot that expired meanwhile gets
    its credits back and they expire at once: an `expire` entry under the refund's key, and
    the refund's metadata lists the lot under `expired_at_once`.
    """
    refundable = sum(taken for _lot, taken in drawn) - refunded
    wanted = refundable if amount is None else amount
    if wanted <= 0 or wanted > refundable:
        raise ValidationFailed(
            f"entry {entry_id} has {refundable} credits left to refund, {wanted} requested",
            reason="refund_exceeds_charge", entry_id=entry_id, refundable=refundable, requested=wanted,
        )
    if account.balance + wanted > MAX_BALANCE:
        raise ValidationFailed(f"the balance would exceed the maximum of {MAX_BALANCE}",
                               user_id=account.user_id)
    skip, left = refunded, wanted
    to_lots = wanted - min(max(0, -account.balance), wanted)  # a debt is paid off first
    gifts: list[tuple[Lot, int]] = []
    for lot, taken in drawn:
        room = taken - min(skip, taken)
        skip -= taken - room
        given = min(room, left)
        left -= given
        if given <= 0:
            continue
        credited = min(given, to_lots)
        to_lots -= credited
        if credited > 0:
            lot.remaining += credited
            gifts.append((lot, credited))
    expired = [(lot, given) for lot, given in gifts if lot.expires_at is not None and lot.expires_at <= at]
    metadata: dict[str, Any] = {"reason": reason, "refund_of": entry_id}
    if expired:
        metadata["expired_at_once"] = [{"lot_id": lot.id, "amount": given} for lot, given in expired]
    postings = [_posting(account, EntryKind.REFUND, key, at, amount=wanted, draws=gifts, metadata=metadata)]
    postings[0].refund_of = entry_id
    for lot, given in expired:
        lot.remaining -= given
        postings.append(_posting(account, EntryKind.EXPIRE, key, at, amount=-given, lot=lot))
    return postings


def low_credit_crossing(account: Account, default_threshold: int | None) -> int | None:
    """The threshold `available` just reached or crossed going down (once per crossing:
    it was above, it is now at or below), else None.

    Being above the threshold again re-arms it (and is `credits.recovered`); the account's
    own threshold overrides the service default, and a threshold of None or 0 is off.
    """
    threshold = account.low_credit_threshold
    if threshold is None:
        threshold = default_threshold
    if threshold is None or threshold <= 0:
        return None
    if account.spendable <= threshold:
        if not account.low_credit_alerted:
            account.low_credit_alerted = True
            return threshold
    elif account.low_credit_alerted:
        account.low_credit_alerted = False
    return None
