"""Plans and subscriptions: periodic grants of credits through the credit engine.

Every grant is a lot with source `subscription`, decided by the engine's rules in the
engine's unit of work (so in the same transaction as the subscription change, and written
by the engine's one writer), under the engine's idempotency keys: a period is keyed by
(subscription, period start), so it is granted once however often allocation runs. This
service uses the engine's public surface only: `CreditService.run` and `run_keyed`, the
unit of work, and `rules`.

Policies:
- assign: the first period starts now (or at `start_at`, which may not lie in the future)
  and its credits are granted at once; one active subscription per user.
- change: a plan with a higher credit limit and the same billing period takes effect now
  and grants the prorated difference for the rest of the period (rounded down); any other
  change takes effect at the next period, where a new billing period re-anchors.
- remove: at the end of the period by default (no further grant), or now.
- allocation catches up after downtime by granting the current period only; with
  `backfill=True` it also grants missed periods whose credits have not yet expired.
- Credits expire `validity_days` after their period starts, or at the period's end.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import Table, delete, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from creditworker.contract.credits import CreditSource, parse
from creditworker.contract.errors import (
    DuplicatePlan,
    PlanInUse,
    UnknownPlan,
    UnknownSubscription,
    ValidationFailed,
)
from creditworker.contract.events import (
    SubscriptionAllocated,
    SubscriptionChanged,
    SubscriptionEnded,
)
from creditworker.contract.periods import period_index_at, period_start, prorate
from creditworker.contract.plans import (
    ROLLOVER_FIELDS,
    AssignPlan,
    ChangePlan,
    CreatePlan,
    DeletedPlan,
    DeletePlan,
    GetPlan,
    GetSubscription,
    Plan,
    PlanDeletion,
    RemovePlan,
    Subscription,
    UpdatePlan,
)
from creditworker.engine import rollover, rules
from creditworker.engine.service import CreditService, aware
from creditworker.engine.unit_of_work import UnitOfWork, new_event_id
from creditworker.storage.backends import after, backend_for
from creditworker.storage.tables import PlanRow, SubscriptionRow

subscriptions_table = cast(Table, SubscriptionRow.__table__)
PERIOD_COLUMNS = ("id", "plan_id", "pending_plan_id", "status", "anchor_at", "period_index",
                  "current_period_start", "current_period_end", "cancel_at_period_end", "ended_at",
                  "updated_at")
"""What allocation changes on a subscription row."""

ACTIVE = "active"
_DUE_KEY = (subscriptions_table.c.current_period_end, subscriptions_table.c.id)
"""Allocation pages through the due subscriptions in this order (an index of its own)."""
ENDED = "ended"
ALLOCATION_CHUNK = 200
"""Subscriptions allocated per transaction."""


def plan_model(row: PlanRow) -> Plan:
    return Plan.model_validate(row, from_attributes=True)


def subscription_model(row: SubscriptionRow) -> Subscription:
    return Subscription.model_validate(row, from_attributes=True)



class SubscriptionService:
    def __init__(
        self, credits: CreditService | Engine | str, *, chunk_size: int = ALLOCATION_CHUNK,
        backfill: bool = False,
    ) -> None:
        self.credits = credits if isinstance(credits, CreditService) else CreditService(credits)
        self.engine = self.credits.engine
        self.chunk_size = chunk_size
        self.backfill = backfill
        """What `allocate` does by default after downtime: also grant missed periods whose
        credits are still valid (`CREDITWORKER_ALLOCATION_BACKFILL`)."""

    # ------------------------------------------------------------------ plans

    def create_plan(
        self,
        name: str,
        credit_limit: int,
        *,
        price: Decimal | str | int = Decimal(0),
        currency: str = "USD",
        billing_period: str = "monthly",
        validity_days: int | None = None,
        active: bool = True,
        rollover_max: int | None = None,
        rollover_max_percent: int | None = None,
        rollover_expires_after_periods: int | None = None,
        idempotency_key: str | None = None,
        now: datetime | None = None,
    ) -> Plan:
        """Create a plan; a repeat with the same key returns it, a new name clash raises.

        `rollover_max` (credits) or `rollover_max_percent` (of the allocation) is how much
        of a period's unused allocation rolls into the next; rolled credits expire
        `rollover_expires_after_periods` periods after the boundary (engine/rollover.py)."""
        request = parse(CreatePlan, {
            "name": name, "credit_limit": credit_limit, "price": price, "currency": currency,
            "billing_period": billing_period, "validity_days": validity_days, "active": active,
            "rollover_max": rollover_max, "rollover_max_percent": rollover_max_percent,
            "rollover_expires_after_periods": rollover_expires_after_periods,
            "idempotency_key": idempotency_key,
        })

        def operation(uow: UnitOfWork, _key: str) -> Plan:
            session, at = uow.session, uow.at
            if session.scalar(select(PlanRow.id).where(PlanRow.name == request.name)) is not None:
                raise DuplicatePlan(f"a plan named {request.name!r} exists", name=request.name)
            row = PlanRow(**request.model_dump(exclude={"idempotency_key"}), created_at=at, updated_at=at)
            session.add(row)
            session.flush()
            return plan_model(row)

        try:
            return self.credits.run_keyed(request, Plan, operation, now=now)
        except IntegrityError:  # a concurrent create of the same name won the race
            raise DuplicatePlan(f"a plan named {request.name!r} exists", name=request.name) from None

    def update_plan(
        self, plan: int | str, *, now: datetime | None = None, idempotency_key: str | None = None,
        **changes: Any,
    ) -> Plan:
        """Change a plan's name, limit, price, currency, validity or active flag.

        The billing period cannot change (it would move every subscriber's periods): create
        a new plan and move users with `change_plan`. New limits apply from the next period.
        A repeat with the same key returns the first answer.
        """
        request = parse(UpdatePlan, {"plan": plan, **changes, "idempotency_key": idempotency_key})
        fields = request.model_dump(exclude={"plan", "idempotency_key"}, exclude_unset=True)

        def operation(uow: UnitOfWork, _key: str) -> Plan:
            session, at = uow.session, uow.at
            row = self._plan(session, request.plan)
            if "name" in fields and fields["name"] != row.name and session.scalar(
                select(PlanRow.id).where(PlanRow.name == fields["name"])
            ) is not None:
                raise DuplicatePlan(f"a plan named {fields['name']!r} exists", name=fields["name"])
            for field, value in fields.items():
                if value is None and field != "validity_days" and field not in ROLLOVER_FIELDS:
                    continue
                setattr(row, field, value)
            if fields.get("rollover_max") is not None:  # one limit at a time: the new one wins
                row.rollover_max_percent = None
            elif fields.get("rollover_max_percent") is not None:
                row.rollover_max = None
            row.updated_at = at
            session.flush()
            return plan_model(row)

        return self.credits.run_keyed(request, Plan, operation, now=now)

    def delete_plan(self, plan: int | str, *, idempotency_key: str | None = None) -> DeletedPlan:
        """Delete an unused plan. A plan that users are on is deactivated instead (new users
        can no longer be assigned to it) and `PlanInUse` says so. A repeat with the same key
        answers as the first call did (a redelivered delete is not `unknown_plan`)."""
        request = parse(DeletePlan, {"plan": plan, "idempotency_key": idempotency_key})

        def operation(uow: UnitOfWork, _key: str) -> PlanDeletion:
            session = uow.session
            row = self._plan(session, request.plan)
            users = int(session.scalar(
                select(func.count()).select_from(SubscriptionRow).where(
                    SubscriptionRow.status == ACTIVE,
                    (SubscriptionRow.plan_id == row.id) | (SubscriptionRow.pending_plan_id == row.id),
                )
            ) or 0)
            if users:
                row.active = False
            else:
                session.execute(delete(SubscriptionRow).where(SubscriptionRow.plan_id == row.id))
                session.delete(row)
            session.flush()
            return PlanDeletion(plan=request.plan, deleted=not users, active_subscriptions=users)

        deletion = self.credits.run_keyed(request, PlanDeletion, operation)
        if not deletion.deleted:
            raise PlanInUse(
                f"plan {plan!r} has {deletion.active_subscriptions} active subscriptions: it was "
                "deactivated, not deleted", plan=plan, active_subscriptions=deletion.active_subscriptions,
            )
        return {"deleted": request.plan}

    def get_plan(self, plan: int | str) -> Plan:
        ref = parse(GetPlan, {"plan": plan}).plan
        with Session(self.engine) as session:
            return plan_model(self._plan(session, ref))

    def list_plans(self, *, include_inactive: bool = False) -> list[Plan]:
        query = select(PlanRow).order_by(PlanRow.id)
        if not include_inactive:
            query = query.where(PlanRow.active.is_(True))
        with Session(self.engine) as session:
            return [plan_model(row) for row in session.scalars(query)]

    # ------------------------------------------------------------------ subscriptions

    def assign_plan(
        self,
        user_id: str,
        plan: int | str,
        *,
        start_at: datetime | None = None,
        idempotency_key: str | None = None,
        now: datetime | None = None,
    ) -> Subscription:
        request = parse(AssignPlan, {
            "user_id": user_id, "plan": plan, "start_at": start_at, "idempotency_key": idempotency_key
        })

        def operation(uow: UnitOfWork, key: str) -> Subscription:
            session, at = uow.session, uow.at
            uow.lock((), creating=[request.user_id])
            if self._active(session, request.user_id) is not None:
                raise ValidationFailed(
                    f"user {request.user_id!r} already has an active subscription; use change_plan",
                    user_id=request.user_id,
                )
            row = self._plan(session, request.plan)
            if not row.active:
                raise ValidationFailed(f"plan {row.name!r} is not active", plan=row.name)
            anchor = request.start_at or at
            if anchor > at:
                raise ValidationFailed("start_at must not be in the future")
            n = period_index_at(anchor, row.billing_period, at)
            subscription = SubscriptionRow(
                user_id=request.user_id, plan_id=row.id, status=ACTIVE, anchor_at=anchor,
                period_index=n, current_period_start=period_start(anchor, row.billing_period, n),
                current_period_end=period_start(anchor, row.billing_period, n + 1),
                cancel_at_period_end=False, created_at=at, updated_at=at,
            )
            session.add(subscription)
            session.flush()
            self._grant_period(uow, subscription, row, n, key)
            return subscription_model(subscription)

        return self.credits.run_keyed(request, Subscription, operation, now=now)

    def change_plan(
        self,
        user_id: str,
        plan: int | str,
        *,
        idempotency_key: str | None = None,
        now: datetime | None = None,
    ) -> Subscription:
        request = parse(ChangePlan, {"user_id": user_id, "plan": plan, "idempotency_key": idempotency_key})

        def operation(uow: UnitOfWork, key: str) -> Subscription:
            session, at = uow.session, uow.at
            uow.lock([request.user_id], with_lots=False)
            account = uow.account(request.user_id)
            subscription = self._require_active(session, request.user_id)
            old = session.get(PlanRow, subscription.plan_id)
            new = self._plan(session, request.plan)
            assert old is not None
            if not new.active:
                raise ValidationFailed(f"plan {new.name!r} is not active", plan=new.name)
            if new.id == old.id:
                raise ValidationFailed(f"user {request.user_id!r} is already on plan {new.name!r}")
            granted = 0
            upgrade_now = (
                new.credit_limit > old.credit_limit and new.billing_period == old.billing_period
            )
            if upgrade_now:
                subscription.plan_id = new.id
                subscription.pending_plan_id = None
                granted = prorate(
                    new.credit_limit - old.credit_limit,
                    subscription.current_period_start, subscription.current_period_end, at,
                )
                expires_at = self._expiry(new, subscription.current_period_start,
                                          subscription.current_period_end)
                if granted > 0 and expires_at > at:
                    lot = uow.post(rules.grant(
                        account, granted, at=at, key=key, expires_at=expires_at,
                        source=CreditSource.SUBSCRIPTION.value,
                        description=f"upgrade to {new.name}: prorated difference",
                    )).lot
                    assert lot is not None
                    rollover.mark(lot, new, subscription.current_period_end)
                else:
                    granted = 0
                effective_at = at
            else:
                subscription.pending_plan_id = new.id
                effective_at = subscription.current_period_end
            subscription.cancel_at_period_end = False
            subscription.updated_at = at
            uow.emit(SubscriptionChanged(
                event_id=new_event_id(), occurred_at=at, user_id=request.user_id,
                subscription_id=subscription.id, old_plan_id=old.id, new_plan_id=new.id,
                effective_at=effective_at, credits_granted=granted,
            ))
            session.flush()
            return subscription_model(subscription)

        return self.credits.run_keyed(request, Subscription, operation, now=now)

    def remove_plan(
        self,
        user_id: str,
        *,
        at_period_end: bool = True,
        idempotency_key: str | None = None,
        now: datetime | None = None,
    ) -> Subscription:
        request = parse(RemovePlan, {
            "user_id": user_id, "at_period_end": at_period_end, "idempotency_key": idempotency_key
        })

        def operation(uow: UnitOfWork, key: str) -> Subscription:
            session, at = uow.session, uow.at
            uow.lock([request.user_id])
            uow.account(request.user_id)
            subscription = self._require_active(session, request.user_id)
            if request.at_period_end:
                subscription.cancel_at_period_end = True
                subscription.pending_plan_id = None
            else:
                self._end(uow, subscription, at)
            subscription.updated_at = at
            session.flush()
            return subscription_model(subscription)

        return self.credits.run_keyed(request, Subscription, operation, now=now)

    def get_user_subscription(self, user_id: str) -> Subscription:
        request = parse(GetSubscription, {"user_id": user_id})
        with Session(self.engine) as session:
            return subscription_model(self._require_active(session, request.user_id))

    # ------------------------------------------------------------------ allocation

    def due_subscription_pages(self, now: datetime | None = None) -> Iterator[list[int]]:
        """The ids of the due subscriptions, a chunk at a time.

        Pages through the (status, current_period_end, id) index, each page after the last:
        a page never re-reads the rows of the pages before it."""
        at = aware(now)
        last = None
        while rows := backend_for(self.engine).keyset_page(self.engine, select(*_DUE_KEY).where(
            subscriptions_table.c.status == ACTIVE, subscriptions_table.c.current_period_end <= at,
            *after(_DUE_KEY, last),
        ).order_by(*_DUE_KEY).limit(self.chunk_size)):
            last = rows[-1]
            yield [row[1] for row in rows]

    def allocate_due(self, now: datetime | None = None, *, backfill: bool = False) -> int:
        """Grant every due subscription its period, chunk by chunk; returns grants made."""
        at = aware(now)
        return sum(self.allocate(ids, now=at, backfill=backfill) for ids in self.due_subscription_pages(at))

    def allocate(self, subscription_ids: list[int], *, now: datetime | None = None,
                 backfill: bool | None = None) -> int:
        """Advance the given subscriptions to the period containing `now`, in one transaction.
        `backfill` None: the service's own (`self.backfill`)."""
        backfill = self.backfill if backfill is None else backfill

        def decide(uow: UnitOfWork) -> int:
            session = uow.session
            backend = backend_for(uow.connection)
            owners = backend.rows_where_in(uow.connection, subscriptions_table, ("user_id",), "id", subscription_ids)
            uow.lock(row[0] for row in owners)
            rows = [  # re-read under the locks: what the scan saw may be stale
                _PeriodRow(*row) for row in backend.rows_where_in(
                    uow.connection, subscriptions_table, _PeriodRow.__slots__, "id", subscription_ids, order_by="id")
            ]
            advances = [self._plan_advance(session, row, uow.at, backfill) for row in rows]
            granted_keys = uow.known_operations([key for advance in advances for _n, key in advance.periods])
            sources = rollover.rolling_sources(uow, [advance.row.user_id for advance in advances
                                                     if advance.end or advance.plan is not None])
            granted = sum(self._advance(uow, advance, granted_keys, sources.get(advance.row.user_id, []))
                          for advance in advances)
            moved = [advance.row for advance in advances if advance.end or advance.plan is not None]
            uow.update_rows(subscriptions_table, "id", [
                {column: getattr(row, column) for column in PERIOD_COLUMNS} for row in moved
            ])
            return granted

        granted = self.credits.run(decide, now=now)
        self.credits.record_sweep("allocate", {"granted": granted, "subscriptions": len(subscription_ids)}
                                  if granted else {}, now=now)
        return granted

    # ------------------------------------------------------------------ machinery

    def _plan_advance(self, session: Session, row: _PeriodRow, at: datetime, backfill: bool) -> _Advance:
        """What allocation will do to `row`: end it, or move it (maybe to its pending plan)
        to the period containing `at`, granting these periods (each with its key)."""
        if row.status != ACTIVE or row.current_period_end > at:
            return _Advance(row, None, row.anchor_at, [])
        if row.cancel_at_period_end:
            return _Advance(row, None, row.anchor_at, [], end=True)
        plan = session.get(PlanRow, row.plan_id)
        assert plan is not None
        anchor, first = row.anchor_at, row.period_index + 1
        if row.pending_plan_id is not None:
            pending = session.get(PlanRow, row.pending_plan_id)
            assert pending is not None
            if pending.billing_period != plan.billing_period:
                anchor, first = row.current_period_end, 0
            plan = pending
        current = period_index_at(anchor, plan.billing_period, at)
        numbers = range(first, current + 1) if backfill else [current]
        periods = [(n, f"subscription:{row.id}:period:{period_start(anchor, plan.billing_period, n).isoformat()}")
                   for n in numbers]
        return _Advance(row, plan, anchor, periods, current=current)

    def _advance(self, uow: UnitOfWork, advance: _Advance, granted_keys: Collection[str],
                 rolling: list[rules.Lot]) -> int:
        """Move one subscription on: end it, or roll its period's allocation over (under the
        plan that granted it) and grant the new periods."""
        row, plan = advance.row, advance.plan
        if advance.end:
            self._end(uow, row, row.current_period_end, rolling)
            return 0
        if plan is None:
            return 0
        ending = uow.session.get(PlanRow, row.plan_id)
        assert ending is not None
        rollover.at_boundary(uow, row.id, row.user_id, ending, row.anchor_at, row.period_index, rolling)
        if row.pending_plan_id is not None:
            row.anchor_at, row.plan_id, row.pending_plan_id = advance.anchor, plan.id, None
        granted = 0
        for n, key in advance.periods:
            if key not in granted_keys and self._grant_period(uow, row, plan, n, key, system=True):
                granted += 1
        row.period_index = advance.current
        row.current_period_start = period_start(row.anchor_at, plan.billing_period, advance.current)
        row.current_period_end = period_start(row.anchor_at, plan.billing_period, advance.current + 1)
        row.updated_at = uow.at
        return granted

    @staticmethod
    def _expiry(plan: PlanRow, start: datetime, end: datetime) -> datetime:
        return start + timedelta(days=plan.validity_days) if plan.validity_days else end

    def _grant_period(self, uow: UnitOfWork, row: SubscriptionRow | _PeriodRow, plan: PlanRow, n: int, key: str,
                      *, system: bool = False) -> bool:
        start = period_start(row.anchor_at, plan.billing_period, n)
        end = period_start(row.anchor_at, plan.billing_period, n + 1)
        expires_at = self._expiry(plan, start, end)
        if expires_at <= uow.at:
            return False  # a missed period whose credits would already have expired
        if system:
            uow.record_system_operation(key, "AllocatePeriod", row.user_id)
        lot = uow.post(rules.grant(
            uow.account(row.user_id), plan.credit_limit, at=uow.at, key=key, expires_at=expires_at,
            source=CreditSource.SUBSCRIPTION.value, description=f"plan {plan.name}, period {n}",
            metadata={"subscription_id": row.id, "period_index": n},
        )).lot
        assert lot is not None
        rollover.mark(lot, plan, end)
        user_id, subscription_id, plan_id, credits, at = row.user_id, row.id, plan.id, plan.credit_limit, uow.at
        uow.emit(lambda: SubscriptionAllocated(  # the lot's id exists once the writer inserted it
            event_id=new_event_id(), occurred_at=at, user_id=user_id, subscription_id=subscription_id,
            plan_id=plan_id, period_index=n, period_start=start, period_end=end, credits=credits,
            lot_id=_written(lot.id),
        ))
        return True

    def _end(self, uow: UnitOfWork, row: SubscriptionRow | _PeriodRow, ended_at: datetime,
             rolling: list[rules.Lot] | None = None) -> None:
        if rolling is None:
            rolling = rollover.rolling_sources(uow, [row.user_id]).get(row.user_id, [])
        rollover.forgo(uow, rolling)
        row.status = ENDED
        row.ended_at = ended_at
        row.cancel_at_period_end = False
        row.pending_plan_id = None
        uow.emit(SubscriptionEnded(
            event_id=new_event_id(), occurred_at=uow.at, user_id=row.user_id,
            subscription_id=row.id, plan_id=row.plan_id,
        ))

    @staticmethod
    def _plan(session: Session, plan: int | str) -> PlanRow:
        column = PlanRow.id if isinstance(plan, int) and not isinstance(plan, bool) else PlanRow.name
        row = session.scalars(select(PlanRow).where(column == plan)).one_or_none()
        if row is None:
            raise UnknownPlan(f"no plan {plan!r}", plan=plan)
        return row

    @staticmethod
    def _active(session: Session, user_id: str) -> SubscriptionRow | None:
        return session.scalars(
            select(SubscriptionRow).where(
                SubscriptionRow.user_id == user_id, SubscriptionRow.status == ACTIVE
            )
        ).one_or_none()

    def _require_active(self, session: Session, user_id: str) -> SubscriptionRow:
        row = self._active(session, user_id)
        if row is None:
            raise UnknownSubscription(f"user {user_id!r} has no active subscription", user_id=user_id)
        return row


@dataclass(slots=True)
class _PeriodRow:
    """What allocation reads and changes of a subscription row (plain data: the writer
    writes the changes back in one statement with the rest of the unit of work)."""

    id: int
    user_id: str
    plan_id: int
    pending_plan_id: int | None
    status: str
    anchor_at: datetime
    period_index: int
    current_period_start: datetime
    current_period_end: datetime
    cancel_at_period_end: bool
    ended_at: datetime | None
    updated_at: datetime


@dataclass
class _Advance:
    """One subscription's allocation step, planned before any grant (so that the keys of
    every period in a chunk are looked up in one query)."""

    row: _PeriodRow
    plan: PlanRow | None
    anchor: datetime
    periods: list[tuple[int, str]]
    current: int = 0
    end: bool = False


def _written(lot_id: int | None) -> int:
    assert lot_id is not None, "the writer gives a lot its id before it builds the events"
    return lot_id
