"""The Celery app: delivery settings for exactly-once effects, shared by worker and producers.

It imports Celery and the settings only. The worker imports the tasks through `include`
when it starts; a producer that builds this app sends tasks by name and never imports the
storage stack.

Nothing is built at import: `make_celery` builds an app for given settings, and the
module attribute `app` (what `celery -A creditworker` finds) is built on first use, and
importing this module creates no embedded-broker folders and reads no settings. What a
broker URL implies (`broker_kind`, the transport options) lives in settings.py, for every
layer that connects.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from celery import Celery
from celery.signals import beat_init, celeryd_init, worker_init

from creditworker.contract.operations import RESERVE
from creditworker.metrics.exposition import prepare_worker_metrics
from creditworker.settings import (
    Settings,
    broker_kind,
    broker_transport_options,
    get_settings,
    result_backend_url,
)
from creditworker.worker.configured import ATTRIBUTE, settings_of
from creditworker.worker.redelivery import UnackedHeartbeat
from creditworker.worker.transport import TRANSPORTS

TASK_MODULES = ["creditworker.worker.tasks"]


def celery_config(settings: Settings) -> dict[str, Any]:
    from beat_schedule import build_schedule

    backend = result_backend_url(settings)
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        # An entry on a Redis or embedded queue that is not a message envelope reaches the
        # worker as a dead letter instead of stopping it (creditworker/worker/transport.py).
        "broker_transport": TRANSPORTS.get(broker_kind(settings.broker_url)),
        "result_backend": backend,
        "broker_transport_options": broker_transport_options(settings),
        # JSON only: a pickle message is refused, so nobody who can write to the broker
        # can run code in the workers.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Ack after the task ran; a worker lost mid-task leaves its message to redeliver.
        # The idempotency key makes the redelivery a no-op if the first run committed.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # A task still running when the broker connection drops cannot ack, so it is
        # redelivered later; the idempotency key makes that a no-op. We let it finish
        # rather than cancel it (Celery's planned 6.0 default): when the result backend
        # is the same Redis, a cancel that cannot store its RETRY state leaves the task
        # looking revoked, and Celery acks it once Redis is back: the operation is lost.
        # Seen in tests/faults (stream-125); a duplicate is harmless, a loss is not.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_connection_retry_on_startup": True,
        # Every message is checked before Celery reads it; one it cannot read becomes a
        # dead letter instead of stopping the worker (creditworker/worker/intake.py).
        "worker_consumer": "creditworker.worker.intake:GuardedConsumer",
        # Prefork, with a timeout thread that does not hold up the exit (worker/pool.py).
        "worker_pool": "creditworker.worker.pool:TaskPool",
        # Where the transport has no event loop (the embedded one), a timer thread sleeps up to
        # this long between its checks, and a stopping worker waits for the sleep to end.
        "worker_timer_precision": 0.2,
        # Monitoring costs broker messages and result writes per task, so each part is a
        # setting, off by default. Flower still lists every task with its state: it sends
        # `enable_events` to the workers, which then send task events until they restart.
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": settings.task_sent_events,
        "task_track_started": settings.track_started,
        # A reservation's caller tells "not applied, never will be" from "may have been
        # applied" by the STARTED state once its deadline passed (creditworker/client/handle.py).
        # Gathered ones record it in `gather.run_gathered`; this covers those that take
        # Celery's own path (a retry, or gathering turned off).
        "task_annotations": {RESERVE.task: {"track_started": True}},
        "result_expires": settings.result_expires_seconds,
        "result_extended": settings.result_extended,
        "timezone": "UTC",
        "enable_utc": True,
        "task_default_delivery_mode": "persistent",
        "beat_schedule": build_schedule(settings),
        # Celery's persistent scheduler, stopped by SIGTERM between publishes, never inside
        # one, where Celery's own handler can hang beat on RabbitMQ (worker/beat_stop.py).
        "beat_scheduler": "creditworker.worker.beat_stop:Scheduler",
    }
    if backend.startswith("redis"):
        # One Redis result backend (and pub/sub connection) per process, not one per
        # thread: a producer called from many threads otherwise subscribes in each, and
        # at 200 calls a second spent most of its CPU there (bench/run.py, reserve).
        # Not for rpc://, whose replies go to a queue named per thread.
        config["result_backend_thread_safe"] = True
    if broker_kind(settings.broker_url) == "redis" and backend.startswith("redis"):
        config["result_backend_transport_options"] = {
            "visibility_timeout": settings.visibility_timeout_seconds
        }
    return config


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    celery = Celery("creditworker", include=TASK_MODULES)
    celery.conf.update(celery_config(settings))
    celery.steps["consumer"].add(UnackedHeartbeat)
    # By name: only a worker imports it (and only one with CREDITWORKER_METRICS_PORT serves).
    celery.steps["worker"].add("creditworker.worker.metrics_endpoint:MetricsEndpoint")
    setattr(celery, ATTRIBUTE, settings)  # what tasks, delivery, gather and intake read
    return celery


def _metrics_directory(sender: Any = None, instance: Any = None, **_kwargs: Any) -> None:
    """Before a worker with CREDITWORKER_METRICS_PORT forks its pool: the pool's processes
    must write their metrics where the endpoint reads them (worker/metrics_endpoint.py)."""
    app = getattr(instance, "app", None)
    if app is not None and getattr(app, ATTRIBUTE, None) is not None and settings_of(app).metrics_port is not None:
        prepare_worker_metrics()


celeryd_init.connect(_metrics_directory, weak=False, dispatch_uid="creditworker.metrics.directory")


def _quiet_logs(sender: Any = None, **_signal: Any) -> None:
    from creditworker.worker import quiet_logs

    app = getattr(sender, "app", None)
    settings = getattr(app, ATTRIBUTE, None)
    if settings is None:
        return
    quiet_logs.install(embedded_broker=broker_kind(settings.broker_url) == "filesystem",
                       broker_url=settings.broker_url)


worker_init.connect(_quiet_logs, weak=False)

beat_init.connect(_quiet_logs, weak=False)


def _stop_between_publishes(sender: Any = None, **_signal: Any) -> None:
    from creditworker.worker import beat_stop

    beat_stop.stop_between_publishes(sender)


beat_init.connect(_stop_between_publishes, weak=False)


@cache
def default_app() -> Celery:
    """This process's app, for the settings in its environment, built once on first use."""
    return make_celery()


def __getattr__(name: str) -> Any:
    """`app` is built when first asked for (`celery -A creditworker` asks), not at import."""
    if name == "app":
        return default_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
