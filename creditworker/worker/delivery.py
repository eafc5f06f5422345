"""The one retry policy for transient database errors, for single and gathered messages.

Two layers, and only two:

1. Within one delivery, `rerun_on_conflict` (storage/database.py) reruns a transaction that
   lost a deadlock, a serialization failure or a lock timeout: at once, with a few
   milliseconds of jitter, up to `MAX_TRANSACTION_ATTEMPTS` (8) times. Conflicts clear in
   milliseconds, so this is where they are retried.
2. A transient error that escapes it (the database connection lost or refused, or a
   conflict that lost eight times in a row) sends the message back to the broker with a
   countdown: `backoff(retries)` = min(60 s, 0.5 s x 2^retries) x a random 0.5 to 1.5, up to
   `CREDITWORKER_TASK_MAX_RETRIES` (8) times; the count travels in the message. After that
   the task fails (FAILURE, message acknowledged) and the error is its result.

The pool process never sleeps waiting for the database: a single task is re-sent by
Celery's `Task.retry`; each message of a gathered batch that met a transient error is
re-published the same way (same task id, so the same derived key, retries + 1, a
countdown), and the original acknowledged. A message with a countdown is never gathered
again, so its next run is alone. Business refusals are results, never retried.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from celery import Task
from celery.exceptions import Retry

from creditworker.storage.database import is_transient
from creditworker.worker import celery_adapter as celery_internals
from creditworker.worker.configured import settings_of

MAX_COUNTDOWN_SECONDS = 60.0


def backoff(retries: int) -> float:
    """Seconds before the next delivery of a message already retried `retries` times."""
    return float(min(MAX_COUNTDOWN_SECONDS, 0.5 * 2**retries) * random.uniform(0.5, 1.5))


@dataclass(frozen=True)
class RetryLater:
    countdown: float


def decide(exc: BaseException, retries: int, max_retries: int) -> RetryLater | None:
    """Send the message back with a countdown, or None: the failure is final (not transient,
    or already retried `max_retries` times: `CREDITWORKER_TASK_MAX_RETRIES`)."""
    if not is_transient(exc) or retries >= max_retries:
        return None
    return RetryLater(backoff(retries))


def retry_single(task: Task, exc: BaseException) -> NoReturn:
    """A single task's transient failure: back to the broker, or raised as final."""
    max_retries = settings_of(task.app).task_max_retries
    retry = decide(exc, task.request.retries, max_retries)
    if retry is None:
        raise exc
    raise task.retry(exc=exc, countdown=retry.countdown, max_retries=max_retries) from exc


def retry_gathered(
    task_for: Callable[[str], Task], fields: dict[str, Any], exc: BaseException
) -> BaseException:
    """A gathered message's transient failure: re-published with a countdown (its outcome is
    then Celery's `Retry`, stored as RETRY), or the error itself when it is final."""
    task = task_for(fields["task"])
    retry = decide(exc, int(fields.get("retries") or 0), settings_of(task.app).task_max_retries)
    if retry is None:
        return exc
    celery_internals.resend(task, fields, countdown=retry.countdown)
    return Retry(exc=exc, when=retry.countdown)
