"""Celery tasks: thin adapters that validate a message, call the engine and return JSON.

Every result is `{"ok": true, "result": ...}` or `{"ok": false, "error": {"code", "message",
"details"}}`. Business refusals are results, never retried and never a crash loop; only
transient database errors are retried, with exponential backoff and jitter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Task, current_app
from pydantic import BaseModel

from creditworker.contract import (
    AddCredits,
    BatchOutcome,
    CommitReservation,
    DeductCredits,
    GetCredits,
    GetExpiring,
    GetHistory,
    ReleaseReservation,
    Request,
    ReserveCredits,
    SubmitBatch,
    parse,
)
from creditworker.credits import CreditService
from creditworker.errors import CreditError, ValidationFailed
from creditworker.plans_contract import (
    AllocateSubscriptions,
    AssignPlan,
    ChangePlan,
    CreatePlan,
    DeletePlan,
    GetPlan,
    GetSubscription,
    ListPlans,
    RemovePlan,
    UpdatePlan,
)
from creditworker.settings import get_settings
from creditworker.storage.database import is_transient
from creditworker.subscriptions import SubscriptionService
from creditworker.worker import delivery
from creditworker.worker.app import default_app
from creditworker.worker.gather import GatheredTask

app = default_app()

_service: CreditService | None = None
_subscriptions: SubscriptionService | None = None


def service() -> CreditService:
    """The worker process's engine, created on first use (after the prefork pool forked)."""
    global _service
    if _service is None:
        _service = CreditService.from_settings(on_events=lambda _count: relay_events.apply_async())
    return _service


def subscriptions() -> SubscriptionService:
    global _subscriptions
    if _subscriptions is None:
        _subscriptions = SubscriptionService(service(), chunk_size=get_settings().allocation_chunk_size)
    return _subscriptions


def _dump(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_dump(item) for item in value]
    return value


def _handle(
    task: Task,
    model: type[BaseModel],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    call: Callable[[Any, str], Any],
) -> dict[str, Any]:
    """Validate, run, and turn the outcome into the wire envelope."""
    try:
        if args:
            raise ValidationFailed(
                f"{task.name} takes keyword arguments only, got {len(args)} positional"
            )
        request = parse(model, kwargs)
        key = getattr(request, "idempotency_key", None) or f"task:{task.request.id}"
        return {"ok": True, "result": _dump(call(request, key))}
    except CreditError as exc:
        return {"ok": False, "error": exc.to_dict()}
    except Exception as exc:  # noqa: BLE001 (retried if transient, else raised: `delivery`)
        delivery.retry_single(task, exc)


GATHERED: dict[str, type[Request]] = {
    "creditworker.credits.add": AddCredits,
    "creditworker.credits.deduct": DeductCredits,
    "creditworker.credits.reserve": ReserveCredits,
    "creditworker.credits.commit": CommitReservation,
    "creditworker.credits.release": ReleaseReservation,
}
"""The single-operation tasks whose messages the worker gathers (see `gather`)."""


class GatheredCreditTask(GatheredTask):
    def apply_gathered(self, entries: list[dict[str, Any]]) -> list[dict[str, Any] | BaseException]:
        return apply_gathered(entries, lambda name: self.app.tasks[name])


def apply_gathered(
    entries: list[dict[str, Any]], task_for: Callable[[str], Task] | None = None
) -> list[dict[str, Any] | BaseException]:
    """Gathered messages applied as one batch: per message, the envelope its task returns
    when it runs alone, or the exception it raises (Celery's `Retry` when a transient
    error sent it back to the broker, `delivery`)."""
    outcomes: list[dict[str, Any] | BaseException] = [{}] * len(entries)
    requests: list[Request] = []
    keys: list[str] = []
    places: list[int] = []
    for place, entry in enumerate(entries):
        try:
            if entry["args"]:
                raise ValidationFailed(
                    f"{entry['task']} takes keyword arguments only, got {len(entry['args'])} positional"
                )
            request = parse(GATHERED[entry["task"]], entry["kwargs"] or {})
        except CreditError as exc:
            outcomes[place] = {"ok": False, "error": exc.to_dict()}
            continue
        requests.append(request)
        keys.append(request.idempotency_key or f"task:{entry['id']}")
        places.append(place)
    for place, outcome in zip(places, _batch_envelopes(requests, keys)):
        if isinstance(outcome, BaseException):
            outcome = delivery.retry_gathered(task_for or current_app.tasks.__getitem__, entries[place], outcome)
        outcomes[place] = outcome
    return outcomes


