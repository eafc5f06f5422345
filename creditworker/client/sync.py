"""The Python producer: enqueue credit operations from any service, synchronously.

Method names and arguments are those of `CreditService`. Input is validated here with
the shared contract models, so bad input raises `ValidationFailed` before anything is
enqueued. Each call returns a `TaskHandle`: keep it to `get()` the result (or the typed
error) later, or drop it for fire-and-forget. `reserve_credits` waits for its answer,
because the caller needs the reservation id.

The Celery app comes from `creditworker.worker.app.make_celery`, imported only when no app
is given: the sender and the workers must agree on every delivery setting (serializer,
publisher confirms, visibility timeout, result backend), and one function keeps them equal.
That module imports Celery, kombu and the settings, never the storage stack
(tests/e2e/test_worker.py checks what importing `producers` loads).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from celery import Celery
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url
from pydantic import BaseModel

from creditworker.client.answers import Answers
from creditworker.client.handle import DEFAULT_TIMEOUT, TaskHandle, wait_deadline
from creditworker.contract.credits import (
    DEFAULT_CREDIT_TYPE,
    AddCredits,
    BatchOutcome,
    ChangeLotExpiry,
    CommitReservation,
    CostBasis,
    CreditLot,
    CreditsInfo,
    DeductCredits,
    GetCredits,
    GetExpiring,
    GetHistory,
    GetReservation,
    GetUsage,
    LedgerEntry,
    LowCreditThreshold,
    RefundDeduction,
    ReleaseReservation,
    Reservation,
    ReserveCredits,
    SetLowCreditThreshold,
    SubmitBatch,
    UsagePeriod,
    VoidLot,
    parse,
    parse_batch_item,
)
from creditworker.contract.errors import ServiceUnavailable, ValidationFailed
from creditworker.contract.operations import BY_REQUEST
from creditworker.contract.plans import (
    AssignPlan,
    ChangePlan,
    CreatePlan,
    DeletedPlan,
    DeletePlan,
    GetPlan,
    GetSubscription,
    ListPlans,
    Plan,
    RemovePlan,
    Subscription,
    UpdatePlan,
)
from creditworker.contract.topups import (
    AutoTopupRule,
    CompleteTopup,
    GetAutoTopup,
    ListTopups,
    RemoveAutoTopup,
    RemovedAutoTopup,
    SetAutoTopup,
    Topup,
)
from creditworker.settings import Settings, get_settings

TASKS: dict[type[BaseModel], str] = {
    model: operation.task for model, operation in BY_REQUEST.items()
}
"""The task that serves each request model, from the registry (contract/operations.py)."""


def fail_fast(app: Celery, timeout: float) -> None:
    """A producer's app gives up on an unreachable broker within `timeout` seconds.

    kombu's defaults retry a refused connection for several seconds on each of Celery's
    publish retries, and the caller (often a web request) waits for all of them. A worker's
    app keeps the defaults: it should wait for its broker to come back."""
    options = dict(app.conf.broker_transport_options or {})
    options.update(max_retries=100, interval_start=0, interval_step=0.2, interval_max=0.5,
                   connect_retries_timeout=timeout)
    app.conf.broker_transport_options = options
    app.conf.broker_connection_timeout = timeout
    app.conf.task_publish_retry_policy = {
        "max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}


class CreditClient:
    """Sends credit operations to the workers through the configured broker."""

    def __init__(self, settings: Settings | None = None, *, app: Celery | None = None) -> None:
        settings = settings or get_settings()
        if app is None:
            from creditworker.worker.app import make_celery

            app = make_celery(settings)
            fail_fast(app, settings.broker_connect_timeout_seconds)
        self.app = app
        # Create the result backend now: a shared (Redis) one would otherwise be created
        # by every thread whose first call races the others. It connects only when used.
        app.backend  # noqa: B018 (the property creates it)
        self._answers = Answers(app, subscribe_timeout=settings.broker_connect_timeout_seconds)

    def _call(self, model: type[BaseModel], arguments: dict[str, Any]) -> TaskHandle[Any]:
        """A typed method's arguments (its `locals()`) validated into `model` and sent."""
        fields = {
            name: value for name, value in arguments.items() if name not in ("self", "__class__")
        }
        return self._send(parse(model, fields))

    def _send(self, request: BaseModel) -> TaskHandle[Any]:
        """Send `request` as the task the registry names for its model; the handle parses the
        result into the registry's result type (and knows the request's deadline, if any)."""
        operation = BY_REQUEST[type(request)]
        deadline: datetime | None = getattr(request, "deadline", None)
        parse_result = operation.results.validate_python
        kwargs = request.model_dump(mode="json", exclude_none=True)
        if kwargs.get("credit_type") == DEFAULT_CREDIT_TYPE:  # a worker from before types reads it too
            del kwargs["credit_type"]
        name, task_id = operation.task, self._answers.task_id()

        def publish() -> AsyncResult:
            try:
                return self.app.send_task(name, kwargs=kwargs, task_id=task_id)
            except OperationalError as exc:
                raise ServiceUnavailable(
                    f"cannot reach the broker {maybe_sanitize_url(self.app.conf.broker_url)} ({exc}): "
                    "check that it runs there, or set CREDITWORKER_BROKER_URL") from exc
            except RuntimeError as exc:  # Celery gave up reconnecting to the result backend
                raise ServiceUnavailable(f"the result backend is unreachable: {exc}") from exc

        def resend() -> None:
            publish()

        try:
            expected = self._answers.expect(task_id)
        except RuntimeError as exc:  # Celery gave up reconnecting to the result backend
            raise ServiceUnavailable(f"the result backend is unreachable: {exc}") from exc
        sent = publish()
        if expected is None:
            return TaskHandle(sent, parse_result, resend, deadline=deadline)
        return TaskHandle(sent, parse_result, resend, expected, deadline=deadline)

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
        cost_basis: CostBasis | dict[str, Any] | None = None,
    ) -> TaskHandle[LedgerEntry]:
        return self._call(AddCredits, locals())

    def deduct_credits(
        self,
        user_id: str,
        amount: int,
        *,
        description: str | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        credit_type: str = DEFAULT_CREDIT_TYPE,
    ) -> TaskHandle[LedgerEntry]:
        return self._call(DeductCredits, locals())

    def submit_reserve(
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
    ) -> TaskHandle[Reservation]:
        """Enqueue a reservation without waiting (the async client builds on this).

        Its TTL runs from `requested_at` (default: now), not from when a worker gets to it;
        with a `deadline`, no worker applies it after that instant."""
        arguments = {**locals(), "requested_at": requested_at or datetime.now(UTC)}
        if ttl_seconds is None:
            del arguments["ttl_seconds"]  # the contract's default
        return self._call(ReserveCredits, arguments)

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
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Reservation:
        """Reserve and wait for the reservation (raises the typed error if refused).

        The message carries the instant this call stops waiting as its deadline, so a
        reservation that reaches a worker later is never applied: on a timeout the error's
        `details["applied"]` is False (or None when a worker began it in time)."""
        return self.submit_reserve(
            user_id, amount, ttl_seconds=ttl_seconds, description=description,
            metadata=metadata, idempotency_key=idempotency_key, requested_at=requested_at,
            deadline=wait_deadline(timeout, deadline), credit_type=credit_type,
        ).get(timeout)

    def commit_reservation(
        self,
        reservation_id: str,
        amount: int | None = None,
        *,
        description: str | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> TaskHandle[LedgerEntry]:
        return self._call(CommitReservation, locals())

    def release_reservation(
        self, reservation_id: str, *, idempotency_key: str | None = None
    ) -> TaskHandle[LedgerEntry]:
        return self._call(ReleaseReservation, locals())

    def void_lot(
        self, lot_id: int, *, reason: str, amount: int | None = None, idempotency_key: str | None = None
    ) -> TaskHandle[LedgerEntry]:
        return self._call(VoidLot, locals())

    def refund_deduction(
        self, entry_id: int, *, reason: str, amount: int | None = None, idempotency_key: str | None = None
    ) -> TaskHandle[LedgerEntry]:
        return self._call(RefundDeduction, locals())

    def change_lot_expiry(
        self, lot_id: int, expires_at: datetime, *, idempotency_key: str | None = None
    ) -> TaskHandle[LedgerEntry]:
        return self._call(ChangeLotExpiry, locals())

    def set_low_credit_threshold(
        self, user_id: str, threshold: int | None = None, *, percent: int | None = None,
        credit_type: str = DEFAULT_CREDIT_TYPE, idempotency_key: str | None = None,
    ) -> TaskHandle[LowCreditThreshold]:
        """`threshold` credits or `percent` of the type's last grant; neither: the default."""
        return self._call(SetLowCreditThreshold, locals())

    def get_user_credits_info(
        self, user_id: str, *, at: datetime | None = None, credit_type: str | None = None
    ) -> TaskHandle[CreditsInfo]:
        return self._call(GetCredits, locals())

    def get_usage(
        self, user_id: str | None = None, *, start: datetime, end: datetime,
        granularity: str = "day", credit_type: str | None = None,
    ) -> TaskHandle[list[UsagePeriod]]:
        return self._call(GetUsage, locals())

    def get_history(
        self,
        user_id: str,
        *,
        limit: int = 50,
        before: int | None = None,
        kinds: Sequence[str] | None = None,
        credit_type: str | None = None,
    ) -> TaskHandle[list[LedgerEntry]]:
        arguments = {**locals(), "kinds": list(kinds) if kinds is not None else None}
        return self._call(GetHistory, arguments)

    def get_expiring_credits(
        self, user_id: str, within_days: int = 7, *, credit_type: str | None = None
    ) -> TaskHandle[list[CreditLot]]:
        return self._call(GetExpiring, locals())

    def get_reservation(self, reservation_id: str) -> TaskHandle[Reservation]:
        return self._call(GetReservation, locals())

    def submit_batch(self, operations: Sequence[dict[str, Any]]) -> TaskHandle[list[BatchOutcome]]:
        """Enqueue up to 1,000 operations (`{"op": "deduct", "user_id": ..., "amount": ...}`)
        for one transaction; the result has one outcome per item, in order."""
        items = []
        for index, item in enumerate(operations):
            try:
                request = parse_batch_item(item)
            except ValidationFailed as exc:
                raise ValidationFailed(
                    f"operation {index}: {exc.message}", index=index, **exc.details
                ) from None
            items.append({"op": item["op"], **request.model_dump(mode="json", exclude_none=True)})
        return self._send(parse(SubmitBatch, {"operations": items}))

    # ------------------------------------------------------------ plans and subscriptions

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
    ) -> TaskHandle[Plan]:
        """A plan; `rollover_max` (credits) or `rollover_max_percent` of each period's
        unused allocation rolls into the next, expiring `rollover_expires_after_periods`
        periods after the boundary."""
        return self._call(CreatePlan, locals())

    def update_plan(
        self, plan: int | str, *, idempotency_key: str | None = None, **changes: Any
    ) -> TaskHandle[Plan]:
        """Change name, credit_limit, price, currency, validity_days, active or the rollover
        fields (a null rollover field clears it)."""
        return self._call(UpdatePlan, {"plan": plan, **changes, "idempotency_key": idempotency_key})

    def delete_plan(
        self, plan: int | str, *, idempotency_key: str | None = None
    ) -> TaskHandle[DeletedPlan]:
        """Delete an unused plan; `get()` raises `PlanInUse` if it was deactivated instead."""
        return self._call(DeletePlan, locals())

    def get_plan(self, plan: int | str) -> TaskHandle[Plan]:
        return self._call(GetPlan, locals())

    def list_plans(self, *, include_inactive: bool = False) -> TaskHandle[list[Plan]]:
        return self._call(ListPlans, locals())

    def assign_plan(
        self, user_id: str, plan: int | str, *, start_at: datetime | None = None,
        idempotency_key: str | None = None,
    ) -> TaskHandle[Subscription]:
        return self._call(AssignPlan, locals())

    def change_plan(
        self, user_id: str, plan: int | str, *, idempotency_key: str | None = None
    ) -> TaskHandle[Subscription]:
        return self._call(ChangePlan, locals())

    def remove_plan(
        self, user_id: str, *, at_period_end: bool = True, idempotency_key: str | None = None
    ) -> TaskHandle[Subscription]:
        return self._call(RemovePlan, locals())

    def get_user_subscription(self, user_id: str) -> TaskHandle[Subscription]:
        return self._call(GetSubscription, locals())

    # ------------------------------------------------------------ auto top-ups

    def set_auto_topup(
        self, user_id: str, *, threshold: int, amount: int | None = None, target: int | None = None,
        credit_type: str = DEFAULT_CREDIT_TYPE, max_per_month: Decimal | str | int | None = None,
        unit_price: Decimal | str | int | None = None, currency: str = "USD",
        expires_after_days: int | None = None, idempotency_key: str | None = None,
    ) -> TaskHandle[AutoTopupRule]:
        """When a write leaves `available` below `threshold`, buy `amount` (or up to `target`)."""
        return self._call(SetAutoTopup, locals())

    def get_auto_topup(
        self, user_id: str, *, credit_type: str = DEFAULT_CREDIT_TYPE
    ) -> TaskHandle[AutoTopupRule | None]:
        return self._call(GetAutoTopup, locals())

    def remove_auto_topup(
        self, user_id: str, *, credit_type: str = DEFAULT_CREDIT_TYPE, idempotency_key: str | None = None
    ) -> TaskHandle[RemovedAutoTopup]:
        return self._call(RemoveAutoTopup, locals())

    def list_topups(
        self, *, user_id: str | None = None, state: str | None = None, limit: int = 50
    ) -> TaskHandle[list[Topup]]:
        return self._call(ListTopups, locals())

    def complete_topup(
        self, topup_id: int, *, succeeded: bool, reference: str | None = None, error: str | None = None,
        idempotency_key: str | None = None,
    ) -> TaskHandle[Topup]:
        """The provider's late answer for a pending top-up (its webhook calls this)."""
        return self._call(CompleteTopup, locals())
