"""CreditService: the engine's public methods, each a few lines over one path.

Every write is a batch: `add_credits` and the other single calls are a batch of one, and
`apply_batch` is the same path with many items. A batch locks every account it touches in
one sorted query, decides each item in plain Python (`rules`), keeps each item's own
idempotency key and outcome, and hands everything to the one writer at the end of its
transaction. It knows nothing of Celery, HTTP or the CLI.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar, cast

from pydantic import BaseModel
from sqlalchemy import Table, func, select
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.orm import Session

from creditworker.contract.credits import (
    DEFAULT_CREDIT_TYPE,
    MAX_METADATA_DEPTH,
    MAX_USER_ID_LENGTH,
    AddCredits,
    BatchOutcome,
    ChangeLotExpiry,
    CommitReservation,
    CostBasis,
    CreditLot,
    CreditsInfo,
    DeductCredits,
    EntryKind,
    GetCredits,
    GetExpiring,
    GetHistory,
    GetReservation,
    GetUsage,
    LedgerEntry,
    LowCreditThreshold,
    OveragePolicy,
    RefundDeduction,
    ReleaseReservation,
    Request,
    Reservation,
    ReservationStatus,
    ReserveCredits,
    SetLowCreditThreshold,
    TypeTotals,
    UsagePeriod,
    VoidLot,
    nesting_depth,
    parse,
    parse_batch_item,
)
from creditworker.contract.errors import (
    CreditError,
    IdempotencyConflict,
    UnknownEntry,
    UnknownLot,
    UnknownReservation,
    UnknownUser,
    ValidationFailed,
)
from creditworker.contract.events import (
    CreditsExpired,
    CreditsExpiryChanged,
    CreditsRefunded,
    CreditsVoided,
)
from creditworker.contract.topups import (
    AutoTopupRule,
    CompleteTopup,
    GetAutoTopup,
    ListTopups,
    RemoveAutoTopup,
    SetAutoTopup,
    Topup,
)
from creditworker.engine import reports, rollover, rules, sweeps, thresholds, topups
from creditworker.engine.account import Drawing, load_lots
from creditworker.engine.payments import PaymentProvider, load_provider
from creditworker.engine.results import batch_outcome, entry_record, reservation_record
from creditworker.engine.unit_of_work import (
    ResultSource,
    StoredOperation,
    UnitOfWork,
    collector_paused,
    new_event_id,
    new_hold_id,
)
from creditworker.engine.writer import write
from creditworker.records import ledger_records
from creditworker.records.ledger_file import LedgerFile
from creditworker.storage.backends import backend_for, prepared
from creditworker.storage.database import make_engine
from creditworker.storage.tables import Account, Entry, Hold, Lot, TypeBalance
from creditworker.storage.transaction import run_transaction

if TYPE_CHECKING:
    from creditworker.settings import Settings

R = TypeVar("R", bound=BaseModel)
T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(now: datetime | None) -> datetime:
    """`now`, or the current time; a naive datetime is taken as UTC."""
    if now is None:
        return utcnow()
    return now.astimezone(UTC) if now.tzinfo else now.replace(tzinfo=UTC)


class CreditService:
    """Credits for many users, stored in one SQL database.

    `overage_policy` decides what a commit above the held amount does when `available`
    cannot cover the extra: `reject` (default) refuses it, `allow_negative` charges it and
    leaves a negative balance that later grants pay off first.

    Notifications are written to the outbox in the same transaction as their change:
    `credits.low` when `available` crosses below the account's threshold (or
    `low_credit_threshold` for accounts without one; None turns the default off),
    `credits.expired`, `reservation.expired` and `credits.expiring` reminders
    `expiry_reminder_days` before a lot expires. `on_events(count)` is called after a
    commit that wrote events, so an adapter can wake the outbox relay.
    """

    def __init__(
        self,
        database: str | Engine,
        *,
        ledger_path: str | None = None,
        overage_policy: OveragePolicy | str = OveragePolicy.REJECT,
        expiring_soon_days: int = 7,
        low_credit_threshold: int | None = None,
        expiry_reminder_days: Sequence[int] = (7, 1),
        on_events: Callable[[int], None] | None = None,
        create_tables: bool | None = None,
        payment_provider: PaymentProvider | str | None = None,
        topup_stale_after_seconds: float = 300,
        prepared_statements: bool = True,
    ) -> None:
        self.engine = make_engine(database) if isinstance(database, str) else database
        if not prepared_statements:  # behind a pooler in transaction mode (storage/backends/prepared.py)
            prepared.disable(self.engine)
        if embedded_tables(database) if create_tables is None else create_tables:
            from creditworker.storage.migrate import upgrade

            upgrade(self.engine)
        self.ledger_file = LedgerFile(ledger_path) if ledger_path else None
        self.overage_policy = OveragePolicy(overage_policy)
        self.expiring_soon_days = expiring_soon_days
        self.low_credit_threshold = low_credit_threshold
        self.expiry_reminder_days = sorted({int(days) for days in expiry_reminder_days if days > 0})
        self.on_events = on_events
        self._payment_provider = payment_provider
        """What charges auto top-ups: a provider, or its `module:object` (loaded at the first
        charge, so that a wrong path fails that charge with `payment_provider_error`, never
        a deduct); None or `manual`: the built-in manual provider."""
        self.topup_stale_after_seconds = topup_stale_after_seconds

    @classmethod
    def from_settings(
        cls, settings: Settings, *, database: str | Engine | None = None,
        on_events: Callable[[int], None] | None = None, create_tables: bool = False,
    ) -> CreditService:
        """The engine as `settings` (read once, at the edge) configure it; `database`
        overrides the URL. Tables are not made unless asked: the worker and the gateway wait
        for `creditworker migrate`."""
        return cls(
            database or settings.database_url,
            ledger_path=settings.ledger_path,
            overage_policy=settings.overage_policy,
            expiring_soon_days=settings.expiring_soon_days,
            low_credit_threshold=settings.low_credit_threshold,
            expiry_reminder_days=settings.expiry_reminder_days,
            on_events=on_events,
            create_tables=create_tables,
            payment_provider=settings.payment_provider,
            topup_stale_after_seconds=settings.topup_stale_after_seconds,
            prepared_statements=settings.database_prepared_statements,
        )

    # ------------------------------------------------------------------ writes

    def add_credits(
        self,
        user_id: str,
        amount: int,
        *,
        expires_at: datetime | None = None,
        priority: int | None = None,
        source: str = "purchase",
        description: str | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        credit_type: str = DEFAULT_CREDIT_TYPE,
        effective_at: datetime | None = None,
        cost_basis: CostBasis | Mapping[str, Any] | None = None,
        now: datetime | None = None,
    ) -> LedgerEntry:
        """Grant a lot of credits of `credit_type`; a negative balance (from an overage) of
        that type is paid off first. A grant `effective_at` a later moment is pending until
        then (in the total, not spendable; no job flips it). `cost_basis` (`{"amount":
        Decimal, "currency": "USD"}`) is the price per credit, carried onto every draw."""
        request = self._parse(
            AddCredits, user_id=user_id, amount=amount, expires_at=expires_at, priority=priority,
            source=source, description=description, metadata=metadata, idempotency_key=idempotency_key,
            credit_type=credit_type, effective_at=effective_at, cost_basis=cost_basis,
        )
        return self._apply_one(request, LedgerEntry, now)

    def deduct_credits(
        self,
        user_id: str,
        amount: int,
        *,
        description: str | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        credit_type: str = DEFAULT_CREDIT_TYPE,
        now: datetime | None = None,
    ) -> LedgerEntry:
        """Consume credits of `credit_type` now, drawing that type's lots by priority, then
        soonest expiry, then age (never another type's)."""
        request = self._parse(
            DeductCredits, user_id=user_id, amount=amount, description=description, metadata=metadata,
            idempotency_key=idempotency_key, credit_type=credit_type,
        )
        return self._apply_one(request, LedgerEntry, now)

    def reserve_credits(
        self,
        user_id: str,
        amount: int,
        *,
        ttl_seconds: int | None = None,
        description: str | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        requested_at: datetime | None = None,
        deadline: datetime | None = None,
        credit_type: str = DEFAULT_CREDIT_TYPE,
        now: datetime | None = None,
    ) -> Reservation:
        """Hold credits out of `available` until committed, released or past their TTL.

        The TTL runs from `requested_at` when the caller asked earlier than now; a caller
        that stops waiting at `deadline` gets no hold applied after it."""
        fields: dict[str, Any] = {
            "user_id": user_id, "amount": amount, "description": description, "metadata": metadata,
            "idempotency_key": idempotency_key, "requested_at": requested_at, "deadline": deadline,
            "credit_type": credit_type,
        }
        if ttl_seconds is not None:
            fields["ttl_seconds"] = ttl_seconds
        return self._apply_one(self._parse(ReserveCredits, **fields), Reservation, now)

    def commit_reservation(
        self,
        reservation_id: str,
        amount: int | None = None,
        *,
        description: str | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        now: datetime | None = None,
    ) -> LedgerEntry:
        """Charge the actual amount of a hold (None = the held amount) and free the rest."""
        request = self._parse(
            CommitReservation, reservation_id=reservation_id, amount=amount, description=description,
            metadata=metadata, idempotency_key=idempotency_key,
        )
        return self._apply_one(request, LedgerEntry, now)

    def release_reservation(
        self,
        reservation_id: str,
        *,
        idempotency_key: str | None = None,
        now: datetime | None = None,
    ) -> LedgerEntry:
        """Give held credits back to `available` without charging anything."""
        request = self._parse(ReleaseReservation, reservation_id=reservation_id, idempotency_key=idempotency_key)
        return self._apply_one(request, LedgerEntry, now)

    # ------------------------------------------------------------------ corrections

    def void_lot(
        self,
        lot_id: int,
        *,
        reason: str,
        amount: int | None = None,
        idempotency_key: str | None = None,
        now: datetime | None = None,
    ) -> LedgerEntry:
        """Remove what is left of a grant (or `amount` of it) with a reason, as a `void` entry.

        Consumed credits stay consumed; credits an active hold backs are not free to void."""
        request = self._parse(VoidLot, lot_id=lot_id, reason=reason, amount=amount,
                              idempotency_key=idempotency_key)

        def decide(uow: UnitOfWork, lot: rules.Lot, key: str) -> rules.Posting:
            posting = uow.post(rules.void(uow.account(lot.user_id, lot.credit_type), lot, request.amount,
                                          reason=request.reason, at=uow.at, key=key))
            assert lot.id is not None
            uow.emit(CreditsVoided(event_id=new_event_id(), occurred_at=uow.at, user_id=lot.user_id,
                                   lot_id=lot.id, amount=-posting.amount, reason=request.reason,
                                   credit_type=lot.credit_type))
            return posting

        return self._correct_lot(request, decide, now)

    def change_lot_expiry(
        self,
        lot_id: int,
        expires_at: datetime,
        *,
        idempotency_key: str | None = None,
        now: datetime | None = None,
    ) -> LedgerEntry:
        """Extend or shorten a grant (an `expiry_changed` entry); a moment already past expires
        what is left of it now, with the usual `expire` entry and event."""
        request = self._parse(ChangeLotExpiry, lot_id=lot_id, expires_at=expires_at,
                              idempotency_key=idempotency_key)

        def decide(uow: UnitOfWork, lot: rules.Lot, key: str) -> rules.Posting:
            previous = lot.expires_at
            changed, *expired = rules.change_expiry(uow.account(lot.user_id, lot.credit_type), lot, request.expires_at,
                                                    at=uow.at, key=key)
            uow.post(changed)
            assert lot.id is not None
            uow.emit(CreditsExpiryChanged(event_id=new_event_id(), occurred_at=uow.at, user_id=lot.user_id,
                                          lot_id=lot.id, expires_at=request.expires_at,
                                          previous_expires_at=previous, credit_type=lot.credit_type))
            for posting in expired:
                uow.post(posting)
                uow.emit(CreditsExpired(event_id=new_event_id(), occurred_at=uow.at, user_id=lot.user_id,
                                        lot_id=lot.id, amount=-posting.amount, credit_type=lot.credit_type))
            return changed

        return self._correct_lot(request, decide, now)

    def refund_deduction(
        self,
        entry_id: int,
        *,
        reason: str,
        amount: int | None = None,
        idempotency_key: str | None = None,
        now: datetime | None = None,
    ) -> LedgerEntry:
        """Give back all (or `amount`) of a deduction or commit to the lots it drew from, as a
        `refund` entry; never more than it drew, across all its refunds. A lot that expired
        meanwhile gets its credits back and they expire at once (an `expire` entry)."""
        request = self._parse(RefundDeduction, entry_id=entry_id, reason=reason, amount=amount,
                              idempotency_key=idempotency_key)

        def owner(connection: Connection) -> str:
            row = _entry_for_refund(connection, request.entry_id)
            if row is None:
                raise UnknownEntry(f"no ledger entry {request.entry_id}", entry_id=request.entry_id)
            return str(row[1])

        def decide(uow: UnitOfWork, key: str) -> rules.Posting:
            row = _entry_for_refund(uow.connection, request.entry_id)
            assert row is not None
            _id, user_id, kind, draws, credit_type = row
            if kind not in (EntryKind.DEDUCT.value, EntryKind.COMMIT.value):
                raise ValidationFailed(
                    f"entry {request.entry_id} is a {kind} entry: only a deduct or commit can be refunded",
                    reason="not_refundable", entry_id=request.entry_id, kind=kind)
            drawn = [(int(draw["lot_id"]), int(draw["amount"])) for draw in _json_list(draws)]
            lots = {lot.id: lot for lot in load_lots(uow.connection, {lot_id for lot_id, _ in drawn})}
            refunded = uow.connection.execute(
                select(func.coalesce(func.sum(Entry.amount), 0))
                .where(Entry.refund_of == request.entry_id, Entry.kind == EntryKind.REFUND.value)
            ).scalar_one()
            given, *expired = rules.refund(
                uow.account(user_id, credit_type), [(lots[lot_id], taken) for lot_id, taken in drawn], int(refunded),
                request.amount, entry_id=request.entry_id, reason=request.reason, at=uow.at, key=key)
            uow.post(given)
            uow.emit(CreditsRefunded(event_id=new_event_id(), occurred_at=uow.at, user_id=user_id,
                                     entry_id=request.entry_id, amount=given.amount, reason=request.reason,
                                     credit_type=credit_type))
            for posting in expired:
                uow.post(posting)
                assert posting.lot is not None and posting.lot.id is not None
                uow.emit(CreditsExpired(event_id=new_event_id(), occurred_at=uow.at, user_id=user_id,
                                        lot_id=posting.lot.id, amount=-posting.amount, credit_type=credit_type))
            return given

        return self._correct(request, owner, decide, now)

    def _correct_lot(
        self,
        request: VoidLot | ChangeLotExpiry,
        decide: Callable[[UnitOfWork, rules.Lot, str], rules.Posting],
        now: datetime | None,
    ) -> LedgerEntry:
        """A correction of one lot: the lot is re-read under its owner's lock."""

        def owner(connection: Connection) -> str:
            found = load_lots(connection, [request.lot_id])  # a lot's owner never changes
            if not found:
                raise UnknownLot(f"no lot {request.lot_id}", lot_id=request.lot_id)
            return found[0].user_id

        def decide_locked(uow: UnitOfWork, key: str) -> rules.Posting:
            (lot,) = load_lots(uow.connection, [request.lot_id])
            return decide(uow, lot, key)

        return self._correct(request, owner, decide_locked, now)

    def _correct(
        self,
        request: VoidLot | ChangeLotExpiry | RefundDeduction,
        owner: Callable[[Connection], str],
        decide: Callable[[UnitOfWork, str], rules.Posting],
        now: datetime | None,
    ) -> LedgerEntry:
        """A correction, once per idempotency key: `owner` finds the account (or raises the
        typed error of an unknown id), which is locked before `decide` reads what it changes;
        the result is the correction's entry."""
        key = request.idempotency_key or _fresh_key()
        fingerprint = request.fingerprint()
        operation = type(request).__name__

        def work(uow: UnitOfWork) -> ResultSource:
            uow.lock([owner(uow.connection)], stale_holds=True)
            uow.expire_stale_holds()  # a hold past its TTL no longer keeps credits from a void
            if request.idempotency_key is not None:
                previous = uow.known_operations([key]).get(key)
                if previous is not None:
                    return _replay(previous, key, fingerprint)
            posting = decide(uow, key)
            return uow.record_operation(key, operation, fingerprint, posting).source

        try:
            source = self.run(work, now=now)
        except CreditError as exc:
            self._log_error(operation, request.model_dump(mode="json"), exc)
            raise
        return LedgerEntry.model_validate(entry_record(source) if isinstance(source, rules.Posting) else source)

    def apply_batch(
        self,
        operations: Sequence[Mapping[str, Any] | Request],
        *,
        default_keys: Sequence[str] | None = None,
        now: datetime | None = None,
    ) -> list[BatchOutcome]:
        """Apply many operations in one transaction; each keeps its own key and outcome.

        Items are `{"op": "add"|"deduct"|"reserve"|"commit"|"release", ...fields}` (or
        request models). Operations on one account apply in the order given. Every
        account involved is locked first, in sorted order, so two batches never deadlock.
        A refused item changes nothing and reports its typed error; the others commit.
        `default_keys[i]` keys an item that has no idempotency key.
        """
        with collector_paused():
            requests: list[Request | CreditError] = []
            unreadable: list[tuple[str, dict[str, Any], CreditError]] = []
            for item in operations:
                try:
                    requests.append(item if isinstance(item, Request) else parse_batch_item(item))
                except CreditError as exc:
                    requests.append(exc)
                    fields = dict(item) if isinstance(item, Mapping) else {}
                    unreadable.append((f"batch:{fields.get('op')}", fields, exc))
            self._log_errors(unreadable)
            outcomes = self._apply(requests, default_keys, aware(now))
            return [
                batch_outcome(False, None, outcome.to_dict()) if isinstance(outcome, CreditError)
                else batch_outcome(True, outcome, None)
                for outcome in outcomes
            ]

    def set_low_credit_threshold(self, user_id: str, threshold: int | None = None, percent: int | None = None,
                                 credit_type: str = DEFAULT_CREDIT_TYPE,
                                 idempotency_key: str | None = None) -> LowCreditThreshold:
        """Set the account's low-credit threshold in `credit_type`: `threshold` credits, or
        `percent` of that type's last grant (following each grant), or neither (the default
        type: the service default applies; another type: no `credits.low`). Each type has its
        own threshold and flag, so each fires once per crossing (engine/thresholds.py)."""
        request = self._parse(SetLowCreditThreshold, user_id=user_id, threshold=threshold, percent=percent,
                              credit_type=credit_type, idempotency_key=idempotency_key)
        return self.run_keyed(request, LowCreditThreshold, partial(thresholds.set_low_threshold, request))

    # ------------------------------------------------------------------ auto top-ups

    def set_auto_topup(
        self,
        user_id: str,
        *,
        threshold: int,
        amount: int | None = None,
        target: int | None = None,
        credit_type: str = DEFAULT_CREDIT_TYPE,
        max_per_month: Decimal | str | int | None = None,
        unit_price: Decimal | str | int | None = None,
        currency: str = "USD",
        expires_after_days: int | None = None,
        idempotency_key: str | None = None,
        now: datetime | None = None,
    ) -> AutoTopupRule:
        """When a write leaves `available` of `credit_type` below `threshold`, buy `amount`
        credits (or enough to reach `target`) through the payment provider (docs/topups.md).
        An account already below it gets its top-up at once."""
        request = self._parse(
            SetAutoTopup, user_id=user_id, threshold=threshold, amount=amount, target=target,
            credit_type=credit_type, max_per_month=max_per_month, unit_price=unit_price, currency=currency,
            expires_after_days=expires_after_days, idempotency_key=idempotency_key)
        return topups.set_rule(self.run_keyed, request, now)

    def get_auto_topup(self, user_id: str, *, credit_type: str = DEFAULT_CREDIT_TYPE) -> AutoTopupRule | None:
        """The account's rule for `credit_type`, or None."""
        request = self._parse(GetAutoTopup, user_id=user_id, credit_type=credit_type)
        return topups.get_rule(self.engine, request.user_id, request.credit_type)

    def remove_auto_topup(
        self, user_id: str, *, credit_type: str = DEFAULT_CREDIT_TYPE, idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Drop the rule (a top-up in flight still finishes)."""
        request = self._parse(RemoveAutoTopup, user_id=user_id, credit_type=credit_type,
                              idempotency_key=idempotency_key)
        return topups.remove_rule(self.run_keyed, request)

    def list_topups(self, *, user_id: str | None = None, state: str | None = None, limit: int = 50) -> list[Topup]:
        """Top-ups, newest first (one account's, or in one state)."""
        request = self._parse(ListTopups, user_id=user_id, state=state, limit=limit)
        return topups.list_topups(self.engine, user_id=request.user_id,
                                  state=request.state.value if request.state else None, limit=request.limit)

    def get_topup(self, topup_id: int) -> Topup:
        return topups.get_topup(self.engine, topup_id)

    def charge_topup(self, topup_id: int) -> Topup:
        """Charge a requested top-up through the payment provider and grant what was paid
        (the worker's task; safe to run again or twice at once)."""
        return topups.charge(self.run, self.engine, self.payment_provider, topup_id)

    def complete_topup(
        self, topup_id: int, *, succeeded: bool, reference: str | None = None, error: str | None = None,
        idempotency_key: str | None = None,
    ) -> Topup:
        """Settle a `pending` top-up with the provider's late answer (its webhook calls this)."""
        request = self._parse(CompleteTopup, topup_id=topup_id, succeeded=succeeded, reference=reference,
                              error=error, idempotency_key=idempotency_key)
        return topups.complete(self.run_keyed, self.engine, request)

    def due_topups(self, now: datetime | None = None) -> list[int]:
        """Top-ups left requested or charging past `topup_stale_after_seconds` (beat's sweep)."""
        return topups.due_topups(self.engine, aware(now), self.topup_stale_after_seconds)

    def payment_provider(self) -> PaymentProvider:
        """The configured provider, loaded once (`payment_provider_error` if it cannot be)."""
        if not hasattr(self._payment_provider, "charge"):
            self._payment_provider = load_provider(cast(str | None, self._payment_provider))
        return cast(PaymentProvider, self._payment_provider)

    # ------------------------------------------------------------------ sweeps

    def expire_credits(self, now: datetime | None = None) -> int:
        """Expire every lot past its expiry; returns the number of expiry entries written.

        Safe to run twice or concurrently: each lot is re-read under its account's lock.
        Credits backing an active hold are not expired while the hold lasts; they expire
        on the first sweep after it ends (unless the commit consumed them).
        """
        at = aware(now)
        return self._swept("expire_credits", "expired", sweeps.expire_lots(self.engine, partial(self.run, now=at), at), at)

    def release_stale_reservations(self, now: datetime | None = None) -> int:
        """Expire every active hold past its TTL; returns how many were released."""
        at = aware(now)
        return self._swept("release_stale_reservations", "released", sweeps.expire_holds(self.engine, partial(self.run, now=at), at), at)

    def send_expiry_reminders(self, now: datetime | None = None) -> int:
        """Queue a credits.expiring event per lot entering a reminder window; returns how many.

        With reminder days (7, 1), a lot is reminded when it is 7 days from expiry and
        again at 1 day; a lot granted with 3 days left gets the 7-day reminder at once
        and the 1-day one later. Each (lot, day) is sent once, however often this runs.
        """
        at = aware(now)
        reminded = sweeps.remind(self.engine, partial(self.run, now=at), at, self.expiry_reminder_days)
        return self._swept("send_expiry_reminders", "reminded", reminded, at)

    def record_sweep(self, operation: str, counts: Mapping[str, int], *, now: datetime | None = None) -> None:
        """Store a `system` ledger record of what a sweep run did (one that did nothing
        leaves none: beat runs each sweep every minute)."""
        if not any(counts.values()):
            return
        at = aware(now)
        ledger_records.store(self.engine, [{
            "kind": "system", "operation": operation, "user_id": None, "code": None,
            "message": None, "details": dict(counts), "created_at": at,
        }])
        if self.ledger_file is not None:
            self.ledger_file.write_system(operation, dict(counts), at)

    def _swept(self, operation: str, name: str, count: int, at: datetime) -> int:
        self.record_sweep(operation, {name: count}, now=at)
        return count

    # ------------------------------------------------------------------ reads

    def get_ledger_records(
        self, *, kind: str | None = None, user_id: str | None = None, limit: int = 50,
        before: int | None = None,
    ) -> list[ledger_records.LedgerRecord]:
        """Refused operations (`error`) and sweep runs (`system`), newest first."""
        return ledger_records.read(self.engine, kind=kind, user_id=user_id, limit=limit, before=before)

    def get_user_credits_info(
        self, user_id: str, *, within_days: int | None = None, at: datetime | None = None,
        credit_type: str | None = None, now: datetime | None = None,
    ) -> CreditsInfo:
        """Balance, held and available credits, and how many expire within `within_days`;
        with `at`, the balance, held and available credits as they were at that moment.

        With `credit_type`, that type's figures; without, the default type's, and `by_type`
        with the totals of every type the account holds."""
        days = self.expiring_soon_days if within_days is None else within_days
        request = self._parse(GetExpiring, user_id=user_id, within_days=days, credit_type=credit_type)
        if at is not None:
            return self._credits_info_at(
                self._parse(GetCredits, user_id=user_id, at=at, credit_type=credit_type), days)
        asked = request.credit_type or DEFAULT_CREDIT_TYPE
        at = aware(now)
        horizon = at + timedelta(days=request.within_days)
        with Session(self.engine) as session:
            account = self._account(session, request.user_id)
            totals = {DEFAULT_CREDIT_TYPE: (account.balance, account.reserved)}
            waiting = account.pending_until is not None and account.pending_until > at
            for row in session.scalars(select(TypeBalance).where(TypeBalance.user_id == request.user_id)):
                totals[row.credit_type] = (row.balance, row.reserved)
                waiting = waiting or (row.pending_until is not None and row.pending_until > at)
            # grants not effective yet: in the total, not available
            pending = reports.pending_at(session, request.user_id, at) if waiting else {}
            # holds past their TTL no longer count, released or not yet
            stale = dict(session.execute(
                select(Hold.credit_type, func.sum(Hold.amount)).where(
                    Hold.user_id == request.user_id, Hold.status == ReservationStatus.ACTIVE.value,
                    Hold.expires_at <= at,
                ).group_by(Hold.credit_type)
            ).all()) if any(reserved > 0 for _balance, reserved in totals.values()) else {}
            expiring = session.scalar(
                select(func.coalesce(func.sum(Lot.remaining), 0)).where(
                    Lot.user_id == request.user_id, Lot.credit_type == asked, Lot.remaining > 0,
                    Lot.expires_at <= horizon,
                )
            )
            by_type = {
                name: TypeTotals(total=balance, reserved=reserved - int(stale.get(name) or 0),
                                 available=balance - reserved + int(stale.get(name) or 0)
                                 - int(pending.get(name) or 0),
                                 pending=int(pending.get(name) or 0))
                for name, (balance, reserved) in sorted(totals.items())
            }
            figures = by_type.get(asked) or TypeTotals(total=0, reserved=0, available=0)
            return CreditsInfo(
                user_id=account.user_id,
                total=figures.total,
                reserved=figures.reserved,
                available=figures.available,
                expiring_soon=int(expiring or 0),
                expiring_within_days=request.within_days,
                credit_type=asked,
                pending=figures.pending,
                by_type=by_type if request.credit_type is None else None,
            )

    def _credits_info_at(self, request: GetCredits, within_days: int) -> CreditsInfo:
        assert request.at is not None
        asked = request.credit_type or DEFAULT_CREDIT_TYPE
        with Session(self.engine) as session:
            account = self._account(session, request.user_id)
            balance, reserved = reports.balance_at(session, request.user_id, request.at, asked)
            last_effective = account.pending_until if asked == DEFAULT_CREDIT_TYPE else session.scalar(
                select(TypeBalance.pending_until).where(TypeBalance.user_id == request.user_id,
                                                        TypeBalance.credit_type == asked))
            # pending_until is the latest effective_at ever granted: none ahead of `at`, none pending then
            pending = (reports.pending_at(session, request.user_id, request.at, asked).get(asked, 0)
                       if last_effective is not None and last_effective > request.at else 0)
        return CreditsInfo(
            user_id=request.user_id, total=balance, reserved=reserved,
            available=balance - reserved - pending, expiring_soon=0, expiring_within_days=within_days,
            at=request.at, credit_type=asked, pending=pending,
        )

    def get_usage(
        self, user_id: str | None = None, *, start: datetime, end: datetime,
        granularity: str = "day", credit_type: str | None = None,
    ) -> list[UsagePeriod]:
        """Credits granted, consumed (and what they cost, from their lots' cost basis),
        expired, voided and refunded per day or month of [start, end): one user's, or every
        account's together when `user_id` is None; of one credit type, or of all."""
        request = self._parse(GetUsage, user_id=user_id, start=start, end=end, granularity=granularity,
                              credit_type=credit_type)
        with Session(self.engine) as session:
            if request.user_id is not None:
                self._account(session, request.user_id)
            return reports.usage(session, request.user_id, request.start, request.end,
                                 request.granularity, request.credit_type)

    def get_history(
        self,
        user_id: str,
        *,
        limit: int = 50,
        before: int | None = None,
        kinds: Sequence[str] | None = None,
        credit_type: str | None = None,
    ) -> list[LedgerEntry]:
        """Entries newest first (of every credit type, or of `credit_type` only); pass the last
        entry's id as `before` for the next page."""
        request = self._parse(
            GetHistory, user_id=user_id, limit=limit, before=before,
            kinds=list(kinds) if kinds is not None else None, credit_type=credit_type,
        )
        query = select(Entry).where(Entry.user_id == request.user_id)
        if request.before is not None:
            query = query.where(Entry.id < request.before)
        if request.kinds:
            query = query.where(Entry.kind.in_([kind.value for kind in request.kinds]))
        if request.credit_type is not None:
            query = query.where(Entry.credit_type == request.credit_type)
        query = query.order_by(Entry.id.desc()).limit(request.limit)
        with Session(self.engine) as session:
            self._account(session, request.user_id)
            return [entry_model(row) for row in session.scalars(query)]

    def get_expiring_credits(
        self, user_id: str, within_days: int = 7, *, credit_type: str | None = None,
        now: datetime | None = None,
    ) -> list[CreditLot]:
        """Lots with credits left that expire within `within_days`, soonest first (of
        `credit_type` only, or of every type)."""
        request = self._parse(GetExpiring, user_id=user_id, within_days=within_days, credit_type=credit_type)
        horizon = aware(now) + timedelta(days=request.within_days)
        query = select(Lot).where(Lot.user_id == request.user_id, Lot.remaining > 0, Lot.expires_at <= horizon)
        if request.credit_type is not None:
            query = query.where(Lot.credit_type == request.credit_type)
        with Session(self.engine) as session:
            self._account(session, request.user_id)
            lots = session.scalars(query.order_by(Lot.expires_at, Lot.id))
            return [CreditLot.model_validate(lot, from_attributes=True) for lot in lots]

    def get_reservation(self, reservation_id: str) -> Reservation:
        request = self._parse(GetReservation, reservation_id=reservation_id)
        with Session(self.engine) as session:
            hold = session.get(Hold, request.reservation_id)
            if hold is None:
                raise UnknownReservation(f"no reservation {reservation_id!r}", reservation_id=reservation_id)
            return Reservation.model_validate(hold, from_attributes=True)

    # ------------------------------------------------------------------ units of work

    def run(self, decide: Callable[[UnitOfWork], T], *, now: datetime | None = None) -> T:
        """Run `decide` in one transaction and write what it decided; rerun on conflicts.

        `decide` must be safe to rerun from scratch. After the commit, the entries go to
        the ledger file and `on_events` hears how many events were written.
        """
        at = aware(now)

        def work(connection: Connection) -> tuple[T, UnitOfWork]:
            uow = UnitOfWork(connection, at, low_credit_threshold=self.low_credit_threshold)
            value = decide(uow)
            topups.request_due(uow)  # the write that crossed a threshold asks for its top-up
            write(uow)
            for statement in uow.after_write:
                statement()
            uow.flush()
            return value, uow

        with collector_paused():
            value, uow = run_transaction(self.engine, work)
        self._committed(uow)
        return value

    def run_keyed(
        self,
        request: Request,
        result_model: type[R],
        decide: Callable[[UnitOfWork, str], R],
        *,
        now: datetime | None = None,
    ) -> R:
        """Apply `decide` once per idempotency key, in one transaction.

        A repeat of the same request returns the stored result; the same key with a
        different request raises `IdempotencyConflict`. Failures change nothing.
        """
        key = request.idempotency_key or _fresh_key()
        fingerprint = request.fingerprint()

        def keyed(uow: UnitOfWork) -> R:
            previous = None if request.idempotency_key is None else uow.known_operations([key]).get(key)
            if previous is not None:
                return result_model.model_validate(_replay(previous, key, fingerprint))
            result = decide(uow, key)
            uow.record_operation(key, type(request).__name__, fingerprint, result.model_dump(mode="json"))
            return result

        try:
            return self.run(keyed, now=now)
        except CreditError as exc:
            self._log_error(type(request).__name__, request.model_dump(mode="json"), exc)
            raise

    def _apply_one(self, request: Request, result_model: type[R], now: datetime | None) -> R:
        """A single operation: a batch of one whose refusal is raised."""
        (outcome,) = self._apply([request], None, aware(now))
        if isinstance(outcome, CreditError):
            raise outcome
        return result_model.model_validate(outcome)

    def _apply(
        self, requests: Sequence[Request | CreditError], default_keys: Sequence[str] | None, at: datetime
    ) -> list[dict[str, Any] | CreditError]:
        """The one write path of the credit operations: each item's result record or error."""
        batch = _Batch(requests, default_keys)
        sources, refused = self.run(partial(self._decide_batch, batch), now=at)
        self._log_errors([(type(request).__name__, request.model_dump(mode="json"), error)
                          for request, error in refused])
        return [entry_record(source) if isinstance(source, rules.Posting) else source for source in sources]

    def _decide_batch(
        self, batch: _Batch, uow: UnitOfWork,
    ) -> tuple[list[ResultSource | CreditError], list[tuple[Request, CreditError]]]:
        """Lock what the batch touches, then decide its items in order (one unit of work)."""
        requests, keys, fingerprints = batch.requests, batch.keys, batch.fingerprints
        # Where the lots' query also reads the operation rows, takes the entry ids and finds
        # stale holds (PostgreSQL), a reserve or a release reads through it too (drawing
        # nothing; a release's lots past their expiry tell rollover whether to look further).
        reading = batch.deducted or batch.commits or ((batch.reserving or batch.releases)
                                                      and uow.backend.folds_reads)
        unborn = uow.lock(batch.users, creating=batch.adding, hold_ids=batch.hold_ids,
                          with_lots=batch.drawing if reading else False, operation_keys=batch.chosen,
                          entry_ids=len(batch.valid), lot_ids=batch.grants, stale_holds=True)
        uow.expire_stale_holds()  # before the items: a hold past its TTL no longer counts
        if batch.typed:
            uow.load_types(batch.typed)
        known = uow.known_operations(batch.chosen)
        results: list[ResultSource | CreditError | None] = [None] * len(requests)
        refused: list[tuple[Request, CreditError]] = []
        applied: dict[str, int] = {}  # key -> the item that applied it
        for index, request in enumerate(requests):
            if isinstance(request, CreditError):
                results[index] = request
                continue
            key, fingerprint = keys[index], fingerprints[index]
            try:
                if key in applied:  # the same key earlier in this batch
                    first = applied[key]
                    if fingerprints[first] != fingerprint:
                        raise _key_conflict(key, type(requests[first]).__name__)
                    results[index] = results[first]
                    continue
                previous = known.get(key)
                if previous is not None:
                    results[index] = _replay(previous, key, fingerprint)
                else:
                    if isinstance(request, (DeductCredits, ReserveCredits)) and request.user_id in unborn:
                        raise UnknownUser(f"no account for user {request.user_id!r}", user_id=request.user_id)
                    source = self._decide(uow, request, key)
                    results[index] = uow.record_operation(key, type(request).__name__, fingerprint, source).source
                    if isinstance(request, AddCredits):
                        unborn.discard(request.user_id)
            except CreditError as exc:
                results[index] = exc
                refused.append((request, exc))
                continue
            applied[key] = index
        for user_id in unborn:  # no grant succeeded for them: the batch leaves no trace
            uow.drop_account(user_id)
        return [result for result in results if result is not None], refused

    def _decide(self, uow: UnitOfWork, request: Request, key: str) -> ResultSource:
        """One credit operation, decided by the rules; its posting, or its reservation's record."""
        at = uow.at
        if isinstance(request, DeductCredits):
            return uow.post(rules.deduct(uow.account(request.user_id, request.credit_type), request.amount,
                                         at=at, key=key,
                                         description=request.description, metadata=request.metadata))
        if isinstance(request, AddCredits):
            return uow.post(rules.grant(
                uow.account(request.user_id, request.credit_type), request.amount, at=at, key=key,
                expires_at=request.expires_at,
                priority=request.priority or 0, source=request.source.value, description=request.description,
                metadata=request.metadata, effective_at=request.effective_at,
                unit_cost=request.cost_basis.amount if request.cost_basis else None,
                currency=request.cost_basis.currency if request.cost_basis else None,
            ))
        if isinstance(request, ReserveCredits):
            account = uow.account(request.user_id, request.credit_type)  # locked since the unit of work began
            expires_at = rules.hold_expiry(
                at, checked_at=max(at, utcnow()), ttl_seconds=request.ttl_seconds,
                requested_at=request.requested_at, deadline=request.deadline,
            )
            posting = uow.post(rules.hold(
                account, request.amount, hold_id=new_hold_id(), at=at,
                expires_at=expires_at, key=key, description=request.description,
                metadata=request.metadata,
            ))
            assert posting.hold is not None
            return reservation_record(posting.hold)
        if isinstance(request, CommitReservation):
            hold = uow.hold(request.reservation_id)
            account = uow.account(hold.user_id, hold.credit_type)
            posting = uow.post(rules.settle(
                account, hold, request.amount, policy=self.overage_policy,
                at=at, key=key,
                description=request.description, metadata=request.metadata,
            ))
            rollover.after_hold(uow, account, key)  # credits it held past a boundary roll or expire now
            return posting
        if isinstance(request, ReleaseReservation):
            hold = uow.hold(request.reservation_id)
            account = uow.account(hold.user_id, hold.credit_type)
            posting = uow.post(rules.release(account, hold, at=at, key=key))
            rollover.after_hold(uow, account, key)
            return posting
        raise ValidationFailed(f"{type(request).__name__} is not a credit operation")

    def _committed(self, uow: UnitOfWork) -> None:
        """After a commit: copy the entries to the ledger file and wake the event relay."""
        if self.ledger_file is not None and uow.postings:
            self.ledger_file.write_records(entry_record(posting) for posting in uow.postings)
        if self.on_events is not None and uow.events:
            self.on_events(len(uow.events))
        for hook in uow.commit_hooks:
            hook()

    # ------------------------------------------------------------------ machinery

    def _parse(self, model: type[Any], **fields: Any) -> Any:
        try:
            return parse(model, fields)
        except ValidationFailed as exc:
            self._log_error(model.__name__, fields, exc)
            raise

    def _log_error(self, operation: str, request: dict[str, Any], error: CreditError) -> None:
        self._log_errors([(operation, request, error)])

    def _log_errors(self, refused: Sequence[tuple[str, dict[str, Any], CreditError]]) -> None:
        """Refusals to the ledger: `error` records in the database and lines in the file."""
        if not refused:
            return
        at = utcnow()
        jsonable = [(operation, _jsonable(request), error) for operation, request, error in refused]
        records = []
        for operation, request, error in jsonable:
            user_id = request.get("user_id")
            records.append({
                "kind": "error", "operation": operation, "code": error.code, "message": error.message,
                "user_id": user_id if isinstance(user_id, str) and len(user_id) <= MAX_USER_ID_LENGTH else None,
                "details": {"request": request, "error": error.to_dict()}, "created_at": at,
            })
        if self.ledger_file is not None:
            self.ledger_file.write_errors(jsonable, at)
        ledger_records.store(self.engine, records)

    @staticmethod
    def _account(session: Session, user_id: str) -> Account:
        account = session.get(Account, user_id)
        if account is None:
            raise UnknownUser(f"no account for user {user_id!r}", user_id=user_id)
        return account


class _Batch:
    """What a batch's items need before its unit of work locks: keys, fingerprints, the
    accounts and holds they touch, and how much each account's draws may take."""

    def __init__(self, requests: Sequence[Request | CreditError], default_keys: Sequence[str] | None) -> None:
        """One pass over the items (a metered request makes a batch of one, twice)."""
        self.requests = requests
        self.keys: list[str] = []
        self.chosen: list[str] = []  # the keys given: a fresh key cannot have been used
        self.fingerprints: list[str] = []
        self.valid: list[Request] = []
        self.adding: set[str] = set()
        self.grants = 0
        self.users: set[str] = set()
        self.hold_ids: set[str] = set()
        self.deducted: dict[str, int] = {}
        self.commits: list[CommitReservation] = []
        self.releases: list[str] = []
        self.reserving = False
        self.typed: set[tuple[str, str]] = set()
        """The (user, credit type) pairs of other types than the default, read up front."""
        for index, request in enumerate(requests):
            if not isinstance(request, Request):  # refused while parsing
                key = default_keys[index] if default_keys else None
                self.keys.append(key or _fresh_key())
                self.fingerprints.append("")
                continue
            key = request.idempotency_key or (default_keys[index] if default_keys else None)
            if key is None:
                self.keys.append(_fresh_key())
            else:
                self.keys.append(key)
                self.chosen.append(key)
            self.fingerprints.append(request.fingerprint())
            self.valid.append(request)
            if isinstance(request, CommitReservation):
                self.hold_ids.add(request.reservation_id)
                self.commits.append(request)
                continue
            if isinstance(request, ReleaseReservation):
                self.hold_ids.add(request.reservation_id)
                self.releases.append(request.reservation_id)
                continue
            if isinstance(request, AddCredits):
                self.adding.add(request.user_id)
                self.grants += 1
            elif isinstance(request, DeductCredits):
                self.users.add(request.user_id)
                if request.credit_type == DEFAULT_CREDIT_TYPE:  # another type's lots come with its totals
                    self.deducted[request.user_id] = self.deducted.get(request.user_id, 0) + request.amount
                else:
                    self.deducted.setdefault(request.user_id, 0)
            elif isinstance(request, ReserveCredits):
                self.users.add(request.user_id)
                self.reserving = True
            else:
                continue
            if request.credit_type != DEFAULT_CREDIT_TYPE:
                self.typed.add((request.user_id, request.credit_type))
        self.drawing = Drawing(self.deducted, tuple((commit.reservation_id, commit.amount)
                                                    for commit in self.commits)
                               + tuple((hold_id, 0) for hold_id in self.releases))
        """At most what each account's draws can take: its deducts and its commits' charges (a
        release charges nothing, but its owner's lots past their expiry are read)."""


def _entry_for_refund(connection: Connection, entry_id: int) -> tuple[Any, ...] | None:
    """(id, user_id, kind, draws, credit_type) of a ledger entry, or None."""
    rows = backend_for(connection).rows_where_in(
        connection, cast(Table, Entry.__table__), ("id", "user_id", "kind", "draws", "credit_type"), "id",
        [entry_id])
    return tuple(rows[0]) if rows else None


def _json_list(value: Any) -> list[dict[str, Any]]:
    """A JSON column as the driver gave it: parsed already, or text (the raw array path)."""
    if value is None:
        return []
    return list(json.loads(value) if isinstance(value, str | bytes) else value)


def embedded_tables(database: object) -> bool:
    """Whether an engine made for `database` creates its own tables by default: SQLite URLs."""
    return isinstance(database, str) and make_url(database).get_backend_name() == "sqlite"


def _fresh_key() -> str:
    """The key of a request that brought none: a random UUID, so never looked up."""
    return f"auto:{uuid.uuid4()}"


def _replay(previous: StoredOperation, key: str, fingerprint: str) -> dict[str, Any]:
    """The stored result of a repeated request, or the conflict of a reused key."""
    if previous.fingerprint != fingerprint:
        raise _key_conflict(key, previous.kind)
    return previous.result


def _key_conflict(key: str, operation: str) -> IdempotencyConflict:
    return IdempotencyConflict(
        f"idempotency key {key!r} was already used for a different request",
        idempotency_key=key,
        operation=operation,
    )


def _jsonable(request: dict[str, Any]) -> dict[str, Any]:
    """A refused request as the ledger records it; a value nested too deep to encode is
    recorded as a note (it was refused for that)."""
    return {
        key: value.isoformat() if isinstance(value, datetime)
        else f"(nested deeper than {MAX_METADATA_DEPTH}: not recorded)"
        if nesting_depth(value) > MAX_METADATA_DEPTH else value
        for key, value in request.items()
    }


def entry_model(row: Entry) -> LedgerEntry:
    return LedgerEntry(
        id=row.id,
        user_id=row.user_id,
        kind=EntryKind(row.kind),
        amount=row.amount,
        held=row.held,
        balance_after=row.balance_after,
        reserved_after=row.reserved_after,
        available_after=row.balance_after - row.reserved_after,
        lot_id=row.lot_id,
        reservation_id=row.reservation_id,
        draws=row.draws or [],
        description=row.description,
        metadata=row.entry_metadata,
        idempotency_key=row.idempotency_key,
        created_at=row.created_at,
        credit_type=row.credit_type,
    )
