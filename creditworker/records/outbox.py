"""The transactional outbox: events are rows written with the change that caused them.

A change that rolls back leaves no event; one that commits leaves a row that the relay
publishes and then marks published. The relay publishes before it marks, so a crash in
between publishes the row again: delivery is at-least-once and consumers drop repeated
`event_id`s. The publishing itself is a callable handed in by the worker, so this module
knows nothing of brokers.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, func, select, update
from sqlalchemy.engine import Connection, Engine

from creditworker.contract.events import _SystemEvent
from creditworker.storage.tables import OutboxEvent
from creditworker.storage.transaction import run_transaction

outbox_table = cast(Table, OutboxEvent.__table__)

Publish = Callable[[str, dict[str, Any], str], None]
"""publish(routing_key, payload, event_id): raise to leave the event pending."""

AlsoWith = Callable[[Connection, list[Any]], None]
"""also(connection, rows): more work on the published rows (`id`, `routing_key`, `payload`,
`event_id`) in the transaction that marks them published, such as queueing their webhook
deliveries: both happen, or neither does."""

RELAY_CHUNK = 200


def event_row(event: _SystemEvent) -> dict[str, Any]:
    """The outbox row of `event`, for the caller's transaction to insert."""
    return {
        "event_id": event.event_id,
        "routing_key": event.type,  # type: ignore[attr-defined]
        "payload": event.model_dump(mode="json"),
        "created_at": event.occurred_at,
        "published_at": None,
    }


def publish_pending(engine: Engine, publish: Publish, *, limit: int = 10_000, also: AlsoWith | None = None) -> int:
    """Publish pending events oldest first, in chunks; returns how many were published.

    Rows are claimed with `FOR UPDATE SKIP LOCKED` where the database has it, so two
    relays running at once share the work instead of publishing everything twice.
    """
    published = 0
    while published < limit:
        count = run_transaction(engine, lambda connection: _publish_chunk(connection, publish, also))
        published += count
        if count < RELAY_CHUNK:
            return published
    return published


def _publish_chunk(connection: Connection, publish: Publish, also: AlsoWith | None = None) -> int:
    rows = connection.execute(
        select(outbox_table.c.id, outbox_table.c.routing_key, outbox_table.c.payload, outbox_table.c.event_id)
        .where(outbox_table.c.published_at.is_(None))
        .order_by(outbox_table.c.id)
        .limit(RELAY_CHUNK)
        .with_for_update(skip_locked=True)
    ).all()
    for row in rows:
        publish(row.routing_key, row.payload, row.event_id)
    if rows and also is not None:
        also(connection, list(rows))
    if rows:
        connection.execute(update(outbox_table).where(outbox_table.c.id.in_([row.id for row in rows]))
                           .values(published_at=datetime.now(UTC)))
    return len(rows)


def pending_count(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(
            select(func.count()).select_from(outbox_table).where(outbox_table.c.published_at.is_(None))
        ) or 0)
