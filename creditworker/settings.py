"""Configuration from environment variables prefixed ``CREDITWORKER_``.

Every default is the embedded one: a SQLite file and a ledger file in the working
directory, so a laptop runs the whole system with no server configured.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from creditworker.contract import OveragePolicy


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CREDITWORKER_", extra="ignore")

    database_url: str = "sqlite:///creditworker.db"
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
    visibility_timeout_seconds: int = Field(default=3600, ge=1)
    """Redis: an unacknowledged message is redelivered after this long (see the README)."""

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
    gather_max: int = Field(default=100, ge=1, le=1000)
    """Single operations a worker gathers into one transaction at most; 1 turns gathering off."""
    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    """A task message with a larger body is dead-lettered unread (a batch of 1,000 items
    with the largest metadata allowed is about 8 MiB)."""
    allocation_backfill: bool = False
    """After downtime, also grant missed periods whose credits would still be valid."""


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
