"""The SQL tables, in SQLAlchemy 2 typed declarative style.

Portable across PostgreSQL, SQLite and MariaDB/MySQL: timestamps are stored as naive UTC
and handed back aware; identifiers compare byte for byte (binary collation on MySQL).
The Alembic migrations in ``creditworker/storage/migrations`` create exactly these tables.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    false,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from creditworker.contract.credits import (
    DEFAULT_CREDIT_TYPE,
    MAX_CREDIT_TYPE_LENGTH,
    MAX_KEY_LENGTH,
    MAX_USER_ID_LENGTH,
)


class UtcDateTime(TypeDecorator[datetime]):
    """Stores naive UTC with microseconds; returns timezone-aware UTC datetimes."""

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime(timezone=False))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


def _identifier(length: int) -> String:
    return String(length).with_variant(
        mysql.VARCHAR(length, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb"
    )


# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
Id = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Account(Base):
    """One row per user: the running totals that make a balance read O(1).

    CHECK constraints back the engine's rules: nothing is held below zero, and `available`
    (balance - reserved) goes below zero only as far as `overdraft_limit`, which only a
    commit under the `allow_negative` overage policy raises (to the debt it allowed).
    """

    __tablename__ = "accounts"
    __table_args__ = (
        CheckConstraint("reserved >= 0", name="reserved_not_negative"),
        CheckConstraint("overdraft_limit >= 0", name="overdraft_limit_not_negative"),
        CheckConstraint("balance - reserved >= -overdraft_limit", name="available_within_overdraft"),
    )

    user_id: Mapped[str] = mapped_column(_identifier(MAX_USER_ID_LENGTH), primary_key=True)
    balance: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved: Mapped[int] = mapped_column(BigInteger, default=0)
    low_credit_threshold: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    """None: the service's default threshold applies."""
    low_credit_alerted: Mapped[bool] = mapped_column(Boolean, default=False)
    """Set when a credits.low event fired; cleared when available is back at the threshold."""
    overdraft_limit: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    """How far below zero `available` may go: 0 unless an allowed overage made a debt."""
    pending_until: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    """The latest `effective_at` of the default type's grants (migration 0010): until then
    a write reads the account's pending lots; after it, nothing is pending and no job ran."""
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


def _credit_type() -> Mapped[str]:
    """The credit type of a lot, hold or entry (migration 0010: older rows are the default)."""
    return mapped_column(_identifier(MAX_CREDIT_TYPE_LENGTH), default=DEFAULT_CREDIT_TYPE,
                         server_default=DEFAULT_CREDIT_TYPE)


