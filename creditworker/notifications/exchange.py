"""The notification topology on the broker, and the helpers to publish to it and consume it.

One durable topic exchange, `creditworker.events`, and one durable queue per documented
routing key (`creditworker.events.credits.low`, ...), declared by the publisher so that no
event is dropped before its first consumer starts. Imports kombu and the event models only:
a downstream service (email, SMS, push) can copy `consume` without the worker's storage.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from kombu import Connection, Exchange, Queue
from kombu.message import Message

from creditworker.contract.events import EXCHANGE, ROUTING_KEYS, _Event, parse_event, queue_name
from creditworker.settings import Settings, broker_transport_options

EVENTS_EXCHANGE = Exchange(EXCHANGE, type="topic", durable=True)


def event_queues(routing_keys: Iterable[str] = ROUTING_KEYS) -> list[Queue]:
    """The durable named queues, one per routing key."""
    return [
        Queue(queue_name(key), EVENTS_EXCHANGE, routing_key=key, durable=True)
        for key in routing_keys
    ]


class EventPublisher:
    """Publishes outbox rows to the exchange; plugs into `records.outbox.publish_pending`.

    Messages are persistent; on RabbitMQ the connection should have publisher confirms
    (`confirm_publish`), so a publish that returns was accepted by the broker.
    """

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._producer = connection.Producer(serializer="json")
        self._declared = False

    def __call__(self, routing_key: str, payload: dict[str, Any], event_id: str) -> None:
        declare: list[Any] = []
        if not self._declared:
            declare = [EVENTS_EXCHANGE, *event_queues()]
        self._producer.publish(
            payload,
            exchange=EVENTS_EXCHANGE,
            routing_key=routing_key,
            declare=declare,
            delivery_mode=2,
            message_id=event_id,
            headers={"event_id": event_id, "event_version": payload.get("version", 1)},
            retry=True,
            retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
        )
        self._declared = True


def broker_connection(
    broker_url: str | None = None, transport_options: dict[str, Any] | None = None,
    *, settings: Settings | None = None,
) -> Connection:
    """A connection to `broker_url`; without one, to the broker `settings` name (default:
    the environment's, for a downstream consumer that has no settings of its own) with the
    transport options it needs (the embedded broker's folders, Redis's visibility timeout)."""
    if broker_url is None:
        settings = settings or Settings()
        broker_url = settings.broker_url
        transport_options = {**broker_transport_options(settings), **(transport_options or {})}
    return Connection(broker_url, transport_options=transport_options or {})


def consume(
    handle: Callable[[_Event], None],
    *,
    broker_url: str | None = None,
    routing_keys: Iterable[str] = ROUTING_KEYS,
    queue: str | None = None,
    limit: int | None = None,
    timeout: float | None = None,
    transport_options: dict[str, Any] | None = None,
) -> int:
    """Hand each event to `handle`, acknowledging it only after `handle` returns.

    With `queue` None the durable per-key queues are consumed; with a name, one durable
    queue of that name is bound to `routing_keys` (which may be patterns such as
    `credits.*`). A payload that is not a valid event is rejected (not requeued), so a
    malformed message cannot loop. Returns the number handled; stops after `limit`
    events or `timeout` seconds without one. Without `broker_url`, the configured broker
    (`CREDITWORKER_BROKER_URL`, the embedded one by default) is used.
    """
    keys = list(routing_keys)
    queues = (
        event_queues(keys)
        if queue is None
        else [
            Queue(queue, EVENTS_EXCHANGE, routing_key=key, durable=True)
            for key in keys
        ]
    )
    handled = 0
    with broker_connection(broker_url, transport_options) as connection:
        for event, message in _receive(connection, queues, timeout=timeout):
            if event is None:
                message.reject(requeue=False)
                continue
            handle(event)
            message.ack()
            handled += 1
            if limit is not None and handled >= limit:
                break
    return handled


def tail(
    routing_key_pattern: str = "#",
    *,
    broker_url: str | None = None,
    timeout: float | None = None,
    transport_options: dict[str, Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield events as they are published, from a private auto-deleted queue.

    For people watching: it sees only what is published while it runs and takes nothing
    from the durable queues that real consumers read.
    """
    with broker_connection(broker_url, transport_options) as connection:
        private = Queue(
            "",
            EVENTS_EXCHANGE,
            routing_key=routing_key_pattern,
            exclusive=True,
            auto_delete=True,
            durable=False,
        )
        for event, message in _receive(connection, [private], timeout=timeout):
            message.ack()
            if event is not None:
                yield event.model_dump(mode="json")


def _receive(
    connection: Connection, queues: list[Queue], *, timeout: float | None
) -> Iterator[tuple[_Event | None, Message]]:
    received: list[Message] = []
    with connection.Consumer(
        queues, callbacks=[lambda _body, message: received.append(message)], accept=["json"]
    ):
        connection.ensure_connection(max_retries=3)
        while True:
            try:
                connection.drain_events(timeout=timeout)
            except TimeoutError:
                return
            while received:
                message = received.pop(0)
                try:
                    event = parse_event(_payload(message))
                except ValueError:
                    event = None
                yield event, message


def _payload(message: Message) -> dict[str, Any]:
    body = message.decode() if hasattr(message, "decode") else message.payload
    if isinstance(body, (bytes, str)):
        body = json.loads(body)
    if not isinstance(body, dict):
        raise ValueError("an event payload must be a JSON object")  # noqa: TRY004 - _receive catches ValueError
    return body
