"""Configuration from environment variables prefixed ``CREDITWORKER_``.

Every default is the embedded one: a SQLite file and a ledger file in the working
directory, so a laptop runs the whole system with no server configured. An empty variable
means unset (its default), so a deployment can pass an optional one through as
`${VAR:-}`, as docker-compose.yml does.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from creditworker.contract.credits import OveragePolicy

LEDGER_OFF = "off"
"""The `CREDITWORKER_LEDGER_PATH` that turns the ledger file off (empty means the default)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CREDITWORKER_", extra="ignore", env_ignore_empty=True
    )

    database_url: str = "sqlite:///creditworker.db"
    database_prepared_statements: bool = True
    """PostgreSQL: the engine prepares its statements on each connection (planned once, not at
    every run). Behind a pooler in transaction mode (PgBouncer's `pool_mode = transaction`)
    set it false; left on there, the engine turns it off itself after three lost statements."""
    ledger_path: str | None = "creditworker-ledger.jsonl"
    overage_policy: OveragePolicy = OveragePolicy.REJECT
    expiring_soon_days: int = Field(default=7, ge=0, le=3660)
    low_credit_threshold: int | None = Field(default=None, ge=0)
    expiry_reminder_days: list[int] = Field(default_factory=lambda: [7, 1])

    broker_url: str = "filesystem://"
    """`filesystem://` (embedded: folders under `data_dir`), `redis://...` or `amqp://...`."""
    result_backend: str | None = None
    """Default: the same Redis for a Redis broker, `rpc://` for RabbitMQ, files otherwise."""
    data_dir: str = ".creditworker"
    result_expires_seconds: int = Field(default=3600, ge=60)
    task_max_retries: int = Field(default=8, ge=0, le=100)
    visibility_timeout_seconds: int = Field(default=30, ge=1)
    """Redis: a message a dead worker held is redelivered after this long (see the README).
    A live worker keeps what it holds from being redelivered, however long it takes."""

    expire_interval_seconds: float = Field(default=60, gt=0)
    release_stale_interval_seconds: float = Field(default=30, gt=0)
    reminder_interval_seconds: float = Field(default=3600, gt=0)
    relay_interval_seconds: float = Field(default=5, gt=0)
    allocate_interval_seconds: float = Field(default=60, gt=0)
    schedule_crontabs: dict[str, str] = Field(default_factory=dict)
    """Beat entries to run at crontab times instead of intervals, e.g.
    `{"send-expiry-reminders": "0 9 * * *"}` (minute hour day-of-month month day-of-week, UTC)."""
    allocation_chunk_size: int = Field(default=200, ge=1, le=1000)
    """Due subscriptions per allocation task: beat fans the work out in chunks this size."""
    api_keys: str = ""
    """Bearer keys the HTTP gateway accepts, comma-separated (see the README's gateway section)."""
    http_max_body_bytes: int = Field(default=1024 * 1024, ge=1)
    """The largest request body the HTTP gateway reads; a larger one is refused with 413."""
    celery_tasks_allowed: str = ""
    """Celery's built-in tasks (`celery.map`, `celery.chord_unlock`, ...) the workers run,
    comma-separated; by default none: a message for one is a dead letter, since whoever can
    write to the broker could otherwise make the workers run them. `celery.backend_cleanup`
    runs where beat schedules it itself (the embedded result backend, which cannot expire
    results on its own)."""
    broker_connect_timeout_seconds: float = Field(default=2.0, gt=0, le=300)
    """How long a producer (the Python clients, the HTTP gateway) tries to reach the broker or
    the result backend before it reports it unreachable (`service_unavailable`, naming the
    URL). Workers keep retrying their broker for as long as it takes."""
    gather_max: int = Field(default=100, ge=1, le=1000)
    """Single operations a worker gathers into one transaction at most; 1 turns gathering off."""
    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    """A task message with a larger body is dead-lettered unread (a batch of 1,000 items
    with the largest metadata allowed is about 8 MiB)."""
    task_events: bool = False
    """Workers send task events from the start. Off, they send none until a monitor asks:
    Flower sends `enable_events` to every worker when it starts (and every 5 s), so it still
    lists every task with its state. On, every task costs its worker three more broker
    messages (received, started, succeeded) whether or not anyone listens."""
    task_sent_events: bool = False
    """Producers send a `task-sent` event with each task (Flower then lists a task as SENT
    before a worker receives it): one more broker message per call, at the producer."""
    track_started: bool = False
    """Workers store a STARTED state for every task before running it: one more result
    write per task. Reservations always record it (their caller's deadline relies on it),
    whatever this says."""
    result_extended: bool = False
    """Results also store the task's name, arguments, worker and retries (Celery's
    `result_extended`): larger result writes, for tools that read them from the backend."""
    allocation_backfill: bool = False
    """After downtime, also grant missed periods whose credits would still be valid."""
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    """The worker's Prometheus endpoint (off unless a port is given); the gateway serves
    /metrics on its own port (creditworker/metrics/)."""
    metrics_address: str = "127.0.0.1"
    """Where the worker's metrics endpoint listens (`0.0.0.0` in a container)."""

    # ---- webhooks (docs/webhooks.md)
    webhooks_secret_key: SecretStr | None = None
    """Seals the endpoints' signing secrets in the database; unset, they are stored as is."""
    webhooks_allow_private: bool = False
    """Allow endpoint URLs on loopback, link-local and private addresses (development, tests)."""
    webhooks_timeout_seconds: float = Field(default=5, gt=0, le=60)
    webhooks_retry_delays_seconds: list[float] = Field(
        default_factory=lambda: [5, 300, 1800, 7200, 18000, 36000, 36000], max_length=100)
    """The delays after each failed attempt (jittered by up to 20%); when they run out the
    delivery has failed."""
    webhooks_rotation_grace_seconds: float = Field(default=24 * 3600, ge=0)
    webhooks_log_retention_days: float = Field(default=30, gt=0)
    webhooks_interval_seconds: float = Field(default=5, gt=0)
    """How often beat runs the sender (due retries); new events wake it at once."""
    webhooks_batch_size: int = Field(default=100, ge=1, le=1000)
    webhooks_concurrency: int = Field(default=16, ge=1, le=256)

    payment_provider: str = "manual"
    """What charges auto top-ups: `manual` (grants at once, for internal credits) or
    `module:object` (a `PaymentProvider`, docs/topups.md)."""
    topup_stale_after_seconds: float = Field(default=300, gt=0)
    """A top-up still requested or charging after this long is sent to a worker again (its
    worker crashed, or its message was lost): the same idempotency key, so never charged twice."""
    charge_topups_interval_seconds: float = Field(default=60, gt=0)

    @field_validator("webhooks_retry_delays_seconds")
    @classmethod
    def _delays_not_negative(cls, delays: list[float]) -> list[float]:
        if any(delay < 0 for delay in delays):
            raise ValueError("a retry delay cannot be negative")
        return delays

    @field_validator("ledger_path")
    @classmethod
    def _ledger_off(cls, path: str | None) -> str | None:
        return None if path is not None and path.lower() == LEDGER_OFF else path


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()