class TypeBalance(Base):
    """An account's totals in a credit type other than the default (whose totals stay on
    the `accounts` row, so the default type's operations read and write no more rows than
    before types existed). Written only under the `accounts` row's lock; the same CHECK
    constraints as there."""

    __tablename__ = "credit_balances"
    __table_args__ = (
        CheckConstraint("reserved >= 0", name="reserved_not_negative"),
        CheckConstraint("overdraft_limit >= 0", name="overdraft_limit_not_negative"),
        CheckConstraint("balance - reserved >= -overdraft_limit", name="available_within_overdraft"),
    )

    user_id: Mapped[str] = mapped_column(
        _identifier(MAX_USER_ID_LENGTH), ForeignKey("accounts.user_id"), primary_key=True
    )
    credit_type: Mapped[str] = mapped_column(_identifier(MAX_CREDIT_TYPE_LENGTH), primary_key=True)
    balance: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved: Mapped[int] = mapped_column(BigInteger, default=0)
    overdraft_limit: Mapped[int] = mapped_column(BigInteger, default=0)
    pending_until: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    low_credit_threshold: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    """This type's own low-credit threshold (migration 0012); None: no `credits.low` for it
    (the service default is in the default type's unit, so it applies to that type only)."""
    low_credit_alerted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """Set when this type's `credits.low` (or, with no threshold, `credits.depleted`) fired;
    cleared when it recovered: each crossing fires once."""
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class Lot(Base):
    """A grant of credits, drawn down by deductions and commits until spent or expired.

    No index includes `remaining`, so that a draw's update can stay in its page (HOT, see
    migration 0006); an account's live lots are found by `user_id`, then `remaining > 0`.
    """

    __tablename__ = "credit_lots"
    __table_args__ = (
        Index("ix_credit_lots_user_id", "user_id"),
        Index("ix_credit_lots_expires_at_id", "expires_at", "id"),
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint("remaining >= 0 AND remaining <= amount", name="remaining_in_range"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(
        _identifier(MAX_USER_ID_LENGTH), ForeignKey("accounts.user_id")
    )
    amount: Mapped[int] = mapped_column(BigInteger)
    remaining: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(32))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    idempotency_key: Mapped[str] = mapped_column(_identifier(MAX_KEY_LENGTH))
    credit_type: Mapped[str] = _credit_type()
    effective_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    """Before this moment the lot is pending: counted in the balance, not spendable."""
    cost_basis_amount: Mapped[Decimal | None] = mapped_column(Numeric(24, 12), nullable=True)
    """What was paid per credit of this lot (in `cost_basis_currency`), carried onto draws."""
    cost_basis_currency: Mapped[str | None] = mapped_column(String(3), nullable=True)


class Hold(Base):
    """A reservation: credits held out of `available` until committed, released or expired."""

    __tablename__ = "reservations"
    __table_args__ = (
        Index("ix_reservations_status_expires_at", "status", "expires_at"),
        Index("ix_reservations_user_id_created_at", "user_id", "created_at"),
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint("committed_amount IS NULL OR committed_amount >= 0", name="committed_amount_not_negative"),
    )

    id: Mapped[str] = mapped_column(_identifier(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(
        _identifier(MAX_USER_ID_LENGTH), ForeignKey("accounts.user_id")
    )
    amount: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    finalized_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    committed_amount: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    idempotency_key: Mapped[str] = mapped_column(_identifier(MAX_KEY_LENGTH))
    credit_type: Mapped[str] = _credit_type()


class Entry(Base):
    """An immutable ledger entry; the sum of `amount` per account is its balance."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        Index("ix_ledger_entries_user_id_id", "user_id", "id"),
        Index("ix_ledger_entries_user_id_created_at_id", "user_id", "created_at", "id"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(
        _identifier(MAX_USER_ID_LENGTH), ForeignKey("accounts.user_id")
    )
    kind: Mapped[str] = mapped_column(String(32))
    amount: Mapped[int] = mapped_column(BigInteger)
    held: Mapped[int] = mapped_column(BigInteger)
    balance_after: Mapped[int] = mapped_column(BigInteger)
    reserved_after: Mapped[int] = mapped_column(BigInteger)
    lot_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    reservation_id: Mapped[str | None] = mapped_column(_identifier(64), nullable=True)
    draws: Mapped[list[dict[str, int]] | None] = mapped_column(JSON, nullable=True)
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    entry_metadata: Mapped[dict[str, Any] | None] = mapped_column(
        "metadata", JSON, nullable=True
    )
    idempotency_key: Mapped[str] = mapped_column(_identifier(MAX_KEY_LENGTH), index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    refund_of: Mapped[int | None] = mapped_column(BigInteger, nullable=True, index=True)
    """On a `refund` entry: the deduction or commit it gives back (migration 0008)."""
    credit_type: Mapped[str] = _credit_type()


class Operation(Base):
    """One row per applied idempotency key: the request's fingerprint and its result."""

    __tablename__ = "operations"

    idempotency_key: Mapped[str] = mapped_column(_identifier(MAX_KEY_LENGTH), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    fingerprint: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str | None] = mapped_column(_identifier(MAX_USER_ID_LENGTH), nullable=True)
    result: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class OutboxEvent(Base):
    """A notification written with the change that caused it, until the relay publishes it."""

    __tablename__ = "outbox_events"
    __table_args__ = (Index("ix_outbox_events_published_at_id", "published_at", "id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(_identifier(64), unique=True)
    routing_key: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    published_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class ExpiryReminder(Base):
    """One row per reminder sent, so each (lot, days before expiry) is reminded once."""

    __tablename__ = "expiry_reminders"

    lot_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("credit_lots.id"), primary_key=True
    )
    days_before: Mapped[int] = mapped_column(Integer, primary_key=True)
    sent_at: Mapped[datetime] = mapped_column(UtcDateTime)


class PlanRow(Base):
    """A subscription plan: credits granted per billing period, and their price."""

    __tablename__ = "plans"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(_identifier(100), unique=True)
    credit_limit: Mapped[int] = mapped_column(BigInteger)
    price: Mapped[Decimal] = mapped_column(Numeric(18, 4))
    currency: Mapped[str] = mapped_column(String(3))
    billing_period: Mapped[str] = mapped_column(String(16))
    validity_days: Mapped[int | None] = mapped_column(Integer, nullable=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class SubscriptionRow(Base):
    """A user's subscription to a plan; periods are counted from `anchor_at`."""

    __tablename__ = "subscriptions"
    __table_args__ = (
        Index("ix_subscriptions_status_current_period_end_id", "status", "current_period_end", "id"),
        Index("ix_subscriptions_user_id_status", "user_id", "status"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(
        _identifier(MAX_USER_ID_LENGTH), ForeignKey("accounts.user_id")
    )
    plan_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("plans.id"))
    status: Mapped[str] = mapped_column(String(16))
    anchor_at: Mapped[datetime] = mapped_column(UtcDateTime)
    period_index: Mapped[int] = mapped_column(Integer)
    current_period_start: Mapped[datetime] = mapped_column(UtcDateTime)
    current_period_end: Mapped[datetime] = mapped_column(UtcDateTime)
    pending_plan_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("plans.id"), nullable=True
    )
    cancel_at_period_end: Mapped[bool] = mapped_column(Boolean, default=False)
    ended_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class DeadLetterRow(Base):
    """A message the worker could not even read, kept whole for an operator to inspect.

    The body is kept as text when it is UTF-8 and as base64 otherwise (`body_encoding`),
    cut to `dead_letters.MAX_STORED_BODY` bytes; `body_size` is the size that arrived.
    """

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    task_id: Mapped[str | None] = mapped_column(String(255), nullable=True, index=True)
    task_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    queue: Mapped[str | None] = mapped_column(String(255), nullable=True)
    reason: Mapped[str] = mapped_column(Text)
    content_type: Mapped[str | None] = mapped_column(String(255), nullable=True)
    content_encoding: Mapped[str | None] = mapped_column(String(64), nullable=True)
    headers: Mapped[dict[str, Any]] = mapped_column(JSON)
    properties: Mapped[dict[str, Any]] = mapped_column(JSON)
    body: Mapped[str] = mapped_column(Text)
    body_encoding: Mapped[str] = mapped_column(String(16))
    body_size: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)


class LedgerRecordRow(Base):
    """What the ledger entries do not say: a refused operation (`error`: the request and
    its error; nothing else changed) or what a sweep did (`system`: its counts). Written
    once, never updated, like the entries."""

    __tablename__ = "ledger_records"
    __table_args__ = (
        Index("ix_ledger_records_kind_id", "kind", "id"),
        CheckConstraint("kind IN ('error', 'system')", name="kind"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    operation: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str | None] = mapped_column(_identifier(MAX_USER_ID_LENGTH), nullable=True, index=True)
    code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


# ---------------------------------------------------------------- webhooks (issue 28)


class WebhookEndpointRow(Base):
    """A receiver of signed webhooks: where to post, which event patterns it wants.

    `secret` holds the signing secret as `records.webhooks` stores it: sealed with the key
    setting when one is given (`fernet:...`), else as is (`plain:whsec_...`). During a
    rotation `previous_secret` signs too, until `previous_secret_expires_at`.
    """

    __tablename__ = "webhook_endpoints"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    url: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    event_patterns: Mapped[list[str]] = mapped_column(JSON)
    secret: Mapped[str] = mapped_column(Text)
    previous_secret: Mapped[str | None] = mapped_column(Text, nullable=True)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    disabled_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    disabled_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    last_success_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class WebhookDeliveryRow(Base):
    """One event for one endpoint, until it succeeded or its retry schedule ran out.

    `next_attempt_at` is when a sender may take it next (a sender's claim moves it past its
    lease, so a sender that died gives it back); None once final. `run_attempts` counts the
    attempts since it was queued or replayed and picks the next delay of the schedule.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_endpoint_id_id", "endpoint_id", "id"),
        Index("uq_webhook_deliveries_endpoint_id_event_id", "endpoint_id", "event_id", unique=True),
        CheckConstraint("status IN ('pending', 'succeeded', 'failed')", name="status"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    endpoint_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    event_id: Mapped[str] = mapped_column(_identifier(64))
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    run_attempts: Mapped[int] = mapped_column(Integer, default=0)
    run_started_at: Mapped[datetime] = mapped_column(UtcDateTime)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    claim_token: Mapped[str | None] = mapped_column(String(32), nullable=True)
    last_response_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)


class WebhookAttemptRow(Base):
    """One HTTP attempt of a delivery: the log an operator reads (and replays from)."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (Index("ix_webhook_attempts_delivery_id_id", "delivery_id", "id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("webhook_deliveries.id", ondelete="CASCADE"))
    endpoint_id: Mapped[int] = mapped_column(BigInteger, index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(16))
    """`succeeded`, `failed` (will retry), `exhausted` (schedule ran out) or `gone` (410)."""
    response_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    response_body: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    duration_ms: Mapped[int] = mapped_column(Integer)
    attempted_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)


class CreditAlertRuleRow(Base):
    """A low-credit threshold as a percentage of the account's last grant, per credit type.

    The engine turns it into the account's absolute threshold at each grant (and when the
    rule is set, from the newest lot), so evaluating alerts reads nothing more.
    """

    __tablename__ = "credit_alert_rules"
    __table_args__ = (
        CheckConstraint("low_threshold_percent > 0 AND low_threshold_percent <= 100", name="percent_in_range"),
    )

    user_id: Mapped[str] = mapped_column(
        _identifier(MAX_USER_ID_LENGTH), ForeignKey("accounts.user_id"), primary_key=True)
    credit_type: Mapped[str] = mapped_column(_identifier(32), primary_key=True, default="credits",
                                             server_default="credits")
    low_threshold_percent: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