def _batch_envelopes(requests: list[Request], keys: list[str]) -> list[dict[str, Any] | BaseException]:
    """A transient failure is every message's outcome (`delivery` sends them back to the
    broker; this process never waits for the database); any other failure splits the batch
    so that one bad operation fails alone."""
    if not requests:
        return []
    try:
        return [_envelope(outcome) for outcome in service().apply_batch(requests, default_keys=keys)]
    except Exception as exc:  # noqa: BLE001 (the failure is each message's outcome)
        if is_transient(exc) or len(requests) == 1:
            return [exc] * len(requests)
        return [outcome for request, key in zip(requests, keys) for outcome in _batch_envelopes([request], [key])]


def _envelope(outcome: BatchOutcome) -> dict[str, Any]:
    if outcome.ok:
        return {"ok": True, "result": outcome.result}
    return {"ok": False, "error": outcome.error}


def _fields(request: BaseModel, *exclude: str) -> dict[str, Any]:
    return {name: getattr(request, name) for name in type(request).model_fields if name not in exclude}


@app.task(name="creditworker.credits.add", bind=True, base=GatheredCreditTask)
def add_credits(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return _handle(self, AddCredits, args, kwargs, lambda r, key: service().add_credits(
        **_fields(r, "idempotency_key"), idempotency_key=key))


@app.task(name="creditworker.credits.deduct", bind=True, base=GatheredCreditTask)
def deduct_credits(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return _handle(self, DeductCredits, args, kwargs, lambda r, key: service().deduct_credits(
        **_fields(r, "idempotency_key"), idempotency_key=key))


@app.task(name="creditworker.credits.reserve", bind=True, base=GatheredCreditTask)
def reserve_credits(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return _handle(self, ReserveCredits, args, kwargs, lambda r, key: service().reserve_credits(
        **_fields(r, "idempotency_key"), idempotency_key=key))


@app.task(name="creditworker.credits.commit", bind=True, base=GatheredCreditTask)
def commit_reservation(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return _handle(self, CommitReservation, args, kwargs, lambda r, key: service().commit_reservation(
        **_fields(r, "idempotency_key"), idempotency_key=key))


@app.task(name="creditworker.credits.release", bind=True, base=GatheredCreditTask)
def release_reservation(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return _handle(self, ReleaseReservation, args, kwargs, lambda r, key: service().release_reservation(
        r.reservation_id, idempotency_key=key))


@app.task(name="creditworker.credits.batch", bind=True)
def apply_batch(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Many operations in one transaction; item i without a key is keyed `task:<id>:<i>`."""
    return _handle(self, SubmitBatch, args, kwargs, lambda r, key: service().apply_batch(
        r.operations, default_keys=[f"{key}:{i}" for i in range(len(r.operations))]))


@app.task(name="creditworker.credits.balance", bind=True)
def get_balance(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return _handle(self, GetCredits, args, kwargs, lambda r, _key: service().get_user_credits_info(r.user_id))


@app.task(name="creditworker.credits.history", bind=True)
def get_history(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return _handle(self, GetHistory, args, kwargs, lambda r, _key: service().get_history(
        r.user_id, limit=r.limit, before=r.before, kinds=r.kinds))


@app.task(name="creditworker.credits.expiring", bind=True)
def get_expiring(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return _handle(self, GetExpiring, args, kwargs, lambda r, _key: service().get_expiring_credits(
        r.user_id, r.within_days))


class _NoArguments(BaseModel):
    model_config = {"extra": "forbid"}


@app.task(name="creditworker.health.ping", bind=True)
def ping(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """A round trip through broker and worker that touches nothing: a health check, and
    the floor the benchmarks compare every operation against."""
    return _handle(self, _NoArguments, args, kwargs, lambda _r, _key: {"pong": True})


@app.task(name="creditworker.credits.expire", bind=True)
def expire_credits(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return _handle(self, _NoArguments, args, kwargs, lambda _r, _key: {"expired": service().expire_credits()})


@app.task(name="creditworker.reservations.release_stale", bind=True)
def release_stale_reservations(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return _handle(self, _NoArguments, args, kwargs,
                   lambda _r, _key: {"released": service().release_stale_reservations()})


@app.task(name="creditworker.credits.remind", bind=True)
def send_expiry_reminders(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return _handle(self, _NoArguments, args, kwargs, lambda _r, _key: {"reminded": service().send_expiry_reminders()})


@app.task(name="creditworker.events.relay", bind=True)
def relay_events(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Publish pending outbox rows to the events exchange (woken after changes, and by beat)."""
    from creditworker.event_bus import EventPublisher
    from creditworker.outbox import publish_pending

    def publish(_request: Any, _key: str) -> dict[str, int]:
        with app.connection_for_write() as connection:
            return {"published": publish_pending(service().engine, EventPublisher(connection))}

    return _handle(self, _NoArguments, args, kwargs, publish)


# ---------------------------------------------------------------- plans and subscriptions


@app.task(name="creditworker.plans.create", bind=True)
def create_plan(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return _handle(self, CreatePlan, args, kwargs, lambda r, key: subscriptions().create_plan(
        **_fields(r, "idempotency_key"), idempotency_key=key))


@app.task(name="creditworker.plans.update", bind=True)
def update_plan(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return _handle(self, UpdatePlan, args, kwargs, lambda r, key: subscriptions().update_plan(
        r.plan, **r.model_dump(exclude={"plan", "idempotency_key"}, exclude_unset=True), idempotency_key=key))


@app.task(name="creditworker.plans.delete", bind=True)
def delete_plan(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    def delete(request: DeletePlan, key: str) -> dict[str, Any]:
        subscriptions().delete_plan(request.plan, idempotency_key=key)
        return {"deleted": request.plan}

    return _handle(self, DeletePlan, args, kwargs, delete)


@app.task(name="creditworker.plans.get", bind=True)
def get_plan(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return _handle(self, GetPlan, args, kwargs, lambda r, _key: subscriptions().get_plan(r.plan))


@app.task(name="creditworker.plans.list", bind=True)
def list_plans(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return _handle(self, ListPlans, args, kwargs, lambda r, _key: subscriptions().list_plans(
        include_inactive=r.include_inactive))


@app.task(name="creditworker.subscriptions.assign", bind=True)
def assign_plan(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return _handle(self, AssignPlan, args, kwargs, lambda r, key: subscriptions().assign_plan(
        **_fields(r, "idempotency_key"), idempotency_key=key))


@app.task(name="creditworker.subscriptions.change", bind=True)
def change_plan(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return _handle(self, ChangePlan, args, kwargs, lambda r, key: subscriptions().change_plan(
        **_fields(r, "idempotency_key"), idempotency_key=key))


@app.task(name="creditworker.subscriptions.remove", bind=True)
def remove_plan(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return _handle(self, RemovePlan, args, kwargs, lambda r, key: subscriptions().remove_plan(
        **_fields(r, "idempotency_key"), idempotency_key=key))


@app.task(name="creditworker.subscriptions.get", bind=True)
def get_user_subscription(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return _handle(self, GetSubscription, args, kwargs,
                   lambda r, _key: subscriptions().get_user_subscription(r.user_id))


@app.task(name="creditworker.subscriptions.allocate", bind=True)
def allocate_subscriptions(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Grant one chunk of due subscriptions their current period (once per period)."""
    return _handle(self, AllocateSubscriptions, args, kwargs, lambda r, _key: {
        "granted": subscriptions().allocate(
            r.subscription_ids, backfill=get_settings().allocation_backfill)
    })


@app.task(name="creditworker.subscriptions.allocate_due", bind=True)
def allocate_due(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Beat's entry point: fan the due subscriptions out as chunk tasks over the workers.

    Listing ids is cheap; the grants run in `creditworker.subscriptions.allocate`, one
    transaction per chunk. A chunk sent twice (the next beat tick came first) grants
    nothing twice.
    """

    def fan_out(_request: Any, _key: str) -> dict[str, int]:
        chunks = total = after_id = 0
        while ids := subscriptions().due_subscription_ids(after_id=after_id):
            allocate_subscriptions.apply_async(kwargs={"subscription_ids": ids})
            chunks, total, after_id = chunks + 1, total + len(ids), ids[-1]
        return {"chunks": chunks, "subscriptions": total}

    return _handle(self, _NoArguments, args, kwargs, fan_out)
