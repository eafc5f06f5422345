"""The broker options every connecting layer derives from the settings (settings.py)."""

from __future__ import annotations

from creditworker import settings
from creditworker.settings import Settings, broker_transport_options


def test_the_restore_sweep_runs_as_often_as_a_live_worker_rescores() -> None:
    options = broker_transport_options(Settings(broker_url="redis://x", visibility_timeout_seconds=30))
    assert options["unacked_restore_interval"] == 30 // settings.HEARTBEATS_PER_TIMEOUT


def test_the_worker_app_and_the_event_consumers_get_the_same_options() -> None:
    from creditworker.notifications.exchange import broker_connection
    from creditworker.worker.app import make_celery

    configured = Settings(broker_url="redis://127.0.0.1:1/0", visibility_timeout_seconds=12)
    app = make_celery(configured)
    connection = broker_connection(settings=configured)
    assert connection.transport_options == app.conf.broker_transport_options
