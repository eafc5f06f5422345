"""The worker's intake: no message, however malformed, stops a worker.

Celery hands each message to its task's strategy in the worker's main process, and an
exception there is "unrecoverable": a body of two elements instead of `[args, kwargs,
embed]` raises `ValueError: not enough values to unpack` and the worker exits. The message
was never acknowledged, so it comes back, and every worker that takes it dies in turn.
Other shapes (an unknown task, undecodable bytes, a content type other than JSON) Celery
logs and drops, or requeues.

`GuardedConsumer` (the worker's `worker_consumer`) checks every message's shape before
Celery reads it. A message that is not a well-formed task message for a registered task
is stored whole as a dead letter (`creditworker.records.dead_letters`), logged once, answered with
an `invalid_input` result when it carries a task id (so its producer learns of it), and
acknowledged: it is never requeued. Whatever Celery still raises on a message that passed
the checks is caught the same way. Messages that are well-formed but carry invalid
arguments are not dead letters: their task answers `invalid_input` like any refusal.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Container
from datetime import datetime
from typing import Any

from celery import states
from celery.app.task import Context
from celery.worker.consumer import Consumer

from creditworker.contract.errors import ValidationFailed
from creditworker.records.dead_letters import DeadLetter, DeadLetterStore
from creditworker.worker.configured import settings_of
from creditworker.worker.transport import UNREADABLE_HEADER

logger = logging.getLogger(__name__)

JSON_CONTENT_TYPE = "application/json"
OPTIONAL_TEXT_HEADERS = ("root_id", "parent_id", "group", "argsrepr", "kwargsrepr", "shadow",
                         "origin", "lang")
EMBED_KEYS = ("callbacks", "errbacks", "chain", "chord")


CELERY_BUILTIN_PREFIX = "celery."


def runnable_tasks(app: Any, registered: Container[str] | Any) -> frozenset[str]:
    """The registered tasks the worker runs: the project's own, and those of Celery's
    built-ins (`celery.*`: map, starmap, chunks, chord_unlock, backend_cleanup, ...) that the
    settings allow. Beat schedules `celery.backend_cleanup` itself where the result backend
    cannot expire results (the embedded one): that one is allowed there."""
    settings = settings_of(app)
    allowed = {name.strip() for name in settings.celery_tasks_allowed.split(",") if name.strip()}
    if not app.backend.supports_autoexpire:
        allowed.add("celery.backend_cleanup")
    return frozenset(name for name in registered
                     if not name.startswith(CELERY_BUILTIN_PREFIX) or name in allowed)


def malformation(message: Any, tasks: Container[str], max_bytes: int) -> str | None:
    """Why `message` is not a well-formed protocol-2 task message for one of `tasks`,
    or None when it is."""
    headers = message.headers
    if not isinstance(headers, dict):
        return "the headers are not a mapping"
    if UNREADABLE_HEADER in headers:
        return f"the broker's entry is unreadable: {headers[UNREADABLE_HEADER]}"
    task = headers.get("task")
    if not isinstance(task, str) or not task:
        return "no task header (Celery's message protocol 2 is expected)"
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not task_id:
        return "no task id header, or one that is not a string"
    if task not in tasks:
        if task.startswith(CELERY_BUILTIN_PREFIX):
            return (f"Celery's built-in task {task[:200]!r} is not run here "
                    "(CREDITWORKER_CELERY_TASKS_ALLOWED enables one)")
        return f"unknown task {task[:200]!r}"
    size = len(message.body or b"")
    if size > max_bytes:
        return f"the body has {size} bytes, more than the {max_bytes} accepted"
    if message.content_type != JSON_CONTENT_TYPE:
        return f"content type {str(message.content_type)[:100]!r}: only {JSON_CONTENT_TYPE} is accepted"
    problem = _header_problem(headers)
    if problem is not None:
        return problem
    try:
        body = message.decode()
    except Exception as exc:  # noqa: BLE001 (any failure to decode is the reason)
        return f"the body cannot be decoded: {type(exc).__name__}: {str(exc)[:200]}"
    return _body_problem(body)


def _header_problem(headers: dict[str, Any]) -> str | None:
    for name in OPTIONAL_TEXT_HEADERS:
        if headers.get(name) is not None and not isinstance(headers[name], str):
            return f"the {name} header is not a string"
    for name in ("eta", "expires"):
        value = headers.get(name)
        if value is None:
            continue
        try:
            datetime.fromisoformat(value)
        except (TypeError, ValueError):
            return f"the {name} header is not an ISO 8601 time"
    retries = headers.get("retries")
    if retries is not None and (not isinstance(retries, int) or isinstance(retries, bool) or retries < 0):
        return "the retries header is not a count"
    limits = headers.get("timelimit")
    if limits is not None and not (
        isinstance(limits, (list, tuple)) and len(limits) == 2
        and all(limit is None or (isinstance(limit, (int, float)) and not isinstance(limit, bool))
                for limit in limits)
    ):
        return "the timelimit header is not [soft, hard]"
    return None


def _body_problem(body: Any) -> str | None:
    if not isinstance(body, (list, tuple)) or len(body) != 3:
        return "the body is not [args, kwargs, embed]"
    args, kwargs, embed = body
    if not isinstance(args, list):
        return "args are not a list"
    if not isinstance(kwargs, dict):
        return "kwargs are not an object"
    if embed is None:
        return None
    if not isinstance(embed, dict):
        return "embed is neither an object nor null"
    for name in EMBED_KEYS:
        value = embed.get(name)
        if value is None:
            continue
        if name == "chord":
            if not isinstance(value, dict):
                return "embed.chord is not an object"
        elif not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            return f"embed.{name} is not a list of signatures"
    return None


class GuardedConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, with every message checked first and every failure dead-lettered."""

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        handle = super().create_task_handler(*args, **kwargs)
        max_bytes = settings_of(self.app).max_message_bytes
        connection_errors = tuple(self.connection_errors or ())
        runnable = runnable_tasks(self.app, self.strategies)

        def on_task_received(message: Any) -> Any:
            problem = malformation(message, runnable, max_bytes)
            if problem is not None:
                return self.dead_letter(message, problem)
            try:
                return handle(message)
            except connection_errors:
                raise
            except Exception as exc:  # anything else must not stop the worker
                logger.exception("the worker could not take message %s", _task_id(message))
                return self.dead_letter(message, f"the worker could not take it: {exc!r}"[:2000])

        return on_task_received

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self.dead_letter(message, "not a Celery task message")

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self.dead_letter(message, f"unknown task: {exc}")

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self.dead_letter(message, f"invalid task message: {exc}")

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        self.dead_letter(message, f"the message cannot be decoded: {type(exc).__name__}: {exc}")

    def dead_letter(self, message: Any, reason: str) -> None:
        """Keep the message, tell its producer, log it once, and take it off the queue."""
        letter = DeadLetter.capture(
            reason, body=message.body, headers=message.headers, properties=message.properties,
            content_type=message.content_type, content_encoding=message.content_encoding,
            queue=(message.delivery_info or {}).get("routing_key"),
        )
        letter_id: int | None
        try:
            letter_id = dead_letter_store(settings_of(self.app).database_url).add(letter)
        except Exception:  # the log then keeps the message instead
            letter_id = None
            logger.exception("could not store a dead letter; the whole message: %s",
                             json.dumps(letter.as_dict()))
        logger.error("dead letter %s: message %s for task %s on queue %s: %s",
                     letter_id, letter.task_id, letter.task_name, letter.queue, reason)
        _answer_producer(self.app, letter, letter_id)
        if not message.acknowledged:
            message.ack_log_error(logger, self.connection_errors)


