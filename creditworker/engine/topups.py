"""Auto top-ups (issue 29): rules, the trigger, and a top-up's life after it.

The trigger runs in the unit of work of the write that drew credits (a deduct, commit or
reserve), after its decisions and before the writer: if it left `available` of a type with
an enabled rule below the threshold, and no top-up of that account and type is in flight,
it inserts a `requested` top-up and a `credits.topup_requested` event in the same
transaction. One in flight per account and type holds because every such write holds the
account's row lock. A unit that drew nothing reads nothing here; one that drew reads the
rules of the accounts it drew from (one indexed query).

`charge` is the worker's step: requested -> charging (its own transaction), the provider's
`charge` with the top-up's idempotency key (no transaction open), then succeeded (the
grant, `source="top_up"`, with its cost basis), failed or pending in one transaction under
the account's lock. Run twice at once, or again after a crash, the provider sees the same
key and only the first finisher grants (the top-up is no longer `charging` for the second,
and the grant's operation row is keyed by the top-up's key besides).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import Table, delete, func, insert, select, update
from sqlalchemy.engine import Connection, Engine, Row

from creditworker.contract.credits import DEFAULT_CREDIT_TYPE, MAX_AMOUNT, CreditSource, EntryKind
from creditworker.contract.errors import (
    PaymentProviderError,
    TopupNotPending,
    UnknownTopup,
    UnknownUser,
)
from creditworker.contract.events import TopupDisabled, TopupFailed, TopupRequested, TopupSucceeded
from creditworker.contract.topups import (
    IN_FLIGHT_STATES,
    MAX_CHARGE,
    MAX_CONSECUTIVE_FAILURES,
    AutoTopupRule,
    CompleteTopup,
    RemoveAutoTopup,
    SetAutoTopup,
    Topup,
    TopupState,
)
from creditworker.engine import rules
from creditworker.engine.payments import Charge, ChargeStatus, PaymentProvider, charge_outcome
from creditworker.engine.unit_of_work import UnitOfWork, new_event_id
from creditworker.storage.tables import Account as AccountRow
from creditworker.storage.tables import AutoTopupRuleRow, TopupRow

rules_table = cast(Table, AutoTopupRuleRow.__table__)
topups_table = cast(Table, TopupRow.__table__)
accounts_table = cast(Table, AccountRow.__table__)

DRAWING_KINDS = frozenset({EntryKind.DEDUCT.value, EntryKind.COMMIT.value, EntryKind.RESERVE.value})
"""The entries of writes that can take `available` below a threshold."""
MAX_CHARGE_ATTEMPTS = 3
"""Attempts at one top-up whose provider raised or answered nonsense before it counts as failed."""

RunUnit = Callable[..., Any]
"""`CreditService.run` (not imported: the service imports this module)."""


# ---------------------------------------------------------------- the trigger


def request_due(uow: UnitOfWork) -> None:
    """Ask for a top-up for each (account, type) this unit drew below its rule's threshold."""
    pairs = {(posting.user_id, posting.credit_type) for posting in uow.postings if posting.kind in DRAWING_KINDS}
    pairs = {(user_id, credit_type) for user_id, credit_type in pairs
             if (highest := _highest_threshold(uow, user_id)) is not None
             and uow.account(user_id, credit_type).spendable < highest}
    if not pairs:  # no rule could have been crossed: nothing read
        return
    found = uow.connection.execute(
        select(rules_table).where(rules_table.c.user_id.in_(sorted({user_id for user_id, _type in pairs})),
                                  rules_table.c.enabled.is_(True))).all()
    for rule in found:
        if (rule.user_id, rule.credit_type) in pairs:
            request_if_below(uow, rule)


def _highest_threshold(uow: UnitOfWork, user_id: str) -> int | None:
    account = uow.accounts.get(user_id)
    return None if account is None else account.topup_threshold


