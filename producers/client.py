"""The Python producer: enqueue credit operations from any service, synchronously.

Method names and arguments are those of `CreditService`. Input is validated here with
the shared contract models, so bad input raises `ValidationFailed` before anything is
enqueued. Each call returns a `TaskHandle`: keep it to `get()` the result (or the typed
error) later, or drop it for fire-and-forget. `reserve_credits` waits for its answer,
because the caller needs the reservation id.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Generic, TypeVar

from celery import Celery, states
from celery.backends.asynchronous import AsyncBackendMixin
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from pydantic import BaseModel, TypeAdapter

from creditworker.contract import (
    AddCredits,
    BatchOutcome,
    CommitReservation,
    CreditLot,
    CreditsInfo,
    DeductCredits,
    GetCredits,
    GetExpiring,
    GetHistory,
    LedgerEntry,
    ReleaseReservation,
    Reservation,
    ReserveCredits,
    SubmitBatch,
    parse,
    parse_batch_item,
)
from creditworker.errors import CreditError, ServiceUnavailable, ValidationFailed, error_from_dict
from creditworker.plans_contract import (
    AssignPlan,
    ChangePlan,
    CreatePlan,
    DeletePlan,
    GetPlan,
    GetSubscription,
    ListPlans,
    Plan,
    RemovePlan,
    Subscription,
    UpdatePlan,
)
from creditworker.settings import Settings, get_settings

T = TypeVar("T")

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0

TASKS = {
    AddCredits: "creditworker.credits.add",
    DeductCredits: "creditworker.credits.deduct",
    ReserveCredits: "creditworker.credits.reserve",
    CommitReservation: "creditworker.credits.commit",
    ReleaseReservation: "creditworker.credits.release",
    GetCredits: "creditworker.credits.balance",
    GetHistory: "creditworker.credits.history",
    GetExpiring: "creditworker.credits.expiring",
    SubmitBatch: "creditworker.credits.batch",
    CreatePlan: "creditworker.plans.create",
    UpdatePlan: "creditworker.plans.update",
    DeletePlan: "creditworker.plans.delete",
    GetPlan: "creditworker.plans.get",
    ListPlans: "creditworker.plans.list",
    AssignPlan: "creditworker.subscriptions.assign",
    ChangePlan: "creditworker.subscriptions.change",
    RemovePlan: "creditworker.subscriptions.remove",
    GetSubscription: "creditworker.subscriptions.get",
}
"""The task that serves each request model: the wire contract, in one place."""

_ENTRIES: TypeAdapter[list[LedgerEntry]] = TypeAdapter(list[LedgerEntry])
_LOTS: TypeAdapter[list[CreditLot]] = TypeAdapter(list[CreditLot])
_PLANS: TypeAdapter[list[Plan]] = TypeAdapter(list[Plan])
_OUTCOMES: TypeAdapter[list[BatchOutcome]] = TypeAdapter(list[BatchOutcome])


def unwrap(envelope: Any, parse_result: Callable[[Any], T]) -> T:
    """Turn a task's `{"ok": ...}` envelope into the result, or raise its typed error."""
    if not isinstance(envelope, dict) or "ok" not in envelope:
        raise CreditError(f"unexpected task result: {envelope!r}")
    if envelope["ok"]:
        return parse_result(envelope["result"])
    raise error_from_dict(envelope.get("error") or {})


class Answers:
    """One thread reads every answer from a shared Redis result backend; each caller
    sleeps on its own event until its answer is there.

    With Celery's `AsyncResult.get`, every waiting thread takes its turn reading the
    pub/sub connection, and each answer wakes them all, so a producer's CPU per call grows
    with the number of threads waiting. The answer is registered before the message is
    sent, so it cannot arrive unexpected. Other backends (files, rpc:// whose replies
    go to a queue per thread) keep Celery's `get`.
    """

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._start = threading.Lock()
        self._reader: threading.Thread | None = None

    def expect(self, task_id: str) -> tuple[AsyncResult, threading.Event] | None:
        """Register for the answer of `task_id` before it is sent; None: use `get`."""
        backend = self.app.backend
        if not (getattr(backend, "is_async", False) and getattr(backend, "thread_safe", False)):
            return None
        result = AsyncResult(task_id, app=self.app, backend=backend)
        arrived = threading.Event()
        result.then(lambda _answer: arrived.set(), weak=True)  # the handle keeps it alive
        self._ensure_reader()
        return result, arrived

    def _ensure_reader(self) -> None:
        with self._start:
            if self._reader is None or not self._reader.is_alive():
                self._reader = threading.Thread(target=self._read, name="creditworker-answers", daemon=True)
                self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                self.app.backend.result_consumer.drain_events(timeout=1.0)
            except TimeoutError:
                continue
            except Exception:  # the backend reconnects inside drain_events; do not spin
                logger.warning("reading task results failed; retrying", exc_info=True)
                time.sleep(0.5)


