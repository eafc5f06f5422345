"""Celery tasks, registered from the registry of operations with one generic body.

A task validates its message with the operation's request model, calls the engine and
returns JSON: `{"ok": true, "result": ...}` or `{"ok": false, "error": {"code", "message",
"details"}}`. Business refusals are results, never retried and never a crash loop; a
transient database error follows the one retry policy of `delivery`.

Operations go through the engine's one dispatch (`engine.handlers`); the few that need
the Celery app or a broker connection (the health check, the beat fan-out, the event
relay) have an adapter in `ADAPTERS`. The tasks
are shared tasks: every Celery app gets them when it is finalized, so this module needs
no app at import.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from celery import Task, current_app, shared_task
from celery.exceptions import Retry
from pydantic import BaseModel

from creditworker.contract.credits import BatchOutcome, Request, parse
from creditworker.contract.errors import CreditError, ValidationFailed
from creditworker.contract.events import TopupRequested
from creditworker.contract.operations import (
    ALLOCATE,
    ALLOCATE_DUE,
    BY_TASK,
    CHARGE_DUE_TOPUPS,
    CHARGE_TOPUP,
    DELIVER_WEBHOOKS,
    OPERATIONS,
    PING,
    RELAY,
    Operation,
)
from creditworker.engine import CreditService, SubscriptionService
from creditworker.engine.handlers import Services, dispatch
from creditworker.metrics import instruments
from creditworker.storage.database import is_transient
from creditworker.worker import delivery, startup  # noqa: F401 (startup: its worker_init check)
from creditworker.worker.configured import settings_of
from creditworker.worker.gather import GatheredTask

_service: CreditService | None = None
_subscriptions: SubscriptionService | None = None


def service() -> CreditService:
    """The worker process's engine, created on first use (after the prefork pool forked),
    as the settings of the app it runs under say."""
    global _service
    if _service is None:
        _service = CreditService.from_settings(
            settings_of(current_app), on_events=lambda _count: current_app.send_task(RELAY.task)
        )
    return _service


def subscriptions() -> SubscriptionService:
    global _subscriptions
    if _subscriptions is None:
        settings = settings_of(current_app)
        _subscriptions = SubscriptionService(service(), chunk_size=settings.allocation_chunk_size,
                                             backfill=settings.allocation_backfill)
    return _subscriptions


class _ProcessServices:
    """The process's services (`engine.handlers.Services`), each made when first needed."""

    @property
    def credits(self) -> CreditService:
        return service()

    @property
    def subscriptions(self) -> SubscriptionService:
        return subscriptions()


SERVICES: Services = _ProcessServices()


def _dump(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_dump(item) for item in value]
    return value