def _refresh_highest_threshold(uow: UnitOfWork, user_id: str) -> None:
    """`accounts.topup_threshold` after the account's rules changed (the writer leaves it)."""
    highest = uow.connection.scalar(select(func.max(rules_table.c.threshold)).where(
        rules_table.c.user_id == user_id, rules_table.c.enabled.is_(True)))
    uow.connection.execute(update(accounts_table).where(accounts_table.c.user_id == user_id)
                           .values(topup_threshold=highest))
    if user_id in uow.accounts:
        uow.accounts[user_id].topup_threshold = None if highest is None else int(highest)


def request_if_below(uow: UnitOfWork, rule: Row[Any]) -> int | None:
    """Insert a top-up for `rule` if its account (locked by `uow`) is below the threshold and
    none is in flight, the pending ones counting as granted; its id, or None."""
    account = uow.account(rule.user_id, rule.credit_type)
    open_topups = uow.connection.execute(
        select(topups_table.c.state, topups_table.c.credits)
        .where(topups_table.c.user_id == rule.user_id, topups_table.c.credit_type == rule.credit_type,
               topups_table.c.state.in_([*IN_FLIGHT_STATES, TopupState.PENDING.value]))).all()
    if any(row.state in IN_FLIGHT_STATES for row in open_topups):
        return None
    coming = account.spendable + sum(int(row.credits) for row in open_topups)
    if coming >= rule.threshold:
        return None
    credits = int(rule.amount) if rule.amount is not None else int(rule.target) - coming
    credits = min(credits, MAX_AMOUNT)  # a debt (an allowed overage) can ask beyond the target
    if credits <= 0:
        return None
    unit_price = Decimal(rule.unit_price) if rule.unit_price is not None else None
    cost = credits * unit_price if unit_price is not None else None
    if cost is not None and cost >= MAX_CHARGE:
        return None  # never a failed write for a top-up: the rule's bounds keep this for debts only
    if (rule.max_per_month is not None and cost is not None
            and spent_this_month(uow.connection, rule.user_id, rule.credit_type, uow.at) + cost > rule.max_per_month):
        return None  # the cap: no top-up until next month (docs/topups.md)
    sequence = int(rule.sequence) + 1
    uow.connection.execute(update(rules_table).where(rules_table.c.id == rule.id).values(sequence=sequence))
    topup_id = int(uow.connection.execute(insert(topups_table).values(
        rule_id=rule.id, user_id=rule.user_id, credit_type=rule.credit_type, credits=credits,
        state=TopupState.REQUESTED.value, idempotency_key=f"topup:{rule.user_id}:{rule.id}:{sequence}",
        cost=cost, unit_price=unit_price, currency=rule.currency, expires_after_days=rule.expires_after_days,
        attempts=0, requested_at=uow.at, updated_at=uow.at)).inserted_primary_key[0])
    uow.emit(TopupRequested(event_id=new_event_id(), occurred_at=uow.at, user_id=rule.user_id,
                            credit_type=rule.credit_type, topup_id=topup_id, credits=credits))
    return topup_id