# ---------------------------------------------------------------- the broker a configuration names
# Below every layer that connects to the broker (the worker's app, the event consumers of
# notifications/exchange.py, the launcher), so that each derives the same options from the
# settings it was given and none imports another layer for them.

HEARTBEATS_PER_TIMEOUT = 6
"""A live worker re-scores the Redis messages it holds this many times per visibility
timeout (worker/redelivery.py); the restore sweep runs as often."""


def broker_kind(broker_url: str) -> str:
    """`redis`, `rabbitmq`, `filesystem` (the embedded broker), or the URL's scheme."""
    scheme = broker_url.split("://", 1)[0].lower()
    if scheme in ("redis", "rediss", "redis+socket"):
        return "redis"
    if scheme in ("amqp", "amqps", "pyamqp"):
        return "rabbitmq"
    if scheme == "filesystem":
        return "filesystem"
    return scheme


def embedded_folders(settings: Settings) -> dict[str, Path]:
    """The embedded broker's and result backend's folders under `data_dir`, made if missing."""
    root = Path(settings.data_dir).resolve()
    folders = {
        "queue": root / "broker" / "queue",
        "processed": root / "broker" / "processed",
        "control": root / "broker" / "control",
        "held": root / "broker" / "held",
        "results": root / "results",
    }
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    return folders


def result_backend_url(settings: Settings) -> str:
    if settings.result_backend:
        return settings.result_backend
    kind = broker_kind(settings.broker_url)
    if kind == "redis":
        return settings.broker_url
    if kind == "rabbitmq":
        return "rpc://"
    return f"file://{embedded_folders(settings)['results']}"


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """The kombu transport options of the configured broker, for producers, workers and
    event consumers alike."""
    kind = broker_kind(settings.broker_url)
    if kind == "redis":
        # An unacknowledged message is redelivered once its score in kombu's `unacked_index`
        # is older than the visibility timeout. A live worker re-scores what it holds six
        # times per timeout (`redelivery.UnackedHeartbeat`), so only a dead worker's
        # messages age: the timeout bounds the recovery after a crash, not the longest task.
        # The restore sweep runs every timeout / 6 seconds (at most 10 s) on every worker,
        # instead of kombu's default of ~100 s.
        timeout = settings.visibility_timeout_seconds
        return {
            "visibility_timeout": timeout,
            "unacked_restore_interval": max(1, min(10, timeout // HEARTBEATS_PER_TIMEOUT)),
            "unacked_restore_throttle": 1,
            # The restore sweep holds a Redis lock while it runs; if Redis dies mid-sweep
            # the lock outlives the restart (with persistence) and blocks every restore
            # until it expires: kombu's default of 300 s. The sweep takes milliseconds.
            "unacked_mutex_expire": min(60, timeout),
        }
    if kind == "rabbitmq":
        # Publisher confirms: a publish that returns was accepted by the broker.
        return {"confirm_publish": True}
    if kind == "filesystem":
        folders = embedded_folders(settings)
        return {
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "processed_folder": str(folders["processed"]),
            "control_folder": str(folders["control"]),
            # What each worker took and has not acknowledged (worker/filesystem_hold.py).
            "held_folder": str(folders["held"]),
            "store_processed": False,
            "polling_interval": 0.1,
        }
    return {}