def _handle(task: Task, operation: Operation, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Validate, run, and turn the outcome into the wire envelope."""
    try:
        if args:
            raise ValidationFailed(
                f"{task.name} takes keyword arguments only, got {len(args)} positional"
            )
        request = parse(operation.request, kwargs)
        key = getattr(request, "idempotency_key", None) or f"task:{task.request.id}"
        adapter = ADAPTERS.get(operation.task)
        started = time.perf_counter()
        answer = adapter(task, request, key) if adapter else dispatch(SERVICES, operation, request, key)
        instruments.record_engine_time("operation", time.perf_counter() - started)
        instruments.record_operation(_label(operation.task), instruments.APPLIED)
        if operation.periodic is not None:
            instruments.record_sweep_success(operation.periodic.entry)
        return {"ok": True, "result": _dump(answer)}
    except CreditError as exc:
        instruments.record_operation(_label(operation.task), exc.code)
        return {"ok": False, "error": exc.to_dict()}
    except Exception as exc:  # noqa: BLE001 (retried if transient, else raised: `delivery`)
        try:
            delivery.retry_single(task, exc)
        except Retry:
            instruments.record_operation(_label(operation.task), "retried")
            raise
        except BaseException:
            instruments.record_operation(_label(operation.task), "failed")
            raise


def _label(task_name: str) -> str:
    """An operation's metric label: its task name without the package's prefix."""
    return task_name.removeprefix("creditworker.")



# ---------------------------------------------------------------- adapters


def _ping(_task: Task, _request: Any, _key: str) -> Any:
    """Touches nothing: a health check, and the floor the benchmarks compare against."""
    return {"pong": True}


def _relay(task: Task, _request: Any, _key: str) -> Any:
    """Publish pending outbox rows to the events exchange, queueing their webhook
    deliveries in the same transaction; wake the sender if it queued any, and send each
    requested top-up to be charged (a lost send is beat's `charge-due-topups` to repair)."""
    from creditworker.notifications.exchange import EventPublisher
    from creditworker.records.outbox import publish_pending
    from creditworker.records.webhooks import fan_out

    queued = 0
    topups: set[int] = set()  # a set: a chunk's transaction may run again after a conflict

    def queue_webhooks(connection: Any, rows: list[Any]) -> None:
        nonlocal queued
        queued += fan_out(connection, rows, datetime.now(UTC))
        topups.update(int(row.payload["topup_id"]) for row in rows if row.routing_key == TOPUP_REQUESTED)

    with task.app.connection_for_write() as connection:
        published = publish_pending(service().engine, EventPublisher(connection), also=queue_webhooks)
    if queued:
        task.app.send_task(DELIVER_WEBHOOKS.task)
    for topup_id in sorted(topups):
        task.app.send_task(CHARGE_TOPUP.task, kwargs={"topup_id": topup_id})
    return {"published": published}


TOPUP_REQUESTED: str = TopupRequested.model_fields["type"].default


def _charge_due_topups(task: Task, _request: Any, _key: str) -> Any:
    """Beat's crash recovery for top-ups: those left requested or charging too long are sent
    again (the same idempotency key reaches the provider: nothing is charged twice)."""
    due = service().due_topups()
    for topup_id in due:
        task.app.send_task(CHARGE_TOPUP.task, kwargs={"topup_id": topup_id})
    return {"sent": len(due)}


_webhooks: Any = None


def webhooks() -> Any:
    """The worker process's webhooks service, made on first use."""
    global _webhooks
    if _webhooks is None:
        from creditworker.notifications.webhooks.service import WebhookOptions, WebhookService

        _webhooks = WebhookService(service().engine, WebhookOptions.from_settings(settings_of(current_app)))
    return _webhooks


def _deliver_webhooks(_task: Task, _request: Any, _key: str) -> Any:
    """Send due webhook deliveries; forget the log past its retention."""
    done = webhooks().deliver_due()
    return {**done.as_dict(), "purged": webhooks().purge()}


def _allocate_due(task: Task, _request: Any, _key: str) -> Any:
    """Beat's entry point: fan the due subscriptions out as chunk tasks over the workers.

    Listing ids is cheap; the grants run in `allocate`, one transaction per chunk. A chunk
    sent twice (the next beat tick came first) grants nothing twice.
    """
    chunks = total = 0
    for ids in subscriptions().due_subscription_pages():
        task.app.send_task(ALLOCATE.task, kwargs={"subscription_ids": ids})
        chunks, total = chunks + 1, total + len(ids)
    return {"chunks": chunks, "subscriptions": total}


ADAPTERS: dict[str, Callable[[Task, Any, str], Any]] = {
    PING.task: _ping,
    RELAY.task: _relay,
    DELIVER_WEBHOOKS.task: _deliver_webhooks,
    ALLOCATE_DUE.task: _allocate_due,
    CHARGE_DUE_TOPUPS.task: _charge_due_topups,
}
"""The operations whose registry entry names no engine method: they need the Celery app
or a broker connection. Every other one goes through the engine's one dispatch."""


# ---------------------------------------------------------------- gathered messages


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
            request = parse(BY_TASK[entry["task"]].request, entry["kwargs"] or {})
        except CreditError as exc:
            outcomes[place] = {"ok": False, "error": exc.to_dict()}
            continue
        assert isinstance(request, Request)
        requests.append(request)
        keys.append(request.idempotency_key or f"task:{entry['id']}")
        places.append(place)
    started = time.perf_counter()
    envelopes = _batch_envelopes(requests, keys)
    if requests:
        instruments.record_batch(len(requests), time.perf_counter() - started)
    for place, outcome in zip(places, envelopes):
        if isinstance(outcome, BaseException):
            outcome = delivery.retry_gathered(task_for or current_app.tasks.__getitem__, entries[place], outcome)
        outcomes[place] = outcome
    for entry, outcome in zip(entries, outcomes):
        instruments.record_operation(_label(entry["task"]), _outcome_label(outcome))
    return outcomes


def _outcome_label(outcome: dict[str, Any] | BaseException) -> str:
    if isinstance(outcome, BaseException):
        return "retried" if isinstance(outcome, Retry) else "failed"  # `retry_gathered` decided
    return instruments.APPLIED if outcome.get("ok") else str((outcome.get("error") or {}).get("code"))


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


# ---------------------------------------------------------------- registration


def _task_body(operation: Operation) -> Callable[..., dict[str, Any]]:
    def run(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return _handle(self, operation, args, kwargs)

    run.__name__ = run.__qualname__ = operation.task.removeprefix("creditworker.").replace(".", "_")
    run.__doc__ = operation.summary
    return run


TASKS: dict[str, Any] = {
    operation.task: shared_task(
        name=operation.task, bind=True, base=GatheredCreditTask if operation.gathered else Task,
        # The relay runs every few seconds: its task events would bury the user's tasks in
        # Flower. It logs what it publishes (worker/quiet_logs.py) instead.
        send_events=operation.task != RELAY.task,
    )(_task_body(operation))
    for operation in OPERATIONS
}
"""Each operation's task (a proxy to it on the current app), by task name."""
