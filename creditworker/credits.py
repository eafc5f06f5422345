"""The credit engine: lots, reservations, ledger entries and idempotency over SQL.

It knows nothing of Celery, HTTP or the CLI; those are thin adapters that call
`CreditService`. Every write runs in one transaction that locks the account row first, so
operations on one account serialise and different accounts never wait on each other.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from creditworker.contract import (
    MAX_BALANCE,
    AddCredits,
    BatchOutcome,
    CommitReservation,
    CreditLot,
    CreditsInfo,
    DeductCredits,
    EntryKind,
    GetCredits,
    GetExpiring,
    GetHistory,
    GetReservation,
    LedgerEntry,
    OveragePolicy,
    ReleaseReservation,
    Request,
    Reservation,
    ReservationStatus,
    ReserveCredits,
    parse,
    parse_batch_item,
)
from creditworker.errors import (
    CreditError,
    IdempotencyConflict,
    InsufficientCredits,
    ReservationNotActive,
    UnknownReservation,
    UnknownUser,
    ValidationFailed,
)
from creditworker.events import CreditsExpired, CreditsExpiring, CreditsLow, ReservationExpired
from creditworker.ledger_file import LedgerFile
from creditworker.outbox import add_event
from creditworker.storage.database import (
    ensure_account,
    insert_if_absent,
    lock_account,
    lock_accounts,
    make_engine,
    run_transaction,
)
from creditworker.storage.tables import (
    Account,
    Entry,
    ExpiryReminder,
    Hold,
    Lot,
    Operation,
)

if TYPE_CHECKING:
    from creditworker.settings import Settings

R = TypeVar("R", bound=BaseModel)

SWEEP_CHUNK = 500
"""Rows a sweep handles per transaction, so no sweep holds locks over a whole table."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _aware(now: datetime | None) -> datetime:
    if now is None:
        return utcnow()
    return now if now.tzinfo else now.replace(tzinfo=timezone.utc)