class TaskHandle(Generic[T]):
    """An enqueued operation; `get()` waits for its result, `resend()` publishes it again.

    A resend is the same message (same task id, so the same derived idempotency key when
    none was given): it is applied at most once however many copies reach the workers.
    A handle with a `deadline` (a reservation its caller waits for) is refused by any
    worker that gets to it after that instant.
    """

    def __init__(
        self, result: AsyncResult, parse_result: Callable[[Any], T],
        resend: Callable[[], None] | None = None, arrived: threading.Event | None = None,
        deadline: datetime | None = None,
    ) -> None:
        self.result = result
        self._parse = parse_result
        self._resend = resend
        self._arrived = arrived
        self.deadline = deadline

    @property
    def task_id(self) -> str:
        return str(self.result.id)

    def resend(self) -> None:
        """Publish the identical message again (after a broker crash may have lost it)."""
        if self._resend is None:
            raise CreditError("this handle cannot resend its message")
        self._resend()

    def get(self, timeout: float = DEFAULT_TIMEOUT, *, resend_every: float | None = None) -> T:
        """Wait for the result; with `resend_every`, resend while no answer has come.

        With no answer in time it raises `ServiceUnavailable` whose `details["applied"]` is
        False when the operation was not applied and never will be (its deadline passed
        before any worker began it), and None when it may have been or may still be."""
        deadline = time.monotonic() + timeout
        began: list[bool] = []

        def seen(meta: dict[str, Any]) -> None:  # states a result queue (rpc://) passes by
            if meta.get("task_id") == self.task_id and meta.get("status") == states.STARTED:
                began.append(True)

        while True:
            left = deadline - time.monotonic()
            wait = left if resend_every is None else min(left, resend_every)
            try:
                if self._arrived is not None and not self._arrived.wait(max(wait, 0.001)):
                    raise CeleryTimeout()
                envelope = self.result.get(
                    timeout=max(wait, 0.001), propagate=True,
                    on_message=seen if self._arrived is None and _streams(self.result) else None,
                )
                break
            except CeleryTimeout:
                if time.monotonic() >= deadline:
                    envelope = self._last_look(timeout, began=bool(began))
                    break
                self.resend()
            except CreditError:
                raise
            except Exception as exc:  # the task failed after its retries
                raise ServiceUnavailable(
                    f"task {self.task_id} failed: {exc!r}", task_id=self.task_id
                ) from exc
        return unwrap(envelope, self._parse)

    def _last_look(self, timeout: float, *, began: bool) -> Any:
        """The answer if it has just come; else the error saying whether it may still apply."""
        try:
            state = self.result.state
            if state in states.READY_STATES:
                return self.result.get(timeout=1.0, propagate=True)
        except Exception:  # noqa: BLE001 (unknown: said below)
            state = None
        waited = f"no answer for task {self.task_id} within {timeout} s{_embedded_hint(self.result.app)}"
        if self.deadline is not None and datetime.now(UTC) >= self.deadline:
            if state == states.PENDING and not began:
                raise ServiceUnavailable(
                    f"{waited}: not applied, and it never will be: no worker began it before its "
                    f"deadline ({self.deadline.isoformat()}) and every worker refuses it after "
                    "that. A retry with the same idempotency key is safe.",
                    task_id=self.task_id, applied=False, deadline=self.deadline.isoformat(),
                )
            raise ServiceUnavailable(
                f"{waited}: a worker began it before its deadline ({self.deadline.isoformat()}), "
                "so it may have been applied. A retry with the same idempotency key returns its "
                "result if it was, and applies it if it was not.",
                task_id=self.task_id, applied=None, deadline=self.deadline.isoformat(),
            )
        raise ServiceUnavailable(
            f"{waited}: it is still queued or running and may yet be applied (a retry with the "
            "same idempotency key is safe)",
            task_id=self.task_id, applied=None,
        )


def _streams(result: AsyncResult) -> bool:
    """Whether the result backend passes each state by as a message (Redis, rpc://); the
    embedded file backend refuses an `on_message` callback."""
    return isinstance(result.backend, AsyncBackendMixin)


