"""The periodic schedule `celery -A creditworker beat` runs: what runs, and how often.

Intervals come from the settings (environment variables `CREDITWORKER_*_INTERVAL_SECONDS`);
`CREDITWORKER_SCHEDULE_CRONTABS` (JSON) runs chosen entries at crontab times instead.
Every task here is safe to run twice at once: expiry is keyed by lot, stale holds by
reservation, reminders by (lot, day), subscription grants by (subscription, period) and
the relay claims rows with SKIP LOCKED. Each
entry expires after one interval, so a backlog after an outage does not pile up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from creditworker.contract.operations import OPERATIONS

if TYPE_CHECKING:
    from creditworker.settings import Settings

# (schedule entry, task name, setting that holds its interval in seconds), from the registry
PERIODIC_TASKS: tuple[tuple[str, str, str], ...] = tuple(
    (operation.periodic.entry, operation.task, operation.periodic.interval_setting)
    for operation in OPERATIONS if operation.periodic is not None
)


def build_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    from celery.schedules import crontab

    entries = {entry for entry, _task, _setting in PERIODIC_TASKS}
    unknown = set(settings.schedule_crontabs) - entries
    if unknown:
        raise ValueError(f"CREDITWORKER_SCHEDULE_CRONTABS names unknown entries {sorted(unknown)}; "
                         f"the entries are {sorted(entries)}")
    schedule: dict[str, dict[str, Any]] = {}
    for entry, task, interval_setting in PERIODIC_TASKS:
        interval = float(getattr(settings, interval_setting))
        when: Any = interval
        if entry in settings.schedule_crontabs:
            fields = settings.schedule_crontabs[entry].split()
            if len(fields) != 5:
                raise ValueError(f"crontab for {entry!r} needs 5 fields, got {settings.schedule_crontabs[entry]!r}")
            minute, hour, day_of_month, month_of_year, day_of_week = fields
            when = crontab(minute=minute, hour=hour, day_of_month=day_of_month,
                           month_of_year=month_of_year, day_of_week=day_of_week)
        schedule[entry] = {"task": task, "schedule": when, "options": {"expires": interval}}
    return schedule
