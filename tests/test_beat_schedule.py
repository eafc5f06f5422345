"""The beat schedule: every periodic task, at its interval or at a crontab time."""

from __future__ import annotations

import pytest
from celery.schedules import crontab

from beat_schedule import PERIODIC_TASKS, build_schedule
from creditworker.contract.operations import BY_TASK
from creditworker.settings import Settings


def test_every_entry_runs_a_registered_task_at_its_interval() -> None:
    schedule = build_schedule(Settings(expire_interval_seconds=7, allocate_interval_seconds=11))
    assert set(schedule) == {entry for entry, _task, _setting in PERIODIC_TASKS}
    assert {
        "expire-credits", "release-stale-reservations", "send-expiry-reminders", "relay-events",
        "allocate-subscriptions", "deliver-webhooks", "charge-due-topups",
    } == set(schedule)
    for entry in schedule.values():
        assert entry["task"] in BY_TASK
    assert schedule["expire-credits"]["schedule"] == 7.0
    assert schedule["allocate-subscriptions"]["schedule"] == 11.0
    assert schedule["charge-due-topups"]["schedule"] == 60.0


def test_the_top_up_sweep_runs_at_its_own_interval() -> None:
    schedule = build_schedule(Settings(charge_topups_interval_seconds=13))
    assert schedule["charge-due-topups"] == {
        "task": "creditworker.topups.charge_due", "schedule": 13.0, "options": {"expires": 13.0}}


def test_a_crontab_from_the_environment_replaces_the_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDITWORKER_SCHEDULE_CRONTABS", '{"send-expiry-reminders": "30 9 * * 1-5"}')
    schedule = build_schedule(Settings())
    when = schedule["send-expiry-reminders"]["schedule"]
    assert isinstance(when, crontab)
    assert when.minute == {30} and when.hour == {9} and when.day_of_week == {1, 2, 3, 4, 5}
    assert schedule["expire-credits"]["schedule"] == 60.0


@pytest.mark.parametrize("crontabs", ['{"no-such-entry": "0 * * * *"}', '{"expire-credits": "0 *"}'])
def test_a_bad_crontab_is_refused_with_a_clear_error(monkeypatch: pytest.MonkeyPatch, crontabs: str) -> None:
    monkeypatch.setenv("CREDITWORKER_SCHEDULE_CRONTABS", crontabs)
    with pytest.raises(ValueError, match="unknown entries|5 fields"):
        build_schedule(Settings())
