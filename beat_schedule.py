"""The periodic schedule `celery -A creditworker beat` runs: what runs, and how often.

Intervals come from the settings (environment variables `CREDITWORKER_*_INTERVAL_SECONDS`).
Every task here is safe to run twice at once: expiry is keyed by lot, stale holds by
reservation, reminders by (lot, day), subscription grants by (subscription, period) and
the relay claims rows with SKIP LOCKED. Each
entry expires after one interval, so a backlog after an outage does not pile up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from creditworker.settings import Settings

# (schedule entry, task name, setting that holds its interval in seconds)
PERIODIC_TASKS: tuple[tuple[str, str, str], ...] = (
    ("expire-credits", "creditworker.credits.expire", "expire_interval_seconds"),
    (
        "release-stale-reservations",
        "creditworker.reservations.release_stale",
        "release_stale_interval_seconds",
    ),
    ("send-expiry-reminders", "creditworker.credits.remind", "reminder_interval_seconds"),
    ("relay-events", "creditworker.events.relay", "relay_interval_seconds"),
    ("allocate-subscriptions", "creditworker.subscriptions.allocate_due", "allocate_interval_seconds"),
)


def build_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    schedule: dict[str, dict[str, Any]] = {}
    for entry, task, interval_setting in PERIODIC_TASKS:
        interval = float(getattr(settings, interval_setting))
        schedule[entry] = {"task": task, "schedule": interval, "options": {"expires": interval}}
    return schedule