class _Change:
    """What one transaction wrote: entry rows for the ledger file, events for the outbox."""

    def __init__(self) -> None:
        self.rows: list[Entry] = []
        self.events = 0


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
    ) -> None:
        self.engine = make_engine(database) if isinstance(database, str) else database
        self.ledger_file = LedgerFile(ledger_path) if ledger_path else None
        self.overage_policy = OveragePolicy(overage_policy)
        self.expiring_soon_days = expiring_soon_days
        self.low_credit_threshold = low_credit_threshold
        self.expiry_reminder_days = sorted({int(days) for days in expiry_reminder_days if days > 0})
        self.on_events = on_events

    @classmethod
    def from_settings(
        cls, settings: Settings | None = None, *, database: str | Engine | None = None,
        on_events: Callable[[int], None] | None = None,
    ) -> CreditService:
        """The engine as `settings` (default: the environment) configure it; `database`
        overrides the URL."""
        from creditworker.settings import get_settings

        settings = settings or get_settings()
        return cls(
            database or settings.database_url,
            ledger_path=settings.ledger_path,
            overage_policy=settings.overage_policy,
            expiring_soon_days=settings.expiring_soon_days,
            low_credit_threshold=settings.low_credit_threshold,
            expiry_reminder_days=settings.expiry_reminder_days,
            on_events=on_events,
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
        now: datetime | None = None,
    ) -> LedgerEntry:
        """Grant a lot of credits; a negative balance (from an overage) is paid off first."""
        request = self._parse(
            AddCredits,
            user_id=user_id,
            amount=amount,
            expires_at=expires_at,
            priority=priority,
            source=source,
            description=description,
            metadata=metadata,
            idempotency_key=idempotency_key,
        )
        return self._apply(request, LedgerEntry, lambda s, t, c, k: self._add(s, t, c, k, request), now)

    def deduct_credits(
        self,
        user_id: str,
        amount: int,
        *,
        description: str | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        now: datetime | None = None,
    ) -> LedgerEntry:
        """Consume credits now, drawing lots by priority, then soonest expiry, then age."""
        request = self._parse(
            DeductCredits,
            user_id=user_id,
            amount=amount,
            description=description,
            metadata=metadata,
            idempotency_key=idempotency_key,
        )
        return self._apply(request, LedgerEntry, lambda s, t, c, k: self._deduct(s, t, c, k, request), now)

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
        now: datetime | None = None,
    ) -> Reservation:
        """Hold credits out of `available` until committed, released or past their TTL.

        The TTL runs from `requested_at` when the caller asked earlier than now; a caller
        that stops waiting at `deadline` gets no hold applied after it."""
        fields: dict[str, Any] = {
            "user_id": user_id,
            "amount": amount,
            "description": description,
            "metadata": metadata,
            "idempotency_key": idempotency_key,
            "requested_at": requested_at,
            "deadline": deadline,
        }
        if ttl_seconds is not None:
            fields["ttl_seconds"] = ttl_seconds
        request = self._parse(ReserveCredits, **fields)
        return self._apply(request, Reservation, lambda s, t, c, k: self._reserve(s, t, c, k, request), now)

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
            CommitReservation,
            reservation_id=reservation_id,
            amount=amount,
            description=description,
            metadata=metadata,
            idempotency_key=idempotency_key,
        )
        return self._apply(request, LedgerEntry, lambda s, t, c, k: self._commit(s, t, c, k, request), now)

    def release_reservation(
        self,
        reservation_id: str,
        *,
        idempotency_key: str | None = None,
        now: datetime | None = None,
    ) -> LedgerEntry:
        """Give held credits back to `available` without charging anything."""
        request = self._parse(
            ReleaseReservation, reservation_id=reservation_id, idempotency_key=idempotency_key
        )
        return self._apply(request, LedgerEntry, lambda s, t, c, k: self._release(s, t, c, k, request), now)

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
        A refused item rolls back only itself (a savepoint) and reports its typed error;
        the others commit. `default_keys[i]` keys an item that has no idempotency key.
        """
        at = _aware(now)
        requests: list[Request | CreditError] = []
        for item in operations:
            try:
                requests.append(item if isinstance(item, Request) else parse_batch_item(item))
            except CreditError as exc:
                requests.append(exc)
        keys = [
            (r.idempotency_key if isinstance(r, Request) else None)
            or (default_keys[i] if default_keys else f"auto:{uuid.uuid4()}")
            for i, r in enumerate(requests)
        ]

        def work(session: Session) -> tuple[list[BatchOutcome], _Change, list[tuple[Request, CreditError]]]:
            change = _Change()
            valid = [r for r in requests if isinstance(r, Request)]
            unborn = self._lock_batch_accounts(session, valid, at)
            _cache_lots(session, {r.user_id for r in valid if isinstance(r, DeductCredits)})
            known = {
                row.idempotency_key: row
                for row in session.scalars(select(Operation).where(Operation.idempotency_key.in_(set(keys))))
            }
            outcomes: list[BatchOutcome | None] = [None] * len(requests)
            refused: list[tuple[Request, CreditError]] = []
            applied: dict[str, tuple[str, int]] = {}  # key -> (fingerprint, item that applied it)
            repeats: list[tuple[int, int]] = []
            deferred: list[tuple[int, Request, str, BaseModel | Entry]] = []
            for index, (request, key) in enumerate(zip(requests, keys)):
                if isinstance(request, CreditError):
                    outcomes[index] = BatchOutcome(ok=False, error=request.to_dict())
                    continue
                if key in applied:
                    fingerprint, first = applied[key]
                    if fingerprint == request.fingerprint():
                        repeats.append((index, first))
                    else:
                        conflict = _key_conflict(key, type(requests[first]).__name__)
                        outcomes[index] = BatchOutcome(ok=False, error=conflict.to_dict())
                        refused.append((request, conflict))
                    continue
                user_id = getattr(request, "user_id", None)
                previous = known.get(key)
                try:
                    if user_id in unborn and not isinstance(request, AddCredits):
                        # created up front only to keep the lock order; it exists once an add succeeds
                        raise UnknownUser(f"no account for user {user_id!r}", user_id=user_id)
                    outcome = self._batch_item(session, request, key, previous, at, change)
                except CreditError as exc:
                    outcomes[index] = BatchOutcome(ok=False, error=exc.to_dict())
                    refused.append((request, exc))
                    continue
                if previous is None and isinstance(request, WITHOUT_SAVEPOINT):
                    deferred.append((index, request, key, outcome))
                else:  # a savepoint step returns its result, its operation row written
                    assert isinstance(outcome, BaseModel)
                    outcomes[index] = BatchOutcome(ok=True, result=outcome.model_dump(mode="json"))
                applied[key] = (request.fingerprint(), index)
                if isinstance(request, AddCredits):
                    unborn.discard(request.user_id)
            for user_id in unborn:  # no add succeeded for them: the batch leaves no trace
                session.delete(session.get(Account, user_id))
            session.flush()
            for index, request, key, written in deferred:
                result = entry_model(written) if isinstance(written, Entry) else written
                self._record_operation(session, request, key, result, at)
                outcomes[index] = BatchOutcome(ok=True, result=result.model_dump(mode="json"))
            for index, first in repeats:
                outcomes[index] = outcomes[first]
            session.flush()
            return [outcome for outcome in outcomes if outcome is not None], change, refused

        outcomes, change, refused = run_transaction(self.engine, work)
        self._committed(change)
        for request, error in refused:
            self._log_error(type(request).__name__, request.model_dump(mode="json"), error)
        return outcomes

    def _batch_item(
        self, session: Session, request: Request, key: str, previous: Operation | None,
        at: datetime, change: _Change,
    ) -> BaseModel | Entry:
        """Apply one batch item, or raise its typed error having changed nothing.

        A new deduct or reserve refuses before it changes anything, so it runs without a
        savepoint and returns its unwritten entry or its reservation (the batch writes all
        rows, and the operation rows, together). Anything else runs in a savepoint and
        returns its result.
        """
        model, method = BATCH_STEPS[type(request)]
        if previous is None and isinstance(request, WITHOUT_SAVEPOINT):
            step: Callable[..., BaseModel | Entry] = getattr(self, method)
            return step(session, at, change, key, request)
        rows, events = len(change.rows), change.events
        try:
            with session.begin_nested():
                return self._apply_in(
                    session, request, key, model,
                    lambda s, t, c, k: getattr(self, method)(s, t, c, k, request), at, change, previous,
                )
        except CreditError:
            del change.rows[rows:]
            change.events = events
            raise

    @staticmethod
    def _lock_batch_accounts(session: Session, requests: Sequence[Request], at: datetime) -> set[str]:
        """Create the accounts adds need and lock every account involved, in sorted order.

        Returns the accounts created here, which do not exist for the batch's other
        operations until one of its adds succeeds."""
        hold_ids = [r.reservation_id for r in requests if isinstance(r, (CommitReservation, ReleaseReservation))]
        users = {r.user_id for r in requests if isinstance(r, (AddCredits, DeductCredits, ReserveCredits))}
        if hold_ids:
            users |= set(session.scalars(select(Hold.user_id).where(Hold.id.in_(hold_ids))))
        adding = {r.user_id for r in requests if isinstance(r, AddCredits)}
        created = {user_id for user_id in sorted(adding) if ensure_account(session, user_id, at)}
        lock_accounts(session, users)
        return created

    # ------------------------------------------------------------------ sweeps

    def expire_credits(self, now: datetime | None = None) -> int:
        """Expire every lot past its expiry; returns the number of expiry entries written.

        Safe to run twice or concurrently: each lot is re-read under its account's lock.
        Credits backing an active hold are not expired while the hold lasts; they expire
        on the first sweep after it ends (unless the commit consumed them).
        """
        at = _aware(now)
        written = 0
        after_id = 0
        while True:
            lot_ids = self._scalars(
                select(Lot.id)
                .where(Lot.expires_at <= at, Lot.remaining > 0, Lot.id > after_id)
                .order_by(Lot.id)
                .limit(SWEEP_CHUNK)
            )
            if not lot_ids:
                return written
            after_id = lot_ids[-1]
            written += len(self._write(lambda s, c: self._expire_lots(s, at, c, lot_ids)).rows)

    def release_stale_reservations(self, now: datetime | None = None) -> int:
        """Expire every active hold past its TTL; returns how many were released."""
        at = _aware(now)
        released = 0
        after_id = ""
        while True:
            hold_ids = self._scalars(
                select(Hold.id)
                .where(
                    Hold.status == ReservationStatus.ACTIVE.value,
                    Hold.expires_at <= at,
                    Hold.id > after_id,
                )
                .order_by(Hold.id)
                .limit(SWEEP_CHUNK)
            )
            if not hold_ids:
                return released
            after_id = hold_ids[-1]
            released += len(self._write(lambda s, c: self._expire_holds(s, at, c, hold_ids)).rows)

    def send_expiry_reminders(self, now: datetime | None = None) -> int:
        """Queue a credits.expiring event per lot entering a reminder window; returns how many.

        With reminder days (7, 1), a lot is reminded when it is 7 days from expiry and
        again at 1 day; a lot granted with 3 days left gets the 7-day reminder at once
        and the 1-day one later. Each (lot, day) is sent once, however often this runs.
        """
        if not self.expiry_reminder_days:
            return 0
        at = _aware(now)
        horizon = at + timedelta(days=self.expiry_reminder_days[-1])
        sent = 0
        after_id = 0
        while True:
            lot_ids = self._scalars(
                select(Lot.id)
                .where(
                    Lot.expires_at > at,
                    Lot.expires_at <= horizon,
                    Lot.remaining > 0,
                    Lot.id > after_id,
                )
                .order_by(Lot.id)
                .limit(SWEEP_CHUNK)
            )
            if not lot_ids:
                return sent
            after_id = lot_ids[-1]
            sent += self._write(lambda s, c: self._remind(s, at, c, lot_ids)).events

    def set_low_credit_threshold(self, user_id: str, threshold: int | None) -> None:
        """Set the account's low-credit threshold (None: the service default applies)."""
        request = self._parse(GetCredits, user_id=user_id)
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0
        ):
            raise ValidationFailed("threshold must be a non-negative integer or None")

        def work(session: Session) -> None:
            account = self._locked_account(session, request.user_id)
            account.low_credit_threshold = threshold
            account.low_credit_alerted = False

        run_transaction(self.engine, work)

    # ------------------------------------------------------------------ reads

    def get_user_credits_info(
        self, user_id: str, *, within_days: int | None = None, now: datetime | None = None
    ) -> CreditsInfo:
        """Balance, held and available credits, and how many expire within `within_days`."""
        days = self.expiring_soon_days if within_days is None else within_days
        request = self._parse(GetExpiring, user_id=user_id, within_days=days)
        horizon = _aware(now) + timedelta(days=request.within_days)
        with Session(self.engine) as session:
            account = self._account(session, request.user_id)
            expiring = session.scalar(
                select(func.coalesce(func.sum(Lot.remaining), 0)).where(
                    Lot.user_id == request.user_id, Lot.remaining > 0, Lot.expires_at <= horizon
                )
            )
            return CreditsInfo(
                user_id=account.user_id,
                total=account.balance,
                reserved=account.reserved,
                available=account.balance - account.reserved,
                expiring_soon=int(expiring or 0),
                expiring_within_days=request.within_days,
            )

    def get_history(
        self,
        user_id: str,
        *,
        limit: int = 50,
        before: int | None = None,
        kinds: Sequence[str] | None = None,
    ) -> list[LedgerEntry]:
        """Entries newest first; pass the last entry's id as `before` for the next page."""
        request = self._parse(
            GetHistory,
            user_id=user_id,
            limit=limit,
            before=before,
            kinds=list(kinds) if kinds is not None else None,
        )
        query = select(Entry).where(Entry.user_id == request.user_id)
        if request.before is not None:
            query = query.where(Entry.id < request.before)
        if request.kinds:
            query = query.where(Entry.kind.in_([kind.value for kind in request.kinds]))
        query = query.order_by(Entry.id.desc()).limit(request.limit)
        with Session(self.engine) as session:
            self._account(session, request.user_id)
            return [entry_model(row) for row in session.scalars(query)]

    def get_expiring_credits(
        self, user_id: str, within_days: int = 7, *, now: datetime | None = None
    ) -> list[CreditLot]:
        """Lots with credits left that expire within `within_days`, soonest first."""
        request = self._parse(GetExpiring, user_id=user_id, within_days=within_days)
        horizon = _aware(now) + timedelta(days=request.within_days)
        with Session(self.engine) as session:
            self._account(session, request.user_id)
            lots = session.scalars(
                select(Lot)
                .where(
                    Lot.user_id == request.user_id, Lot.remaining > 0, Lot.expires_at <= horizon
                )
                .order_by(Lot.expires_at, Lot.id)
            )
            return [lot_model(lot) for lot in lots]

    def get_reservation(self, reservation_id: str) -> Reservation:
        request = self._parse(GetReservation, reservation_id=reservation_id)
        with Session(self.engine) as session:
            hold = session.get(Hold, request.reservation_id)
            if hold is None:
                raise UnknownReservation(
                    f"no reservation {reservation_id!r}", reservation_id=reservation_id
                )
            return reservation_model(hold)

    # ------------------------------------------------------------------ machinery

    def _parse(self, model: type[Any], **fields: Any) -> Any:
        try:
            return parse(model, fields)
        except ValidationFailed as exc:
            self._log_error(model.__name__, fields, exc)
            raise

    def _apply(
        self,
        request: Request,
        result_model: type[R],
        operation: Callable[[Session, datetime, _Change, str], BaseModel | Entry],
        now: datetime | None,
    ) -> R:
        """Apply `operation` once per idempotency key, in one transaction.

        A repeat of the same request returns the stored result; the same key with a
        different request raises `IdempotencyConflict`. Failures change nothing.
        """
        key = request.idempotency_key or f"auto:{uuid.uuid4()}"
        at = _aware(now)

        def work(session: Session) -> tuple[R, _Change]:
            change = _Change()
            return self._apply_in(session, request, key, result_model, operation, at, change), change

        try:
            result, change = run_transaction(self.engine, work)
        except CreditError as exc:
            self._log_error(type(request).__name__, request.model_dump(mode="json"), exc)
            raise
        self._committed(change)
        return result

    def _apply_in(
        self,
        session: Session,
        request: Request,
        key: str,
        result_model: type[R],
        operation: Callable[[Session, datetime, _Change, str], BaseModel | Entry],
        at: datetime,
        change: _Change,
        previous: Operation | None | bool = False,
    ) -> R:
        """One keyed operation inside the caller's transaction (`previous`: a prefetched row)."""
        fingerprint = request.fingerprint()
        if previous is False:
            previous = session.get(Operation, key)
        if isinstance(previous, Operation):
            if previous.fingerprint != fingerprint:
                raise _key_conflict(key, previous.kind)
            return result_model.model_validate(previous.result)
        outcome = operation(session, at, change, key)
        session.flush()
        result = result_model.model_validate(
            entry_model(outcome) if isinstance(outcome, Entry) else outcome
        )
        self._record_operation(session, request, key, result, at)
        session.flush()
        return result

    @staticmethod
    def _record_operation(
        session: Session, request: Request, key: str, result: BaseModel, at: datetime
    ) -> None:
        """The row that makes `key` replay `result` instead of applying `request` again."""
        session.add(
            Operation(
                idempotency_key=key,
                kind=type(request).__name__,
                fingerprint=request.fingerprint(),
                user_id=getattr(request, "user_id", None) or getattr(result, "user_id", None),
                result=result.model_dump(mode="json"),
                created_at=at,
            )
        )

    def _write(self, sweep: Callable[[Session, _Change], None]) -> _Change:
        """Run a sweep step in one transaction; returns what it wrote."""

        def work(session: Session) -> _Change:
            change = _Change()
            sweep(session, change)
            session.flush()
            return change

        change = run_transaction(self.engine, work)
        self._committed(change)
        return change

    def _committed(self, change: _Change) -> None:
        """After a commit: copy the entries to the ledger file and wake the event relay."""
        if self.ledger_file is not None and change.rows:
            self.ledger_file.write_entries(entry_model(row) for row in change.rows)
        if self.on_events is not None and change.events:
            self.on_events(change.events)

    def _emit(self, session: Session, change: _Change, event: Any) -> None:
        add_event(session, event)
        change.events += 1

    def _scalars(self, query: Any) -> list[Any]:
        with Session(self.engine) as session:
            return list(session.scalars(query))

    def _log_error(self, operation: str, request: dict[str, Any], error: CreditError) -> None:
        if self.ledger_file is not None:
            self.ledger_file.write_error(operation, _jsonable(request), error)

    @staticmethod
    def _account(session: Session, user_id: str) -> Account:
        account = session.get(Account, user_id)
        if account is None:
            raise UnknownUser(f"no account for user {user_id!r}", user_id=user_id)
        return account

    @staticmethod
    def _locked_account(session: Session, user_id: str) -> Account:
        account = lock_account(session, user_id)
        if account is None:
            raise UnknownUser(f"no account for user {user_id!r}", user_id=user_id)
        return account

    def _record(
        self,
        session: Session,
        change: _Change,
        account: Account,
        *,
        kind: EntryKind,
        key: str,
        at: datetime,
        amount: int = 0,
        held: int = 0,
        lot_id: int | None = None,
        reservation_id: str | None = None,
        draws: list[dict[str, int]] | None = None,
        description: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Entry:
        account.balance += amount
        account.reserved += held
        account.updated_at = at
        row = Entry(
            user_id=account.user_id,
            kind=kind.value,
            amount=amount,
            held=held,
            balance_after=account.balance,
            reserved_after=account.reserved,
            lot_id=lot_id,
            reservation_id=reservation_id,
            draws=draws or None,
            description=description,
            entry_metadata=metadata,
            idempotency_key=key,
            created_at=at,
        )
        session.add(row)
        change.rows.append(row)
        self._check_low_credit(session, change, account, at)
        return row

    def _check_low_credit(
        self, session: Session, change: _Change, account: Account, at: datetime
    ) -> None:
        """Fire credits.low once per crossing below the threshold; re-arm at or above it."""
        threshold = account.low_credit_threshold
        if threshold is None:
            threshold = self.low_credit_threshold
        if threshold is None or threshold <= 0:
            return
        available = account.balance - account.reserved
        if available < threshold and not account.low_credit_alerted:
            account.low_credit_alerted = True
            self._emit(
                session,
                change,
                CreditsLow(
                    event_id=str(uuid.uuid4()),
                    occurred_at=at,
                    user_id=account.user_id,
                    available=available,
                    threshold=threshold,
                ),
            )
        elif available >= threshold and account.low_credit_alerted:
            account.low_credit_alerted = False

    # ------------------------------------------------------------------ operations

    def _add(
        self, session: Session, at: datetime, change: _Change, key: str, request: AddCredits
    ) -> Entry:
        ensure_account(session, request.user_id, at)
        account = self._locked_account(session, request.user_id)
        if account.balance + request.amount > MAX_BALANCE:
            raise ValidationFailed(
                f"the balance would exceed the maximum of {MAX_BALANCE}",
                user_id=request.user_id,
            )
        if request.expires_at is not None and request.expires_at <= at:
            raise ValidationFailed("expires_at must be in the future", user_id=request.user_id)
        debt = max(0, -account.balance)
        lot = Lot(
            user_id=account.user_id,
            amount=request.amount,
            remaining=request.amount - min(debt, request.amount),
            source=request.source.value,
            priority=request.priority or 0,
            expires_at=request.expires_at,
            created_at=at,
            idempotency_key=key,
        )
        session.add(lot)
        session.flush()
        session.info.get("lots", {}).pop(account.user_id, None)  # a batch reloads them
        return self._record(
            session,
            change,
            account,
            kind=EntryKind.ADD,
            key=key,
            at=at,
            amount=request.amount,
            lot_id=lot.id,
            description=request.description,
            metadata=request.metadata,
        )

    def _deduct(
        self, session: Session, at: datetime, change: _Change, key: str, request: DeductCredits
    ) -> Entry:
        account = self._locked_account(session, request.user_id)
        available = account.balance - account.reserved
        if request.amount > available:
            raise InsufficientCredits(
                f"user {request.user_id!r} has {available} credits available, "
                f"{request.amount} requested",
                user_id=request.user_id,
                available=available,
                requested=request.amount,
            )
        draws = _draw_lots(session, request.user_id, request.amount)
        return self._record(
            session,
            change,
            account,
            kind=EntryKind.DEDUCT,
            key=key,
            at=at,
            amount=-request.amount,
            draws=draws,
            description=request.description,
            metadata=request.metadata,
        )

    def _reserve(
        self, session: Session, at: datetime, change: _Change, key: str, request: ReserveCredits
    ) -> Reservation:
        account = self._locked_account(session, request.user_id)
        expires_at = _hold_expiry(request, at)
        available = account.balance - account.reserved
        if request.amount > available:
            raise InsufficientCredits(
                f"user {request.user_id!r} has {available} credits available, "
                f"{request.amount} requested",
                user_id=request.user_id,
                available=available,
                requested=request.amount,
            )
        hold = Hold(
            id=uuid.uuid4().hex,
            user_id=account.user_id,
            amount=request.amount,
            status=ReservationStatus.ACTIVE.value,
            expires_at=expires_at,
            created_at=at,
            idempotency_key=key,
        )
        session.add(hold)
        self._record(
            session,
            change,
            account,
            kind=EntryKind.RESERVE,
            key=key,
            at=at,
            held=request.amount,
            reservation_id=hold.id,
            description=request.description,
            metadata=request.metadata,
        )
        return reservation_model(hold)

    def _active_hold(
        self, session: Session, reservation_id: str, at: datetime
    ) -> tuple[Account, Hold]:
        hold = session.get(Hold, reservation_id)
        if hold is None:
            raise UnknownReservation(
                f"no reservation {reservation_id!r}", reservation_id=reservation_id
            )
        account = self._locked_account(session, hold.user_id)
        session.refresh(hold)
        status = hold.status
        if status == ReservationStatus.ACTIVE.value and hold.expires_at <= at:
            status = ReservationStatus.EXPIRED.value
        if status != ReservationStatus.ACTIVE.value:
            raise ReservationNotActive(
                f"reservation {reservation_id!r} is {status}",
                reservation_id=reservation_id,
                status=status,
            )
        return account, hold

    def _commit(
        self,
        session: Session,
        at: datetime,
        change: _Change,
        key: str,
        request: CommitReservation,
    ) -> Entry:
        account, hold = self._active_hold(session, request.reservation_id, at)
        charged = hold.amount if request.amount is None else request.amount
        available_with_hold = account.balance - account.reserved + hold.amount
        if charged > available_with_hold and self.overage_policy is OveragePolicy.REJECT:
            raise InsufficientCredits(
                f"commit of {charged} exceeds the {hold.amount} held plus "
                f"{available_with_hold - hold.amount} available",
                reservation_id=hold.id,
                user_id=hold.user_id,
                available=available_with_hold,
                requested=charged,
            )
        drawable = max(0, min(charged, account.balance))
        draws = _draw_lots(session, hold.user_id, drawable)
        hold.status = ReservationStatus.COMMITTED.value
        hold.committed_amount = charged
        hold.finalized_at = at
        return self._record(
            session,
            change,
            account,
            kind=EntryKind.COMMIT,
            key=key,
            at=at,
            amount=-charged,
            held=-hold.amount,
            reservation_id=hold.id,
            draws=draws,
            description=request.description,
            metadata=request.metadata,
        )

    def _release(
        self,
        session: Session,
        at: datetime,
        change: _Change,
        key: str,
        request: ReleaseReservation,
    ) -> Entry:
        account, hold = self._active_hold(session, request.reservation_id, at)
        hold.status = ReservationStatus.RELEASED.value
        hold.finalized_at = at
        return self._record(
            session,
            change,
            account,
            kind=EntryKind.RELEASE,
            key=key,
            at=at,
            held=-hold.amount,
            reservation_id=hold.id,
        )

    def _expire_lots(
        self, session: Session, at: datetime, change: _Change, lot_ids: list[int]
    ) -> None:
        lock_accounts(session, set(session.scalars(select(Lot.user_id).where(Lot.id.in_(lot_ids)))))
        lots_by_user: dict[str, list[Lot]] = defaultdict(list)
        for lot in _reread(session, select(Lot).where(Lot.id.in_(lot_ids)).order_by(Lot.id)):
            lots_by_user[lot.user_id].append(lot)
        for user_id in sorted(lots_by_user):
            account = self._locked_account(session, user_id)
            unheld = account.balance - account.reserved
            for lot in lots_by_user[user_id]:
                taken = min(lot.remaining, unheld)
                if taken <= 0:
                    continue
                key = f"system:expire:{lot.id}:{lot.remaining}"
                lot.remaining -= taken
                unheld -= taken
                self._record(
                    session, change, account, kind=EntryKind.EXPIRE, key=key, at=at,
                    amount=-taken, lot_id=lot.id,
                )
                _record_system_operation(session, key, "ExpireLot", user_id, at)
                self._emit(
                    session,
                    change,
                    CreditsExpired(
                        event_id=str(uuid.uuid4()),
                        occurred_at=at,
                        user_id=user_id,
                        lot_id=lot.id,
                        amount=taken,
                    ),
                )

    def _remind(
        self, session: Session, at: datetime, change: _Change, lot_ids: list[int]
    ) -> None:
        for lot in session.scalars(select(Lot).where(Lot.id.in_(lot_ids)).order_by(Lot.id)):
            if lot.expires_at is None or lot.remaining <= 0:
                continue
            day = _reminder_day(self.expiry_reminder_days, lot.expires_at - at)
            if day is None:
                continue
            claimed = insert_if_absent(
                session, ExpiryReminder, {"lot_id": lot.id, "days_before": day, "sent_at": at}
            )
            if claimed:
                self._emit(
                    session,
                    change,
                    CreditsExpiring(
                        event_id=str(uuid.uuid4()),
                        occurred_at=at,
                        user_id=lot.user_id,
                        lot_id=lot.id,
                        remaining=lot.remaining,
                        expires_at=lot.expires_at,
                        days_before=day,
                    ),
                )

    def _expire_holds(
        self, session: Session, at: datetime, change: _Change, hold_ids: list[str]
    ) -> None:
        user_ids = set(session.scalars(select(Hold.user_id).where(Hold.id.in_(hold_ids))))
        lock_accounts(session, user_ids)
        accounts = {user_id: self._locked_account(session, user_id) for user_id in user_ids}
        for hold in _reread(session, select(Hold).where(Hold.id.in_(hold_ids)).order_by(Hold.id)):
            if hold.status != ReservationStatus.ACTIVE.value or hold.expires_at > at:
                continue
            hold.status = ReservationStatus.EXPIRED.value
            hold.finalized_at = at
            key = f"system:reservation_expired:{hold.id}"
            self._record(
                session, change, accounts[hold.user_id], kind=EntryKind.RESERVATION_EXPIRED,
                key=key, at=at, held=-hold.amount, reservation_id=hold.id,
            )
            _record_system_operation(session, key, "ExpireReservation", hold.user_id, at)
            self._emit(
                session,
                change,
                ReservationExpired(
                    event_id=str(uuid.uuid4()),
                    occurred_at=at,
                    user_id=hold.user_id,
                    reservation_id=hold.id,
                    amount=hold.amount,
                ),
            )


def _hold_expiry(request: ReserveCredits, at: datetime) -> datetime:
    """When a new hold expires; raises, changing nothing, if it comes too late to apply.

    Runs under the account lock, right before the hold is written, so the deadline is
    checked against the clock (or `at`, if later), not the time the batch began. Too late
    is `invalid_input`, as an `expires_at` in the past is for a grant: the request, as
    sent, can no longer be applied; the caller may send it again (same key) with new times.
    """
    checked_at = max(at, utcnow())
    if request.deadline is not None and checked_at > request.deadline:
        raise ValidationFailed(
            f"reservation not applied: it reached the engine at {checked_at.isoformat()}, after "
            f"its caller stopped waiting at {request.deadline.isoformat()}",
            applied=False, reason="deadline_passed", deadline=request.deadline.isoformat(),
        )
    asked = at if request.requested_at is None else min(request.requested_at, at)
    expires_at = asked + timedelta(seconds=request.ttl_seconds)
    if expires_at <= at:
        raise ValidationFailed(
            f"reservation not applied: its TTL of {request.ttl_seconds} s, counted from when it "
            f"was requested ({asked.isoformat()}), ran out before it reached the engine",
            applied=False, reason="ttl_elapsed", requested_at=asked.isoformat(),
        )
    return expires_at


def _reread(session: Session, query: Any) -> list[Any]:
    """Rows as they are now, read after their accounts were locked (one query, where a
    refresh per row would be a round trip each): what the sweep saw before may be stale."""
    return list(session.scalars(query.execution_options(populate_existing=True)))


def _reminder_day(days: Sequence[int], left: timedelta) -> int | None:
    """The smallest reminder day whose window the lot has entered."""
    for day in days:
        if left <= timedelta(days=day):
            return day
    return None


BATCH_STEPS: dict[type[Request], tuple[type[BaseModel], str]] = {
    AddCredits: (LedgerEntry, "_add"),
    DeductCredits: (LedgerEntry, "_deduct"),
    ReserveCredits: (Reservation, "_reserve"),
    CommitReservation: (LedgerEntry, "_commit"),
    ReleaseReservation: (LedgerEntry, "_release"),
}
"""The result model and the engine step of each kind of batch item."""

WITHOUT_SAVEPOINT = (DeductCredits, ReserveCredits)
"""Batch items that refuse before changing anything, so they need no savepoint."""


def _key_conflict(key: str, operation: str) -> IdempotencyConflict:
    return IdempotencyConflict(
        f"idempotency key {key!r} was already used for a different request",
        idempotency_key=key,
        operation=operation,
    )


LOT_ORDER = (Lot.priority, Lot.expires_at.is_(None), Lot.expires_at, Lot.id)
"""The draw-down order: lowest priority value, soonest expiry (none last), oldest."""


def _cache_lots(session: Session, user_ids: set[str]) -> None:
    """Load and lock the live lots of `user_ids` in one query, for a batch to draw from.

    `_draw_lots` then takes them from the session instead of querying per deduct; a new
    lot (from an add) drops its user's list, which is reloaded on the next draw.
    """
    cache: dict[str, list[Lot]] = {user_id: [] for user_id in user_ids}
    if user_ids:
        for lot in session.scalars(
            select(Lot).where(Lot.user_id.in_(user_ids), Lot.remaining > 0)
            .order_by(Lot.user_id, *LOT_ORDER).with_for_update()
        ):
            cache[lot.user_id].append(lot)
    session.info["lots"] = cache


def _draw_lots(session: Session, user_id: str, amount: int) -> list[dict[str, int]]:
    """Take `amount` from the user's lots in the draw-down order."""
    draws: list[dict[str, int]] = []
    if amount <= 0:
        return draws
    cache: dict[str, list[Lot]] | None = session.info.get("lots")
    if cache is not None and user_id in cache:
        lots: Iterable[Lot] = cache[user_id]
    else:
        if cache is not None:
            session.flush()  # a batch's unwritten draws must count in the query below
        lots = list(session.scalars(
            select(Lot).where(Lot.user_id == user_id, Lot.remaining > 0).order_by(*LOT_ORDER).with_for_update()
        ))
        if cache is not None:
            cache[user_id] = lots
    left = amount
    for lot in lots:
        if lot.remaining <= 0:
            continue
        taken = min(lot.remaining, left)
        lot.remaining -= taken
        left -= taken
        draws.append({"lot_id": lot.id, "amount": taken})
        if left == 0:
            break
    if left:
        raise AssertionError(f"account {user_id!r} lots are short by {left}: run `audit`")
    return draws


def _record_system_operation(
    session: Session, key: str, kind: str, user_id: str, at: datetime
) -> None:
    session.add(
        Operation(
            idempotency_key=key,
            kind=kind,
            fingerprint=key[-64:],
            user_id=user_id,
            result={},
            created_at=at,
        )
    )


def _jsonable(request: dict[str, Any]) -> dict[str, Any]:
    return {
        key: value.isoformat() if isinstance(value, datetime) else value
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
    )


def lot_model(lot: Lot) -> CreditLot:
    return CreditLot.model_validate(lot, from_attributes=True)


def reservation_model(hold: Hold) -> Reservation:
    return Reservation.model_validate(hold, from_attributes=True)
