"""One transaction: its clock, the accounts it locked, and every decision it collected.

Handlers decide through `rules` and hand the postings, operation rows and events to the
unit of work; nothing is written until the writer turns the whole unit into set-based SQL
at the end, in the same transaction. Hooks registered with `on_commit` run only after the
transaction committed (the ledger file, waking the outbox relay).
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from creditworker.contract.credits import DEFAULT_CREDIT_TYPE, EntryKind
from creditworker.contract.errors import UnknownReservation, UnknownUser
from creditworker.contract.events import (
    AccountSnapshot,
    CreditsDepleted,
    CreditsLow,
    CreditsRecovered,
    ReservationExpired,
    _Event,
)
from creditworker.engine import account as accounts
from creditworker.engine import alerts, rules, thresholds
from creditworker.engine.results import entry_row_record, referenced_entry
from creditworker.engine.rules import Account, Hold, Lot, Posting, low_credit_crossing
from creditworker.storage.backends import backend_for
from creditworker.storage.tables import Entry, Operation

ResultSource = Posting | dict[str, Any]
"""What an operation returns: its posting (a ledger entry, known once written) or a record."""


@dataclass(slots=True)
class StoredOperation:
    """An operation row found for a key: what a repeat replays, or why it conflicts."""

    kind: str
    fingerprint: str
    result: dict[str, Any]


@dataclass(slots=True, eq=False)
class OperationRecord:
    """The row that makes `key` replay its result instead of applying the request again."""

    key: str
    kind: str
    fingerprint: str
    user_id: str | None
    source: ResultSource

    @property
    def references_entry(self) -> bool:
        """The row stores a reference to the posting's entry (`{"entry_id": id}`, filled in
        by the writer), not a whole result."""
        return isinstance(self.source, Posting)


operations_table = cast(Table, Operation.__table__)
entries_table = cast(Table, Entry.__table__)
ENTRY_COLUMNS = ("id", "user_id", "kind", "amount", "held", "balance_after", "reserved_after", "lot_id",
                 "reservation_id", "draws", "description", "metadata", "idempotency_key", "created_at",
                 "credit_type")
"""The columns `entry_row_record` reads, in its order."""


class UnitOfWork:
    """What one transaction decided, for the writer to write in one go."""

    def __init__(self, connection: Connection, at: datetime, *, low_credit_threshold: int | None = None) -> None:
        self.connection = connection
        self.backend = backend_for(connection)
        self._session: Session | None = None
        self.at = at
        self.low_credit_threshold = low_credit_threshold
        self.accounts: dict[str, Account] = {}
        self.holds: dict[str, Hold] = {}
        self.postings: list[Posting] = []
        self.operations: list[OperationRecord] = []
        self.events: list[_Event | Callable[[], _Event]] = []
        self.touched: dict[str, Account] = {}
        self.typed: dict[tuple[str, str], Account] = {}
        """The locked accounts' totals in other credit types, read when first asked for."""
        self.typed_stale: list[Hold] = []
        self.typed_stale_read: set[str] = set()
        """The users whose holds past their TTL in other credit types the lock's round trip
        read (`typed_stale`); `load_types` reads the others'."""
        self.touched_typed: dict[tuple[str, str], Account] = {}
        self.dropped_accounts: set[str] = set()
        self.row_updates: dict[tuple[Table, str], list[dict[str, Any]]] = {}
        self.commit_hooks: list[Callable[[], None]] = []
        self.rollover_lots: list[Lot] = []
        """Stored lots whose rollover bookkeeping changed (engine/rollover.py); the writer
        writes it."""
        self.after_write: list[Callable[[], None]] = []
        """Statements that need the ids the writer gave out (a top-up's lot), run after it in
        the same transaction (the writer then never sends COMMIT with its last statement)."""
        self.operations_read: tuple[frozenset[str], list[tuple[str, str, str, Any]]] | None = None
        """The operation rows `lock` read with the lots, and for which keys."""
        self.entry_ids: list[int] = []
        """Ledger entry ids `lock` took from their sequence, ascending: with enough of them,
        the writer needs no ids back from the database and the commit rides on its statement."""
        self.lot_ids: list[int] = []
        """Lot ids `lock` took from their sequence, ascending: with enough of them, new lots
        go in the writer's statement instead of one of their own."""
        self._percent_rules: dict[tuple[str, str], int | None] | None = None
        """Low thresholds as a percentage of the last grant, read on the first grant."""
        self.stale_holds: list[Hold] = []
        self.releases_stale = False
        """`lock` was asked for stale holds: another type's are released when it is loaded."""
        """The locked accounts' active holds past their TTL, when `lock` was asked for them."""

    @property
    def session(self) -> Session:
        """An ORM session in this transaction, for the code that works with ORM rows (plans and
        subscriptions); made on first use, since the credit operations need none. It joins the
        connection's transaction, and neither commits nor rolls it back."""
        if self._session is None:
            if not self.connection.in_transaction():  # one the session joins, not one it would own
                self.connection.begin()
            self._session = Session(bind=self.connection, expire_on_commit=False, autoflush=False)
        return self._session

    @property
    def uses_orm(self) -> bool:
        return self._session is not None

    def flush(self) -> None:
        """Send what the ORM session still holds (before the transaction commits)."""
        if self._session is not None:
            self._session.flush()
            self._session.close()

    # ------------------------------------------------------------------ reading

    def lock(self, user_ids: Iterable[str], *, creating: Collection[str] = (), hold_ids: Collection[str] = (),
             with_lots: bool | accounts.Drawing = False,
             operation_keys: Collection[str] = (), entry_ids: int = 0, lot_ids: int = 0,
             stale_holds: bool = False) -> set[str]:
        """Lock the accounts of `user_ids` and of the holds named, in one sorted query.

        Accounts for `creating` are created first where missing (returned: they exist for
        the other operations only once a grant to them succeeds). The named holds are
        re-read after the lock, since what was read before it may be stale. `with_lots`
        loads the live lots of the locked accounts, for draws: all of them, or, given a
        function of the named holds' owners and amounts that says how much each account may
        draw at most in this unit of work, the lots that come first in the draw-down order
        until they cover that much (`account.load_live_lots`). Where that query can also read the
        operation rows of `operation_keys` and take `entry_ids` ledger ids and `lot_ids` lot
        ids (PostgreSQL), it does, for `known_operations` and the writer. `stale_holds` reads the
        locked accounts' active holds past their TTL (in that query where it can) for
        `expire_stale_holds`.

        Without accounts to create, a backend that can lock and read in one round trip
        (`account.lock_and_read`) does all of it there.
        """
        stale: list[Hold] | None = None
        locked_read = None
        if isinstance(with_lots, accounts.Drawing) and not creating and self.backend.folds_reads:
            locked_read = accounts.lock_and_read(
                self.connection, set(user_ids), hold_ids, with_lots, operation_keys=operation_keys,
                entry_ids=entry_ids, lot_ids=lot_ids, at=self.at, stale=stale_holds)
        if locked_read is not None:
            created: set[str] = set()
            locked = locked_read.accounts
            self.accounts.update(locked)
            self.holds.update(locked_read.holds)
            read = locked_read.prefetched
            self.operations_read = (frozenset(operation_keys), read.operations)
            self.entry_ids, self.lot_ids = read.entry_ids, read.lot_ids
            stale = read.stale_holds
            if stale is not None:  # every type's, of every locked account
                self.typed_stale_read.update(locked)
        else:
            created, locked, stale = self._lock_then_read(user_ids, creating, hold_ids, with_lots, operation_keys,
                                                          entry_ids, lot_ids, stale_holds)
        accounts.count_pending(self.connection, locked.values(), self.at)
        self.releases_stale = stale_holds
        for hold in stale or ():
            if hold.credit_type == DEFAULT_CREDIT_TYPE:
                self.stale_holds.append(self.holds.setdefault(hold.id, hold))
            else:  # expired when its type is loaded (`load_types`)
                self.typed_stale.append(hold)
        return created

    def _lock_then_read(self, user_ids: Iterable[str], creating: Collection[str], hold_ids: Collection[str],
                        with_lots: bool | accounts.Drawing, operation_keys: Collection[str], entry_ids: int,
                        lot_ids: int, stale_holds: bool,
                        ) -> tuple[set[str], dict[str, Account], list[Hold] | None]:
        """`lock` in a round trip of its own (or several), then the reads: the accounts
        created, the accounts locked, and the stale holds found (None: not read)."""
        if hold_ids and not creating:  # the holds' owners read with the lock
            created: set[str] = set()
            owners, locked = accounts.lock_with_owners(self.connection, user_ids, hold_ids)
        else:
            owners, existing = accounts.before_lock(self.connection, hold_ids, creating)
            created = accounts.create_missing(self.connection, creating, self.at, existing)
            locked = accounts.lock(self.connection,
                                   {*user_ids, *creating, *(owner.user_id for owner in owners.values())})
        self.accounts.update(locked)
        if callable(with_lots) and any(account.pending_until is not None and account.pending_until > self.at
                                       for account in locked.values()):
            with_lots = True  # a prefix of the draw-down order may be a pending lot: read them all
        holding = [user_id for user_id, account in locked.items() if account.reserved > 0] if stale_holds else []
        stale: list[Hold] | None = None
        folded = callable(with_lots) and self.backend.folds_reads  # the lots' query reads the holds
        if not folded:  # else the named and the stale holds come with the lots, below
            if holding:
                named, stale = accounts.load_holds_and_stale(self.connection, owners, holding, self.at)
                self.holds.update(named)
            else:
                self.holds.update(accounts.load_holds(self.connection, owners))
        if with_lots:
            read = accounts.load_live_lots(self.connection, locked.values(),
                                           None if with_lots is True else with_lots(owners),
                                           operation_keys=operation_keys, entry_ids=entry_ids, lot_ids=lot_ids,
                                           stale_at=self.at, stale_users=holding, hold_ids=owners if folded else ())
            if read is not None:
                self.operations_read = (frozenset(operation_keys), read.operations)
                self.entry_ids, self.lot_ids = read.entry_ids, read.lot_ids
                self.holds.update((hold.id, hold) for hold in read.holds)
                if read.stale_holds is not None:
                    stale = read.stale_holds
        if stale is None and holding:
            stale = accounts.stale_holds(self.connection, holding, self.at)
        return created, locked, stale

    def account(self, user_id: str, credit_type: str = DEFAULT_CREDIT_TYPE) -> Account:
        """A locked account's totals in `credit_type` (with that type's live lots, for another
        type than the default, read here on first use), or `UnknownUser`."""
        account = self.accounts.get(user_id)
        if account is None:
            raise UnknownUser(f"no account for user {user_id!r}", user_id=user_id)
        if credit_type == DEFAULT_CREDIT_TYPE:
            return account
        typed = self.typed.get((user_id, credit_type))
        if typed is None:
            self.load_types([(user_id, credit_type)])
            typed = self.typed[(user_id, credit_type)]
        return typed

    def load_types(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Read the locked accounts' totals and live lots in other credit types than the
        default, for the (user id, type) pairs given (two queries for all of them: a batch
        names its pairs up front). A write releases their holds past the TTL, as `lock`
        does for the default type."""
        wanted = sorted({(user_id, credit_type) for user_id, credit_type in pairs
                         if credit_type != DEFAULT_CREDIT_TYPE and user_id in self.accounts
                         and (user_id, credit_type) not in self.typed})
        if not wanted:
            return
        loaded = accounts.load_typed(self.connection, wanted, self.at)
        self.typed.update(((typed.user_id, typed.credit_type), typed) for typed in loaded)
        holding = [typed for typed in loaded if typed.reserved > 0] if self.releases_stale else []
        if holding:
            types = {(typed.user_id, typed.credit_type) for typed in holding}
            users = {user_id for user_id, _type in types}
            stale = self.typed_stale if users <= self.typed_stale_read else accounts.stale_holds(
                self.connection, users, self.at)
            for hold in stale:
                if (hold.user_id, hold.credit_type) in types:
                    self.expire_hold(self.holds.setdefault(hold.id, hold))

    def hold(self, reservation_id: str) -> Hold:
        """A hold named to `lock`, or `UnknownReservation`."""
        hold = self.holds.get(reservation_id)
        if hold is None:
            raise UnknownReservation(f"no reservation {reservation_id!r}", reservation_id=reservation_id)
        return hold

    def known_operations(self, keys: Collection[str]) -> dict[str, StoredOperation]:
        """The operation rows already stored for `keys` (one query, or none if `lock` read them)."""
        if self.operations_read is not None and self.operations_read[0].issuperset(keys):
            wanted = set(keys)
            rows = [row for row in self.operations_read[1] if row[0] in wanted]
        else:
            rows = self.backend.rows_where_in(
                self.connection, operations_table, ("idempotency_key", "kind", "fingerprint", "result"),
                "idempotency_key", keys)
        known = {row[0]: StoredOperation(row[1], row[2], row[3]) for row in rows}
        referencing = {entry_id: operation for operation in known.values()
                       if (entry_id := referenced_entry(operation.result)) is not None}
        for row in self.backend.rows_where_in(self.connection, entries_table, ENTRY_COLUMNS, "id",
                                                              referencing):
            referencing[row[0]].result = entry_row_record(row)
        return known

    # ------------------------------------------------------------------ deciding

    def post(self, posting: Posting) -> Posting:
        """Collect a rule's posting, and the balance alerts it crossed in its account's credit
        type: each type has its own threshold and flag, so each crossing fires once per type."""
        self.postings.append(posting)
        if posting.credit_type == DEFAULT_CREDIT_TYPE:
            account = self.accounts[posting.user_id]
            self.touched[account.user_id] = account
            default_threshold = self.low_credit_threshold
        else:
            account = self.typed[(posting.user_id, posting.credit_type)]
            self.touched_typed[(posting.user_id, posting.credit_type)] = account
            default_threshold = None  # the service default counts the default type's credits
        if posting.kind == EntryKind.ADD and posting.amount > 0 and account.low_credit_threshold is not None:
            self._follow_percent_rule(account, posting.amount)
        was_low = account.low_credit_alerted
        threshold = low_credit_crossing(account, default_threshold)
        if threshold is not None:
            self.emit(CreditsLow(event_id=new_event_id(), occurred_at=self.at, user_id=account.user_id,
                                 available=account.spendable, threshold=threshold,
                                 credit_type=account.credit_type))
        self._alert_crossings(posting, account, was_low, default_threshold)
        return posting

    def _follow_percent_rule(self, account: Account, granted: int) -> None:
        """A grant moves a threshold set as a percentage of the last grant (engine/thresholds.py);
        the rules are read on the first such grant of the unit of work, for every locked
        account and loaded type with a threshold of its own (again for a type loaded later)."""
        pair = (account.user_id, account.credit_type)
        if self._percent_rules is None or pair not in self._percent_rules:
            self._read_percent_rules()
        assert self._percent_rules is not None
        percent = self._percent_rules.get(pair)
        if percent is not None:
            account.low_credit_threshold = thresholds.from_percent(percent, granted)

    def _read_percent_rules(self) -> None:
        """Only accounts with a threshold of their own may have a rule: read theirs, once."""
        known = self._percent_rules if self._percent_rules is not None else {}
        pairs = [(user_id, DEFAULT_CREDIT_TYPE) for user_id, locked in self.accounts.items()
                 if locked.low_credit_threshold is not None]
        pairs += [pair for pair, typed in self.typed.items() if typed.low_credit_threshold is not None]
        wanted = [pair for pair in pairs if pair not in known]
        found = thresholds.percent_rules(self.connection, wanted)
        known.update({pair: found.get(pair) for pair in wanted})
        self._percent_rules = known

    def _alert_crossings(self, posting: Posting, account: Account, was_low: bool,
                         default_threshold: int | None) -> None:
        """`credits.depleted` and `credits.recovered` (engine/alerts.py), of the posting's type.
        Most postings leave a balance above zero that was not low: nothing to cross, no call."""
        if not was_low and not account.low_credit_alerted and posting.balance_after > posting.reserved_after:
            return
        low_threshold = account.low_credit_threshold
        if low_threshold is None:
            low_threshold = default_threshold
        for crossing in alerts.crossings(posting, account, threshold=low_threshold, was_low=was_low):
            if crossing is alerts.Crossing.DEPLETED:
                self.emit(CreditsDepleted(event_id=new_event_id(), occurred_at=self.at, user_id=account.user_id,
                                          available=account.available, credit_type=account.credit_type))
            else:
                self.emit(CreditsRecovered(event_id=new_event_id(), occurred_at=self.at, user_id=account.user_id,
                                           available=account.available,
                                           threshold=low_threshold if low_threshold else None,
                                           credit_type=account.credit_type))

    def expire_hold(self, hold: Hold) -> bool:
        """Release a hold past its TTL with its `reservation_expired` entry and event (once:
        a hold no longer active is left alone); whether it did."""
        posting = rules.expire_hold(self.account(hold.user_id, hold.credit_type), hold, at=self.at)
        if posting is None:
            return False
        self.post(posting)
        self.record_system_operation(posting.idempotency_key, "ExpireReservation", hold.user_id)
        self.emit(ReservationExpired(event_id=new_event_id(), occurred_at=self.at, user_id=hold.user_id,
                                     reservation_id=hold.id, amount=hold.amount, credit_type=hold.credit_type))
        return True

    def expire_stale_holds(self) -> int:
        """Release the holds `lock` found past their TTL: an expired hold stops counting at the
        next write on its account, whether or not a sweep runs. Returns how many."""
        return sum(self.expire_hold(hold) for hold in self.stale_holds)

    def touch(self, account: Account) -> None:
        """An account changed without a posting (its threshold): the writer writes it."""
        if account.credit_type == DEFAULT_CREDIT_TYPE:
            self.touched[account.user_id] = account
        else:
            self.touched_typed[(account.user_id, account.credit_type)] = account

    def emit(self, event: _Event | Callable[[], _Event]) -> None:
        """Queue an event for the outbox; it is built when the writer writes (after every
        decision, once ids are given out), with its account's totals as the unit left them."""
        self.events.append(lambda: self._with_account(event if isinstance(event, _Event) else event()))

    def _with_account(self, event: _Event) -> _Event:
        """`event` with its account's totals, of the event's credit type, as the unit left them
        (`available` as the balance read answers it: without grants still pending)."""
        credit_type = getattr(event, "credit_type", DEFAULT_CREDIT_TYPE)
        account = (self.accounts.get(event.user_id) if credit_type == DEFAULT_CREDIT_TYPE
                   else self.typed.get((event.user_id, credit_type)))
        if account is None or event.account is not None:
            return event
        return event.model_copy(update={"account": AccountSnapshot(
            balance=account.balance, reserved=account.reserved, available=account.spendable,
            credit_type=credit_type)})

    def record_operation(self, key: str, kind: str, fingerprint: str, source: ResultSource) -> OperationRecord:
        user_id = source.user_id if isinstance(source, Posting) else source.get("user_id")
        record = OperationRecord(key, kind, fingerprint, user_id, source)
        self.operations.append(record)
        return record

    def record_system_operation(self, key: str, kind: str, user_id: str) -> None:
        """The row that makes a sweep's or an allocation's step happen once."""
        self.operations.append(OperationRecord(key, kind, key[-64:], user_id, {}))

    def drop_account(self, user_id: str) -> None:
        """An account created for a grant that did not happen: the unit leaves no trace of it."""
        self.dropped_accounts.add(user_id)
        self.accounts.pop(user_id, None)
        self.touched.pop(user_id, None)
        for typed in [typed for typed in self.typed if typed[0] == user_id]:
            self.typed.pop(typed)
            self.touched_typed.pop(typed, None)

    def update_rows(self, table: Table, key: str, rows: list[dict[str, Any]]) -> None:
        """Rows of another table (a subscription's period) for the writer to update with the
        rest, one statement per table; every row names the same columns."""
        self.row_updates.setdefault((table, key), []).extend(rows)

    def on_commit(self, hook: Callable[[], None]) -> None:
        self.commit_hooks.append(hook)


_pauses = 0
"""How many batches run with the collector paused (in any thread)."""
_collector_was_enabled = False
_pauses_lock = threading.Lock()


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a batch runs (re-entrant, thread-safe).

    A batch of a thousand items allocates tens of thousands of short-lived objects that all
    live until its end: each pass of the collector finds them alive, promotes them, and
    soon walks the whole heap again. Measured on batches of 1,000 deducts: 7-13 us of the
    26-31 us of Python per item went to the collector. Nothing a batch makes needs it
    (reference counting frees it all when the batch ends), so the collector is disabled
    while any batch runs and enabled again when the last one ends; if the application had
    disabled it, it stays disabled.
    """
    global _pauses, _collector_was_enabled
    with _pauses_lock:
        if _pauses == 0:
            _collector_was_enabled = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _pauses_lock:
            _pauses -= 1
            if _pauses == 0 and _collector_was_enabled:
                gc.enable()


_event_ids = threading.local()
os.register_at_fork(after_in_child=lambda: vars(_event_ids).clear())  # a child must not reuse its parent's ids


def new_event_id() -> str:
    """A random (version 4) UUID as text, as `str(uuid.uuid4())` gives, drawn from random
    bytes read 256 ids at a time: a sweep makes an event per row, and one `os.urandom`
    call and `UUID` object per event cost a tenth of an expiry's Python time."""
    pool: list[str] | None = getattr(_event_ids, "pool", None)
    if not pool:
        digits = os.urandom(16 * 256).hex()
        pool = _event_ids.pool = [
            f"{digits[i:i + 8]}-{digits[i + 8:i + 12]}-4{digits[i + 13:i + 16]}"
            f"-{'89ab'[int(digits[i + 16], 16) & 3]}{digits[i + 17:i + 20]}-{digits[i + 20:i + 32]}"
            for i in range(0, 32 * 256, 32)
        ]
    return pool.pop()


def new_hold_id() -> str:
    """A hold's id: a random (version 4) UUID's 32 hex digits, as `uuid.uuid4().hex` gives,
    from the same pool as `new_event_id` (a reserve makes one per call)."""
    return new_event_id().replace("-", "")