def month_start(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def spent_this_month(connection: Connection, user_id: str, credit_type: str, at: datetime) -> Decimal:
    """The cost of the account's top-ups of this type asked for this calendar month (UTC),
    failed ones left out: what `max_per_month` caps."""
    spent = connection.scalar(
        select(func.coalesce(func.sum(topups_table.c.cost), 0))
        .where(topups_table.c.user_id == user_id, topups_table.c.credit_type == credit_type,
               topups_table.c.state != TopupState.FAILED.value, topups_table.c.requested_at >= month_start(at)))
    return Decimal(spent or 0)


# ---------------------------------------------------------------- rules


def set_rule(run_keyed: Callable[..., Any], request: SetAutoTopup, now: datetime | None) -> AutoTopupRule:
    """Create or replace the rule (enabled, failures cleared, its sequence kept so that keys
    stay unique); an account already below the new threshold gets its top-up at once."""

    def operation(uow: UnitOfWork, _key: str) -> AutoTopupRule:
        uow.lock([request.user_id])
        uow.account(request.user_id, request.credit_type)  # UnknownUser before any write
        values = {"threshold": request.threshold, "amount": request.amount, "target": request.target,
                  "max_per_month": request.max_per_month, "unit_price": request.unit_price,
                  "currency": request.currency, "expires_after_days": request.expires_after_days,
                  "enabled": True, "consecutive_failures": 0, "updated_at": uow.at}
        where = (rules_table.c.user_id == request.user_id, rules_table.c.credit_type == request.credit_type)
        if not uow.connection.execute(update(rules_table).where(*where).values(**values)).rowcount:
            uow.connection.execute(insert(rules_table).values(
                user_id=request.user_id, credit_type=request.credit_type, sequence=0, created_at=uow.at, **values))
        rule = uow.connection.execute(select(rules_table).where(*where)).one()
        _refresh_highest_threshold(uow, request.user_id)
        request_if_below(uow, rule)
        return rule_model(rule)

    return cast(AutoTopupRule, run_keyed(request, AutoTopupRule, operation, now=now))


def remove_rule(run_keyed: Callable[..., Any], request: RemoveAutoTopup) -> dict[str, Any]:
    """Drop the rule; a top-up already in flight still finishes (its money may be taken)."""
    from creditworker.contract.topups import RemovedAutoTopup

    def operation(uow: UnitOfWork, _key: str) -> RemovedAutoTopup:
        uow.lock([request.user_id])
        removed = uow.connection.execute(delete(rules_table).where(
            rules_table.c.user_id == request.user_id, rules_table.c.credit_type == request.credit_type)).rowcount
        if removed:
            _refresh_highest_threshold(uow, request.user_id)
        return RemovedAutoTopup(user_id=request.user_id, credit_type=request.credit_type, removed=bool(removed))

    return cast(dict[str, Any], run_keyed(request, RemovedAutoTopup, operation).model_dump())


def get_rule(engine: Engine, user_id: str, credit_type: str = DEFAULT_CREDIT_TYPE) -> AutoTopupRule | None:
    with engine.connect() as connection:
        row = connection.execute(select(rules_table).where(
            rules_table.c.user_id == user_id, rules_table.c.credit_type == credit_type)).first()
    return None if row is None else rule_model(row)


def rule_model(row: Row[Any]) -> AutoTopupRule:
    return AutoTopupRule.model_validate(row._asdict())


def topup_model(row: Row[Any]) -> Topup:
    return Topup.model_validate(row._asdict())


def list_topups(engine: Engine, *, user_id: str | None = None, state: str | None = None,
                limit: int = 50) -> list[Topup]:
    """Newest first."""
    query = select(topups_table).order_by(topups_table.c.id.desc()).limit(limit)
    if user_id is not None:
        query = query.where(topups_table.c.user_id == user_id)
    if state is not None:
        query = query.where(topups_table.c.state == str(state))
    with engine.connect() as connection:
        return [topup_model(row) for row in connection.execute(query).all()]


def get_topup(engine: Engine, topup_id: int) -> Topup:
    with engine.connect() as connection:
        row = connection.execute(select(topups_table).where(topups_table.c.id == topup_id)).first()
    if row is None:
        raise UnknownTopup(f"no top-up {topup_id}", topup_id=topup_id)
    return topup_model(row)


def due_topups(engine: Engine, at: datetime, stale_after_seconds: float, limit: int = 1000) -> list[int]:
    """Top-ups left requested or charging longer than `stale_after_seconds` (their worker
    died, or their message was lost), for beat's sweep to send again."""
    with engine.connect() as connection:
        return [int(topup_id) for topup_id in connection.scalars(
            select(topups_table.c.id)
            .where(topups_table.c.state.in_(IN_FLIGHT_STATES),
                   topups_table.c.updated_at <= at - timedelta(seconds=stale_after_seconds))
            .order_by(topups_table.c.id).limit(limit))]


# ---------------------------------------------------------------- a top-up's life


def _locked_topup(connection: Connection, topup_id: int) -> Row[Any]:
    row = connection.execute(select(topups_table).where(topups_table.c.id == topup_id).with_for_update()).first()
    if row is None:
        raise UnknownTopup(f"no top-up {topup_id}", topup_id=topup_id)
    return row


def _owner(engine: Engine, topup_id: int) -> str:
    with engine.connect() as connection:
        user_id = connection.scalar(select(topups_table.c.user_id).where(topups_table.c.id == topup_id))
    if user_id is None:
        raise UnknownTopup(f"no top-up {topup_id}", topup_id=topup_id)
    return str(user_id)


def charge(run: RunUnit, engine: Engine, provider: Callable[[], PaymentProvider], topup_id: int) -> Topup:
    """Charge one top-up and settle it; a top-up past charging is answered as it stands.

    A provider that raises or answers nonsense leaves the top-up `charging` with its error
    (beat's sweep tries again with the same key); after `MAX_CHARGE_ATTEMPTS` it has failed.
    """
    loaded = provider()  # a provider that does not load leaves the top-up requested: PaymentProviderError

    def claim(uow: UnitOfWork) -> tuple[Row[Any], bool]:
        row = _locked_topup(uow.connection, topup_id)
        if row.state not in IN_FLIGHT_STATES:
            return row, False
        uow.connection.execute(update(topups_table).where(topups_table.c.id == topup_id).values(
            state=TopupState.CHARGING.value, attempts=row.attempts + 1, updated_at=uow.at))
        return _locked_topup(uow.connection, topup_id), True

    row, charging = run(claim)
    if not charging:
        return topup_model(row)
    try:
        outcome: Charge | PaymentProviderError = charge_outcome(loaded.charge(
            account=row.user_id, credits=int(row.credits), amount=row.cost, currency=row.currency,
            idempotency_key=row.idempotency_key))
    except PaymentProviderError as exc:
        outcome = exc
    except Exception as exc:  # noqa: BLE001 (the provider's failure is the top-up's, never the worker's)
        outcome = PaymentProviderError(f"the payment provider raised {type(exc).__name__}: {exc}")
    _settle(run, topup_id, outcome)
    return get_topup(engine, topup_id)


def complete(run_keyed: Callable[..., Any], engine: Engine, request: CompleteTopup) -> Topup:
    """The provider's late answer for a pending top-up: grant it, or mark it failed. The
    same answer again (a webhook delivered twice) returns the top-up as it is."""
    user_id = _owner(engine, request.topup_id)

    def operation(uow: UnitOfWork, _key: str) -> Topup:
        uow.lock([user_id])
        row = _locked_topup(uow.connection, request.topup_id)
        done = TopupState.SUCCEEDED.value if request.succeeded else TopupState.FAILED.value
        if row.state == done:
            return topup_model(row)
        if row.state != TopupState.PENDING.value:
            raise TopupNotPending(f"top-up {request.topup_id} is {row.state}, not pending",
                                  topup_id=request.topup_id, state=row.state)
        outcome = Charge(ChargeStatus.SUCCEEDED if request.succeeded else ChargeStatus.FAILED,
                         reference=request.reference or row.provider_reference, error=request.error)
        return _finish(uow, row, outcome)

    run_keyed(request, Topup, operation)
    return get_topup(engine, request.topup_id)


def _settle(run: RunUnit, topup_id: int, outcome: Charge | PaymentProviderError) -> Topup:
    def decide(uow: UnitOfWork) -> Topup:
        user_id = uow.connection.scalar(select(topups_table.c.user_id).where(topups_table.c.id == topup_id))
        uow.lock([user_id])
        row = _locked_topup(uow.connection, topup_id)
        if row.state != TopupState.CHARGING.value:  # another run of this top-up finished first
            return topup_model(row)
        if isinstance(outcome, PaymentProviderError):
            if row.attempts < MAX_CHARGE_ATTEMPTS:
                _update(uow, topup_id, error=outcome.message)
                return _reread(uow, topup_id)
            return _finish(uow, row, Charge(ChargeStatus.FAILED, error=outcome.message))
        return _finish(uow, row, outcome)

    return cast(Topup, run(decide))


def _finish(uow: UnitOfWork, row: Row[Any], outcome: Charge) -> Topup:
    """The top-up's end (or its pending state), under the account's lock: the grant only on
    success; failures counted on the rule, which a third in a row disables."""
    topup_id, user_id, credit_type = int(row.id), str(row.user_id), str(row.credit_type)
    if outcome.status == ChargeStatus.PENDING:
        _update(uow, topup_id, state=TopupState.PENDING.value, provider_reference=outcome.reference,
                error=outcome.error)
        return _reread(uow, topup_id)
    if outcome.status == ChargeStatus.SUCCEEDED:
        _grant(uow, row, outcome.reference)
        uow.connection.execute(update(rules_table).where(rules_table.c.id == row.rule_id)
                               .values(consecutive_failures=0))
        _update(uow, topup_id, state=TopupState.SUCCEEDED.value, provider_reference=outcome.reference, error=None)
        return _reread(uow, topup_id)
    _update(uow, topup_id, state=TopupState.FAILED.value, error=outcome.error or "the charge failed",
            provider_reference=outcome.reference or row.provider_reference)
    rule = uow.connection.execute(select(rules_table).where(rules_table.c.id == row.rule_id)).first()
    failures = 0 if rule is None else int(rule.consecutive_failures) + 1
    uow.account(user_id, credit_type)  # the events carry the account's totals
    uow.emit(TopupFailed(event_id=new_event_id(), occurred_at=uow.at, user_id=user_id, credit_type=credit_type,
                         topup_id=topup_id, credits=int(row.credits), error=outcome.error,
                         consecutive_failures=failures))
    if rule is not None:
        disable = rule.enabled and failures >= MAX_CONSECUTIVE_FAILURES
        uow.connection.execute(update(rules_table).where(rules_table.c.id == rule.id).values(
            consecutive_failures=failures, enabled=False if disable else rule.enabled, updated_at=uow.at))
        if disable:
            _refresh_highest_threshold(uow, user_id)
            uow.emit(TopupDisabled(event_id=new_event_id(), occurred_at=uow.at, user_id=user_id,
                                   credit_type=credit_type, consecutive_failures=failures))
    return _reread(uow, topup_id)


def _grant(uow: UnitOfWork, row: Row[Any], reference: str | None) -> None:
    """The paid credits, keyed by the top-up's key (an operation row: never granted twice)."""
    user_id, credit_type, at = str(row.user_id), str(row.credit_type), uow.at
    if user_id not in uow.accounts:
        raise UnknownUser(f"no account for user {user_id!r}", user_id=user_id)
    posting = uow.post(rules.grant(
        uow.account(user_id, credit_type), int(row.credits), at=at, key=row.idempotency_key,
        expires_at=at + timedelta(days=row.expires_after_days) if row.expires_after_days else None,
        source=CreditSource.TOP_UP.value, description=f"auto top-up {row.id}",
        metadata={"topup_id": int(row.id), "provider_reference": reference},
        unit_cost=Decimal(row.unit_price) if row.unit_price is not None else None,
        currency=row.currency if row.unit_price is not None else None))
    uow.record_system_operation(row.idempotency_key, "TopupGrant", user_id)
    lot = posting.lot
    assert lot is not None
    topup_id, credits = int(row.id), int(row.credits)
    uow.after_write.append(lambda: _update(uow, topup_id, lot_id=lot.id))
    uow.emit(lambda: TopupSucceeded(event_id=new_event_id(), occurred_at=at, user_id=user_id,
                                    credit_type=credit_type, topup_id=topup_id, credits=credits,
                                    lot_id=int(lot.id or 0), provider_reference=reference))


def _update(uow: UnitOfWork, topup_id: int, **values: Any) -> None:
    uow.connection.execute(update(topups_table).where(topups_table.c.id == topup_id)
                           .values(updated_at=uow.at, **values))


def _reread(uow: UnitOfWork, topup_id: int) -> Topup:
    return topup_model(uow.connection.execute(select(topups_table).where(topups_table.c.id == topup_id)).one())
