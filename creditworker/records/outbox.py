"""The transactional outbox: events are rows written with the change that caused them.

A change that rolls back leaves no event; one that commits leaves a row that the relay
publishes and then marks published. The relay publishes before it marks, so a crash in
between publishes the row again: delivery is at-least-once and consumers drop repeated
`event_id`s. The publishing itself is a callable handed in by the worker, so this module
knows nothing of brokers.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from creditworker.contract.events import _Event
from creditworker.storage.database import run_transaction
from creditworker.storage.tables import OutboxEvent

Publish = Callable[[str, dict[str, Any], str], None]
"""publish(routing_key, payload, event_id): raise to leave the event pending."""

RELAY_CHUNK = 200


def event_row(event: _Event) -> dict[str, Any]:
    """The outbox row of `event`, for the caller's transaction to insert."""
    return {
        "event_id": event.event_id,
        "routing_key": event.type,  # type: ignore[attr-defined]
        "payload": event.model_dump(mode="json"),
        "created_at": event.occurred_at,
        "published_at": None,
    }


def publish_pending(engine: Engine, publish: Publish, *, limit: int = 10_000) -> int:
    """Publish pending events oldest first, in chunks; returns how many were published.

    Rows are claimed with `FOR UPDATE SKIP LOCKED` where the database has it, so two
    relays running at once share the work instead of publishing everything twice.
    """
    published = 0
    while published < limit:
        count = run_transaction(engine, lambda session: _publish_chunk(session, publish))
        published += count
        if count < RELAY_CHUNK:
            return published
    return published


def _publish_chunk(session: Session, publish: Publish) -> int:
    rows = list(
        session.scalars(
            select(OutboxEvent)
            .where(OutboxEvent.published_at.is_(None))
            .order_by(OutboxEvent.id)
            .limit(RELAY_CHUNK)
            .with_for_update(skip_locked=True)
        )
    )
    now = datetime.now(timezone.utc)
    for row in rows:
        publish(row.routing_key, row.payload, row.event_id)
        row.published_at = now
    return len(rows)


def pending_count(engine: Engine) -> int:
    from sqlalchemy import func

    with Session(engine) as session:
        return int(
            session.scalar(
                select(func.count()).select_from(OutboxEvent).where(
                    OutboxEvent.published_at.is_(None)
                )
            )
            or 0
        )
