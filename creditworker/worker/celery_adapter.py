"""Every Celery internal that gathering relies on, and nothing else.

Gathering (`gather.py`) plugs into the documented `Task.Strategy` hook, but a strategy
has to build Celery's requests and keep the worker's bookkeeping as Celery's own strategy
does, with functions that are not public API: they may change in any Celery release.
They are reached through this module only, and tests/worker/test_celery_adapter.py checks
each signature and attribute used here, so an upgrade that changes one fails that test by
name instead of failing gathered messages at run time. pyproject.toml bounds Celery to the
versions that test passed on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery, Task
from celery.app.task import Context
from celery.app.trace import LOG_FAILURE, LOG_RECEIVED, LOG_SUCCESS
from celery.utils.imports import symbol_by_name
from celery.worker import state as worker_state
from celery.worker.request import create_request_cls
from celery.worker.strategy import default as default_strategy
from celery.worker.strategy import hybrid_to_proto2, proto1_to_proto2
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import QoS as VirtualQoS

__all__ = [
    "LOG_FAILURE", "LOG_RECEIVED", "LOG_SUCCESS", "REQUEST_FIELDS", "accepted", "acknowledge_all",
    "message_fields",
    "ready", "request_builder", "resend", "reserved", "revoked_ids", "usual_strategy",
]

REQUEST_FIELDS = ("id", "task", "args", "kwargs", "hostname", "retries", "delivery_info",
                  "reply_to", "correlation_id", "root_id", "parent_id", "group")
"""What a pool process needs of a message to apply it and store its result."""

logger = logging.getLogger(__name__)

RequestBuilder = Callable[[Any, Any, Any, Any], Any]
"""(message, payload, ack, reject) -> a `celery.worker.request.Request`."""


def usual_strategy(task: Task, app: Celery, consumer: Any, **options: Any) -> Callable[..., Any]:
    """Celery's own strategy for `task`: what a message that is not gathered goes through."""
    return default_strategy(task, app, consumer, **options)  # type: ignore[no-any-return]


def request_builder(task: Task, app: Celery, consumer: Any) -> RequestBuilder:
    """Turns a message into the request Celery's strategy would have made of it."""
    request_cls = create_request_cls(
        symbol_by_name(task.Request), task, consumer.pool, consumer.hostname, consumer.event_dispatcher, app=app
    )

    def build(message: Any, payload: Any, ack: Any, reject: Any) -> Any:
        body = payload
        if body is None and "args" not in message.payload:
            body, headers, decoded, utc = message.body, message.headers, False, app.uses_utc_timezone()
        elif "args" in message.payload:
            body, headers, decoded, utc = hybrid_to_proto2(message, message.payload)
        else:
            body, headers, decoded, utc = proto1_to_proto2(message, body)
        return request_cls(
            message, on_ack=ack, on_reject=reject, app=app, hostname=consumer.hostname,
            eventer=consumer.event_dispatcher, task=task, connection_errors=consumer.connection_errors,
            body=body, headers=headers, decoded=decoded, utc=utc,
        )

    return build


def revoked_ids(consumer: Any) -> Any:
    """The ids this worker was told to revoke (a set-like)."""
    return consumer.controller.state.revoked


def message_fields(request: Any) -> dict[str, Any]:
    """The plain fields of a request (`REQUEST_FIELDS`), to send to a pool process."""
    context = request._context
    fields = {name: getattr(context, name, None) for name in REQUEST_FIELDS}
    fields.update(id=request.id, task=request.name, args=list(request.args), kwargs=dict(request.kwargs))
    return fields


def acknowledge_all(requests: list[Any]) -> None:
    """Acknowledge each request as `request.acknowledge()` does; on Redis, the unacked
    marks of all of them (kombu's ZREM and HDEL per message) go in one pipeline, one
    round trip instead of one per message."""
    pending = [request for request in requests if not request.acknowledged]
    if not pending:
        return
    channel = pending[0].message.channel
    qos = getattr(channel, "qos", None)
    if not isinstance(qos, kombu_redis.QoS) or channel.no_ack_consumers or any(
        request.message.channel is not channel for request in pending
    ):
        for request in pending:
            request.acknowledge()
        return
    try:
        with qos.pipe_or_acquire() as pipe:
            for request in pending:
                qos._remove_from_indices(request.message.delivery_tag, pipe)
            pipe.execute()
    except channel.connection_errors as exc:  # as kombu's `ack_log_error`: redelivered later
        logger.critical("Couldn't ack %d messages, reason:%r", len(pending), exc, exc_info=True)
    else:
        for request in pending:  # what kombu's ack does after its own pipeline
            VirtualQoS.ack(qos, request.message.delivery_tag)
            request.message._state = "ACK"
    for request in pending:
        request.acknowledged = True


def reserved(request: Any) -> None:
    """Count the request as reserved by this worker (`inspect reserved`, shutdown)."""
    worker_state.task_reserved(request)


def accepted(request: Any) -> None:
    """Count the request as running (`inspect active`)."""
    worker_state.task_accepted(request)


def ready(request: Any, successful: bool) -> None:
    """Count the request as done."""
    worker_state.task_ready(request, successful=successful)


def resend(task: Task, fields: dict[str, Any], countdown: float) -> None:
    """Publish a message again as `Task.retry` would: same id and route, retries + 1."""
    request = Context(**fields)
    task.signature_from_request(
        request, fields["args"], fields["kwargs"], countdown=countdown, retries=(request.retries or 0) + 1,
    ).apply_async()