def _task_id(message: Any) -> Any:
    headers = message.headers
    return headers.get("id") if isinstance(headers, dict) else None


def _answer_producer(app: Any, letter: DeadLetter, letter_id: int | None) -> None:
    """Store an `invalid_input` result under the message's task id, where it has one."""
    if letter.task_id is None:
        return
    error = ValidationFailed(
        f"malformed message: {letter.reason}", dead_letter_id=letter_id, reason=letter.reason
    )
    request = Context(
        id=letter.task_id, task=letter.task_name,
        reply_to=letter.properties.get("reply_to"),
        correlation_id=letter.properties.get("correlation_id") or letter.task_id,
    )
    try:
        app.backend.store_result(
            letter.task_id, {"ok": False, "error": error.to_dict()}, states.SUCCESS, request=request
        )
    except Exception:  # the dead letter is kept; the answer is a courtesy
        logger.warning("could not store the invalid_input answer for %s", letter.task_id, exc_info=True)


_store: DeadLetterStore | None = None


def dead_letter_store(database_url: str) -> DeadLetterStore:
    """The main process's store (on the app's database): a pool-less engine, so no
    connection outlives a fork."""
    global _store
    if _store is None:
        from sqlalchemy.pool import NullPool

        from creditworker.storage.database import make_engine

        _store = DeadLetterStore(make_engine(database_url, poolclass=NullPool))
    return _store
