"""Beat stops between publishes, never inside one.

Celery's beat answers SIGTERM and SIGINT inside the signal handler: it saves the schedule,
releases the broker connection and raises SystemExit, wherever the main thread was. When
the signal lands while beat writes a message to RabbitMQ, py-amqp holds its frame buffer's
lock, which is not reentrant; closing the connection writes a Close frame, waits for that
lock, and beat hangs for good (seen in the test suite; Celery fixed the same kind of hang in
the worker, celery/celery#7339, not in beat). Here the handler only asks beat to stop:
outside a publish it raises SystemExit at once (beat is sleeping or ticking), inside one
it lets the publish finish and raises then. Beat's own loop then saves the schedule and
closes the connection, outside any write (tests/faults/test_beat_stop.py).
"""

from __future__ import annotations

from types import FrameType
from typing import Any

from celery import platforms
from celery.beat import PersistentScheduler, Service


class Scheduler(PersistentScheduler):
    """Celery's persistent scheduler, whose publishes a stop signal waits for."""

    publishing = False
    stop_asked = False

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any) -> Any:
        self.publishing = True
        try:
            return super().apply_async(entry, producer=producer, advance=advance, **kwargs)
        finally:
            self.publishing = False
            if self.stop_asked:
                raise SystemExit()

    def ask_to_stop(self, _signum: int, _frame: FrameType | None) -> None:
        if self.publishing:
            self.stop_asked = True
        else:
            raise SystemExit()


def stop_between_publishes(service: Service | None) -> None:
    """On `beat_init`: replace Celery's SIGTERM and SIGINT handlers (installed just before)
    with the scheduler's; a beat run with another scheduler (`--scheduler`) keeps Celery's."""
    scheduler = getattr(service, "scheduler", None)
    if isinstance(scheduler, Scheduler):
        platforms.signals.update(SIGTERM=scheduler.ask_to_stop, SIGINT=scheduler.ask_to_stop)
