"""What a call returns: a `TaskHandle` on an enqueued operation, to wait for its result
(or typed error) later, resend its message, or drop for fire-and-forget.

It also decides what a caller is told when no answer comes in time: whether the operation
may still be applied (tests/e2e/test_task_states.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Generic, TypeVar

from celery import Celery, states
from celery.backends.asynchronous import AsyncBackendMixin
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult

from creditworker.client.answers import Answer
from creditworker.contract.errors import CreditError, ServiceUnavailable, error_from_dict

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0
"""Seconds a caller waits for an answer unless it says otherwise."""


def unwrap(envelope: Any, parse_result: Callable[[Any], T]) -> T:
    """Turn a task's `{"ok": ...}` envelope into the result, or raise its typed error."""
    if not isinstance(envelope, dict) or "ok" not in envelope:
        raise CreditError(f"unexpected task result: {envelope!r}")
    if envelope["ok"]:
        return parse_result(envelope["result"])
    raise error_from_dict(envelope.get("error") or {})


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
        hint = _embedded_hint(self.result.app)
        waited = f"no answer for task {self.task_id} within {timeout} s{hint}"
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


