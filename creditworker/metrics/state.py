"""What the database and the broker hold, read when Prometheus scrapes (nothing polls).

Each source is read on its own: a database or broker that does not answer sets its
`creditworker_state_up{source=...}` to 0 and leaves its other gauges out of that scrape, so a
scrape never fails because one of them is down, and never hangs past the connection
timeouts below.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import and_, func, select
from sqlalchemy.engine import Engine

from creditworker.storage.tables import DeadLetterRow, Lot, OutboxEvent

CONNECT_SECONDS = 2.0

outbox = OutboxEvent.__table__
dead_letters = DeadLetterRow.__table__
lots = Lot.__table__


def queue_depths(app: Any) -> dict[str, int | None]:
    """Messages waiting in each of a Celery app's queues (None: the broker does not know it)."""
    names = sorted(app.amqp.queues.keys()) or [app.conf.task_default_queue]
    transport_options = {
        **(app.conf.broker_transport_options or {}),
        "socket_timeout": CONNECT_SECONDS, "socket_connect_timeout": CONNECT_SECONDS,
    }
    depths: dict[str, int | None] = {}
    with app.connection_for_read(
        connect_timeout=CONNECT_SECONDS, transport_options=transport_options
    ) as connection:
        connection.ensure_connection(max_retries=1, timeout=CONNECT_SECONDS)
        for name in names:
            channel = connection.channel()
            try:
                declared = channel.queue_declare(queue=name, passive=True)
                depths[name] = int(declared.message_count)
            except Exception:  # noqa: BLE001 - a queue the broker does not know
                # kombu's virtual transports (Redis, the embedded one) drop an empty queue's
                # key, so a passive declare fails on an empty queue: count it there instead.
                size = getattr(channel, "_size", None)
                depths[name] = int(size(name)) if size is not None else None
            finally:
                with contextlib.suppress(Exception):  # closed by the broker after a miss
                    channel.close()
    return depths


class StateCollector(Collector):
    """Gauges read from the database (`engine`) and the broker (`celery_app`, optional)."""

    def __init__(self, engine: Engine, *, celery_app: Any = None, expiring_days: int = 7,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.engine, self.celery_app, self.expiring_days, self.now = engine, celery_app, expiring_days, now

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # registering must not read the database: names are checked at scrape

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("creditworker_state_up",
                               "1 when this scrape could read the source, else 0.", labels=["source"])
        try:
            yield from self._database()
            up.add_metric(["database"], 1)
        except Exception:  # noqa: BLE001 - a database that is down is a 0, not a failed scrape
            up.add_metric(["database"], 0)
        if self.celery_app is not None:
            try:
                depths = queue_depths(self.celery_app)
                queued = GaugeMetricFamily("creditworker_queue_messages",
                                           "Messages waiting in each task queue.", labels=["queue"])
                for name, depth in depths.items():
                    if depth is not None:
                        queued.add_metric([name], depth)
                yield queued
                up.add_metric(["broker"], 1)
            except Exception:  # noqa: BLE001 - as above, for the broker
                up.add_metric(["broker"], 0)
        yield up

    def _database(self) -> list[GaugeMetricFamily]:
        now = self.now()
        with self.engine.connect() as connection:
            pending, oldest = connection.execute(
                select(func.count(), func.min(outbox.c.created_at)).where(outbox.c.published_at.is_(None))
            ).one()
            stored_dead_letters = connection.scalar(select(func.count()).select_from(dead_letters))
            expiring = connection.scalar(
                select(func.coalesce(func.sum(lots.c.remaining), 0)).where(and_(
                    lots.c.remaining > 0, lots.c.expires_at > now,
                    lots.c.expires_at <= now + timedelta(days=self.expiring_days),
                ))
            )
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=UTC)
        lag = max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
        return [
            GaugeMetricFamily("creditworker_outbox_pending_events",
                              "Events in the outbox not yet published.", value=int(pending)),
            GaugeMetricFamily("creditworker_outbox_lag_seconds",
                              "Age of the oldest unpublished event (0 when none waits).", value=lag),
            GaugeMetricFamily("creditworker_dead_letters",
                              "Messages stored as dead letters.", value=int(stored_dead_letters or 0)),
            GaugeMetricFamily("creditworker_credits_expiring",
                              f"Credits left in lots that expire within {self.expiring_days} days "
                              "(CREDITWORKER_EXPIRING_SOON_DAYS).", value=int(expiring or 0)),
        ]