def _embedded_hint(app: Celery) -> str:
    """On the embedded broker, where the message waits: a worker started in another
    directory reads other folders, and nothing says so but this."""
    if not str(app.conf.broker_url).startswith("filesystem"):
        return ""
    folder = (app.conf.broker_transport_options or {}).get("data_folder_in")
    if not folder:
        return ""
    data_dir = Path(folder).parent.parent
    return (f" (the embedded broker in {data_dir}: no worker consumes it? Start `creditworker up` "
            f"in {data_dir.parent}, or set CREDITWORKER_DATA_DIR to the worker's data directory)")


def wait_deadline(timeout: float, deadline: datetime | None = None) -> datetime:
    """When a caller waiting `timeout` seconds from now stops (or its earlier `deadline`)."""
    ends = datetime.now(UTC) + timedelta(seconds=timeout)
    return ends if deadline is None else min(ends, _aware(deadline))


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo else at.replace(tzinfo=UTC)


class CreditClient:
    """Sends credit operations to the workers through the configured broker."""

    def __init__(self, settings: Settings | None = None, *, app: Celery | None = None) -> None:
        if app is None:
            from creditworker.worker.app import make_celery

            app = make_celery(settings or get_settings())
        self.app = app
        # Create the result backend now: a shared (Redis) one would otherwise be created
        # by every thread whose first call races the others. It connects only when used.
        app.backend  # noqa: B018 (the property creates it)
        self._answers = Answers(app)

    def _send(
        self, request: BaseModel, parse_result: Callable[[Any], T], deadline: datetime | None = None
    ) -> TaskHandle[T]:
        kwargs = request.model_dump(mode="json", exclude_none=True)
        name, task_id = TASKS[type(request)], str(uuid.uuid4())

        def publish() -> AsyncResult:
            try:
                return self.app.send_task(name, kwargs=kwargs, task_id=task_id)
            except OperationalError as exc:
                raise ServiceUnavailable(f"the broker did not accept the task: {exc}") from exc
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
        return TaskHandle(expected[0], parse_result, resend, expected[1], deadline=deadline)

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
    ) -> TaskHandle[LedgerEntry]:
        request = parse(AddCredits, dict(
            user_id=user_id, amount=amount, expires_at=expires_at, priority=priority,
            source=source, description=description, metadata=metadata,
            idempotency_key=idempotency_key,
        ))
        return self._send(request, LedgerEntry.model_validate)

    def deduct_credits(
        self,
        user_id: str,
        amount: int,
        *,
        description: str | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> TaskHandle[LedgerEntry]:
        request = parse(DeductCredits, dict(
            user_id=user_id, amount=amount, description=description, metadata=metadata,
            idempotency_key=idempotency_key,
        ))
        return self._send(request, LedgerEntry.model_validate)

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
    ) -> TaskHandle[Reservation]:
        """Enqueue a reservation without waiting (the async client builds on this).

        Its TTL runs from `requested_at` (default: now), not from when a worker gets to it;
        with a `deadline`, no worker applies it after that instant."""
        fields: dict[str, Any] = dict(
            user_id=user_id, amount=amount, description=description, metadata=metadata,
            idempotency_key=idempotency_key, requested_at=requested_at or datetime.now(UTC),
            deadline=deadline,
        )
        if ttl_seconds is not None:
            fields["ttl_seconds"] = ttl_seconds
        request = parse(ReserveCredits, fields)
        return self._send(request, Reservation.model_validate, deadline=request.deadline)

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
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Reservation:
        """Reserve and wait for the reservation (raises the typed error if refused).

        The message carries the instant this call stops waiting as its deadline, so a
        reservation that reaches a worker later is never applied: on a timeout the error's
        `details["applied"]` is False (or None when a worker began it in time)."""
        return self.submit_reserve(
            user_id, amount, ttl_seconds=ttl_seconds, description=description,
            metadata=metadata, idempotency_key=idempotency_key, requested_at=requested_at,
            deadline=wait_deadline(timeout, deadline),
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
        request = parse(CommitReservation, dict(
            reservation_id=reservation_id, amount=amount, description=description,
            metadata=metadata, idempotency_key=idempotency_key,
        ))
        return self._send(request, LedgerEntry.model_validate)

    def release_reservation(
        self, reservation_id: str, *, idempotency_key: str | None = None
    ) -> TaskHandle[LedgerEntry]:
        request = parse(ReleaseReservation, dict(
            reservation_id=reservation_id, idempotency_key=idempotency_key
        ))
        return self._send(request, LedgerEntry.model_validate)

    def get_user_credits_info(self, user_id: str) -> TaskHandle[CreditsInfo]:
        return self._send(parse(GetCredits, {"user_id": user_id}), CreditsInfo.model_validate)

    def get_history(
        self,
        user_id: str,
        *,
        limit: int = 50,
        before: int | None = None,
        kinds: Sequence[str] | None = None,
    ) -> TaskHandle[list[LedgerEntry]]:
        request = parse(GetHistory, dict(
            user_id=user_id, limit=limit, before=before,
            kinds=list(kinds) if kinds is not None else None,
        ))
        return self._send(request, _ENTRIES.validate_python)

    def get_expiring_credits(self, user_id: str, within_days: int = 7) -> TaskHandle[list[CreditLot]]:
        request = parse(GetExpiring, {"user_id": user_id, "within_days": within_days})
        return self._send(request, _LOTS.validate_python)

    def submit_batch(self, operations: Sequence[dict[str, Any]]) -> TaskHandle[list[BatchOutcome]]:
        """Enqueue up to 1,000 operations (`{"op": "deduct", "user_id": ..., "amount": ...}`)
        for one transaction; the result has one outcome per item, in order."""
        items = []
        for index, item in enumerate(operations):
            try:
                request = parse_batch_item(item)
            except ValidationFailed as exc:
                raise ValidationFailed(f"operation {index}: {exc.message}", index=index, **exc.details) from None
            items.append({"op": item["op"], **request.model_dump(mode="json", exclude_none=True)})
        return self._send(parse(SubmitBatch, {"operations": items}), _OUTCOMES.validate_python)

    # ------------------------------------------------------------ plans and subscriptions

    def create_plan(
        self,
        name: str,
        credit_limit: int,
        *,
        price: Decimal | str | int = Decimal("0"),
        currency: str = "USD",
        billing_period: str = "monthly",
        validity_days: int | None = None,
        active: bool = True,
        idempotency_key: str | None = None,
    ) -> TaskHandle[Plan]:
        request = parse(CreatePlan, dict(
            name=name, credit_limit=credit_limit, price=price, currency=currency,
            billing_period=billing_period, validity_days=validity_days, active=active,
            idempotency_key=idempotency_key,
        ))
        return self._send(request, Plan.model_validate)

    def update_plan(self, plan: int | str, **changes: Any) -> TaskHandle[Plan]:
        """Change name, credit_limit, price, currency, validity_days or active."""
        return self._send(parse(UpdatePlan, {"plan": plan, **changes}), Plan.model_validate)

    def delete_plan(self, plan: int | str) -> TaskHandle[dict[str, Any]]:
        """Delete an unused plan; `get()` raises `PlanInUse` if it was deactivated instead."""
        return self._send(parse(DeletePlan, {"plan": plan}), dict)

    def get_plan(self, plan: int | str) -> TaskHandle[Plan]:
        return self._send(parse(GetPlan, {"plan": plan}), Plan.model_validate)

    def list_plans(self, *, include_inactive: bool = False) -> TaskHandle[list[Plan]]:
        request = parse(ListPlans, {"include_inactive": include_inactive})
        return self._send(request, _PLANS.validate_python)

    def assign_plan(
        self, user_id: str, plan: int | str, *, start_at: datetime | None = None,
        idempotency_key: str | None = None,
    ) -> TaskHandle[Subscription]:
        request = parse(AssignPlan, dict(
            user_id=user_id, plan=plan, start_at=start_at, idempotency_key=idempotency_key
        ))
        return self._send(request, Subscription.model_validate)

    def change_plan(
        self, user_id: str, plan: int | str, *, idempotency_key: str | None = None
    ) -> TaskHandle[Subscription]:
        request = parse(ChangePlan, dict(user_id=user_id, plan=plan, idempotency_key=idempotency_key))
        return self._send(request, Subscription.model_validate)

    def remove_plan(
        self, user_id: str, *, at_period_end: bool = True, idempotency_key: str | None = None
    ) -> TaskHandle[Subscription]:
        request = parse(RemovePlan, dict(
            user_id=user_id, at_period_end=at_period_end, idempotency_key=idempotency_key
        ))
        return self._send(request, Subscription.model_validate)

    def get_user_subscription(self, user_id: str) -> TaskHandle[Subscription]:
        return self._send(parse(GetSubscription, {"user_id": user_id}), Subscription.model_validate)
