"""The Python producer: enqueue credit operations from any service, synchronously.

Method names and arguments are those of `CreditService`. Input is validated here with
the shared contract models, so bad input raises `ValidationFailed` before anything is
enqueued. Each call returns a `TaskHandle`: keep it to `get()` the result (or the typed
error) later, or drop it for fire-and-forget. `reserve_credits` waits for its answer,
because the caller needs the reservation id.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Generic, TypeVar

from celery import Celery, states
from celery.backends.asynchronous import AsyncBackendMixin
from celery.backends.redis import RedisBackend
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from pydantic import BaseModel
from redis.client import PubSub

from creditworker.contract.credits import (
    AddCredits,
    BatchOutcome,
    CommitReservation,
    CreditLot,
    CreditsInfo,
    DeductCredits,
    GetCredits,
    GetExpiring,
    GetHistory,
    GetReservation,
    LedgerEntry,
    ReleaseReservation,
    Reservation,
    ReserveCredits,
    SubmitBatch,
    parse,
    parse_batch_item,
)
from creditworker.contract.errors import (
    CreditError,
    ServiceUnavailable,
    ValidationFailed,
    error_from_dict,
)
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
from creditworker.settings import Settings, get_settings

T = TypeVar("T")

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0

TASKS: dict[type[BaseModel], str] = {model: operation.task for model, operation in BY_REQUEST.items()}
"""The task that serves each request model, from the registry (contract/operations.py)."""


def unwrap(envelope: Any, parse_result: Callable[[Any], T]) -> T:
    """Turn a task's `{"ok": ...}` envelope into the result, or raise its typed error."""
    if not isinstance(envelope, dict) or "ok" not in envelope:
        raise CreditError(f"unexpected task result: {envelope!r}")
    if envelope["ok"]:
        return parse_result(envelope["result"])
    raise error_from_dict(envelope.get("error") or {})


class Answer(threading.Event):
    """Set when the final state of one task has arrived; `meta` is that state."""

    meta: dict[str, Any]

    def outcome(self) -> Any:
        """The task's return value, or raise what it failed with (as `AsyncResult.get`)."""
        if self.meta["status"] == states.SUCCESS:
            return self.meta["result"]
        error = self.meta.get("result")
        raise error if isinstance(error, BaseException) else RuntimeError(f"task ended {self.meta['status']}: {error!r}")


class Answers:
    """One pattern subscription per producer process carries every answer from a Redis
    result backend; each caller sleeps on its own `Answer` until it is set.

    Celery subscribes to each task's result channel when the task is sent and unsubscribes
    once the answer came: two Redis commands, and their replies, per call (about 15% of a
    producer's CPU). Here this producer's task ids share a prefix of their own, so one
    PSUBSCRIBE to `celery-task-meta-<prefix>*`, made once, delivers exactly this producer's
    answers, and no other producer's. The answer is registered before the message is sent,
    so it cannot arrive unexpected; after a reconnect (redis-py subscribes again by
    itself) the stored results of every call still waiting are read once, so an answer
    published while the connection was down is not lost. Other backends (files, rpc://
    whose replies go to a queue per thread) keep Celery's `get`.
    """

    def __init__(self, app: Celery) -> None:
        self.app = app
        backend = app.backend
        self.enabled = isinstance(backend, RedisBackend)
        self._lock = threading.Lock()
        self._waiting: weakref.WeakValueDictionary[str, Answer] = weakref.WeakValueDictionary()
        self._pid = -1
        self._reader: threading.Thread | None = None
        self._subscribed = threading.Event()
        self._counter = itertools.count()
        self._prefix = ""
        self.subscription: PubSub | None = None
        """The connection that carries the answers, once subscribed."""
        if self.enabled:
            # Answers come through the pattern subscription: Celery's own subscription per
            # sent task is not wanted (an `AsyncResult.get` still subscribes when called).
            backend.on_task_call = _answered_by_pattern

    def task_id(self) -> str:
        """A new task id. Unique: a random prefix per producer process (74 random bits,
        also what the subscription matches) and a counter; shaped as a UUID."""
        self._check_process()
        return f"{self._prefix}{next(self._counter) % 16**12:012x}"

    def _check_process(self) -> None:
        if self._pid != os.getpid():  # first use, or a forked child: a prefix and reader of its own
            with self._lock:
                if self._pid != os.getpid():
                    self._prefix = str(uuid.uuid4())[:24]
                    self._counter = itertools.count()
                    self._waiting = weakref.WeakValueDictionary()
                    self._reader = None
                    self._subscribed = threading.Event()
                    self._pid = os.getpid()

    def expect(self, task_id: str) -> Answer | None:
        """Register for the answer of `task_id` (from `task_id()`) before it is sent;
        None: this backend has no pattern subscription, use `AsyncResult.get`."""
        if not self.enabled or not task_id.startswith(self._prefix):
            return None
        answer = Answer()
        with self._lock:  # not while `_resync` copies the keys
            self._waiting[task_id] = answer
        self._ensure_reader()
        return answer

    def _ensure_reader(self) -> None:
        if self._reader is None or not self._reader.is_alive():
            with self._lock:
                if self._reader is None or not self._reader.is_alive():
                    self._subscribed.clear()
                    self._reader = threading.Thread(target=self._read, name="creditworker-answers", daemon=True)
                    self._reader.start()
        if not self._subscribed.wait(DEFAULT_TIMEOUT):
            raise RuntimeError("could not subscribe to task results in the Redis result backend")

    def _read(self) -> None:
        backend = self.app.backend
        first_key = backend.get_key_for_task(self._prefix)  # the keys' prefix, then ours
        skip = len(first_key) - len(self._prefix)
        pattern = first_key + b"*"
        resync = threading.Event()
        failures = 0
        while True:
            pubsub = self.subscription = _Subscription(backend.client.connection_pool, resync)
            try:
                pubsub.psubscribe(pattern)
                failures = 0
                while True:
                    message = pubsub.get_message(timeout=1.0)
                    if message is None:
                        pass
                    elif message["type"] == "pmessage":
                        self._deliver(message["channel"][skip:].decode(), message["data"])
                    elif message["type"] == "psubscribe":
                        self._subscribed.set()
                    if resync.is_set():
                        resync.clear()
                        self._resync()
            except Exception as exc:  # noqa: BLE001 (subscribe again below; every waiting call is re-read)
                log = logger.warning if failures == 0 else logger.debug  # once per outage
                log("reading task results failed (%r); subscribing again", exc)
                resync.set()
                failures += 1
                time.sleep(min(5.0, 0.25 * 2**failures))
            finally:
                with contextlib.suppress(Exception):  # a dead connection: nothing to close
                    pubsub.close()

    def _deliver(self, task_id: str, data: bytes) -> None:
        answer = self._waiting.get(task_id)
        if answer is None:
            return
        meta = self.app.backend.decode_result(data)
        if meta.get("status") in states.READY_STATES:
            answer.meta = meta
            answer.set()
            self._waiting.pop(task_id, None)

    def _resync(self) -> None:
        """Deliver the stored results of every call still waiting (published, perhaps,
        while the subscription was down)."""
        with self._lock:
            waiting = list(self._waiting.keys())
        backend = self.app.backend
        for start in range(0, len(waiting), 500):
            ids = waiting[start:start + 500]
            for task_id, data in zip(ids, backend.client.mget([backend.get_key_for_task(i) for i in ids])):
                if data is not None:
                    self._deliver(task_id, data)


class _Subscription(PubSub):  # type: ignore[misc]
    """redis-py's PubSub, which subscribes again on a new connection; and then says so,
    for the answers that were published while there was none."""

    def __init__(self, pool: Any, reconnected: threading.Event) -> None:
        super().__init__(pool)
        self.reconnected = reconnected

    def on_connect(self, connection: Any) -> None:
        super().on_connect(connection)
        self.reconnected.set()


def _answered_by_pattern(_producer: Any, _task_id: str) -> None:
    """`RedisBackend.on_task_call` for a producer whose answers come through `Answers`."""


class TaskHandle(Generic[T]):
    """An enqueued operation; `get()` waits for its result, `resend()` publishes it again.

    A resend is the same message (same task id, so the same derived idempotency key when
    none was given): it is applied at most once however many copies reach the workers.
    A handle with a `deadline` (a reservation its caller waits for) is refused by any
    worker that gets to it after that instant.
    """

    def __init__(
        self, result: AsyncResult, parse_result: Callable[[Any], T],
        resend: Callable[[], None] | None = None, arrived: Answer | None = None,
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
                if self._arrived is not None:
                    if not self._arrived.wait(max(wait, 0.001)):
                        raise CeleryTimeout()
                    envelope = self._arrived.outcome()
                else:
                    envelope = self.result.get(
                        timeout=max(wait, 0.001), propagate=True,
                        on_message=seen if _streams(self.result) else None,
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

    def _call(self, model: type[BaseModel], arguments: dict[str, Any]) -> TaskHandle[Any]:
        """A typed method's arguments (its `locals()`) validated into `model` and sent."""
        fields = {name: value for name, value in arguments.items() if name not in ("self", "__class__")}
        return self._send(parse(model, fields))

    def _send(self, request: BaseModel) -> TaskHandle[Any]:
        """Send `request` as the task the registry names for its model; the handle parses the
        result into the registry's result type (and knows the request's deadline, if any)."""
        operation = BY_REQUEST[type(request)]
        deadline: datetime | None = getattr(request, "deadline", None)
        parse_result = operation.results.validate_python
        kwargs = request.model_dump(mode="json", exclude_none=True)
        name, task_id = operation.task, self._answers.task_id()

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
        return self._call(CommitReservation, locals())

    def release_reservation(
        self, reservation_id: str, *, idempotency_key: str | None = None
    ) -> TaskHandle[LedgerEntry]:
        return self._call(ReleaseReservation, locals())

    def get_user_credits_info(self, user_id: str) -> TaskHandle[CreditsInfo]:
        return self._call(GetCredits, locals())

    def get_history(
        self,
        user_id: str,
        *,
        limit: int = 50,
        before: int | None = None,
        kinds: Sequence[str] | None = None,
    ) -> TaskHandle[list[LedgerEntry]]:
        return self._call(GetHistory, {**locals(), "kinds": list(kinds) if kinds is not None else None})

    def get_expiring_credits(self, user_id: str, within_days: int = 7) -> TaskHandle[list[CreditLot]]:
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
                raise ValidationFailed(f"operation {index}: {exc.message}", index=index, **exc.details) from None
            items.append({"op": item["op"], **request.model_dump(mode="json", exclude_none=True)})
        return self._send(parse(SubmitBatch, {"operations": items}))

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
        return self._call(CreatePlan, locals())

    def update_plan(
        self, plan: int | str, *, idempotency_key: str | None = None, **changes: Any
    ) -> TaskHandle[Plan]:
        """Change name, credit_limit, price, currency, validity_days or active."""
        return self._call(UpdatePlan, {"plan": plan, **changes, "idempotency_key": idempotency_key})

    def delete_plan(self, plan: int | str, *, idempotency_key: str | None = None) -> TaskHandle[DeletedPlan]:
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
