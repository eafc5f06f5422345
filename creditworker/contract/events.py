"""Notification events: the versioned payloads published to the `creditworker.events` exchange.

Shared by the worker (which writes them to the outbox) and by consumers (which read them
from queues), so it imports pydantic only. Every event carries an `event_id`; a relay that
crashes after publishing resends, so consumers drop ids they have already seen.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

EXCHANGE = "creditworker.events"
"""The durable topic exchange every event is published to."""

SCHEMA_VERSION = 1


class _SystemEvent(BaseModel):
    """An event about the service itself, not about one account (no `user_id`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: str
    version: int = SCHEMA_VERSION
    occurred_at: datetime


class AccountSnapshot(BaseModel):
    """An account's totals as the transaction that wrote the event left them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    balance: int
    reserved: int
    available: int
    credit_type: str = "credits"


class _Event(_SystemEvent):
    user_id: str
    account: AccountSnapshot | None = None
    """The account after the change (whole, not a delta: events can be delivered out of
    order); None for an event written without its account locked."""


class _CreditEvent(_Event):
    """An event about one credit type of an account (the default type's unless it says)."""

    credit_type: str = "credits"


class CreditsLow(_CreditEvent):
    """The available balance reached or crossed below the account's threshold (once per
    crossing: above before, at or below after)."""

    type: Literal["credits.low"] = "credits.low"
    available: int
    threshold: int


class CreditsDepleted(_CreditEvent):
    """`available` reached zero or went below (once per crossing, until recovered)."""

    type: Literal["credits.depleted"] = "credits.depleted"
    available: int


class CreditsRecovered(_CreditEvent):
    """`available` is back above the low threshold (above zero where none is set), after
    `credits.low` or `credits.depleted` fired."""

    type: Literal["credits.recovered"] = "credits.recovered"
    available: int
    threshold: int | None


class CreditsExpiring(_CreditEvent):
    """A reminder that a lot expires within `days_before` days (once per lot and day).

    `remaining` is what will expire; for a plan allocation that rolls over, `rolls_over` is
    what will roll into the next period instead (if nothing else changes), not counted in
    `remaining`."""

    type: Literal["credits.expiring"] = "credits.expiring"
    lot_id: int
    remaining: int
    expires_at: datetime
    days_before: int
    rolls_over: int = 0


class CreditsExpired(_CreditEvent):
    type: Literal["credits.expired"] = "credits.expired"
    lot_id: int
    amount: int


class CreditsVoided(_CreditEvent):
    """A correction removed credits of a lot (`void_lot`)."""

    type: Literal["credits.voided"] = "credits.voided"
    lot_id: int
    amount: int
    reason: str


class CreditsRefunded(_CreditEvent):
    """A correction gave back (part of) a deduction or commit (`refund_deduction`)."""

    type: Literal["credits.refunded"] = "credits.refunded"
    entry_id: int
    """The deduction or commit refunded."""
    amount: int
    reason: str


class CreditsExpiryChanged(_CreditEvent):
    """A correction moved a lot's expiry (`change_lot_expiry`)."""

    type: Literal["credits.expiry_changed"] = "credits.expiry_changed"
    lot_id: int
    expires_at: datetime
    previous_expires_at: datetime | None


class ReservationExpired(_CreditEvent):
    type: Literal["reservation.expired"] = "reservation.expired"
    reservation_id: str
    amount: int


class SubscriptionAllocated(_Event):
    """A period's credits were granted (once per subscription and period)."""

    type: Literal["subscription.allocated"] = "subscription.allocated"
    subscription_id: int
    plan_id: int
    period_index: int
    period_start: datetime
    period_end: datetime
    credits: int
    lot_id: int


class SubscriptionChanged(_Event):
    """A plan change: an upgrade now (with its prorated grant) or a downgrade scheduled."""

    type: Literal["subscription.changed"] = "subscription.changed"
    subscription_id: int
    old_plan_id: int
    new_plan_id: int
    effective_at: datetime
    credits_granted: int


class SubscriptionEnded(_Event):
    type: Literal["subscription.ended"] = "subscription.ended"
    subscription_id: int
    plan_id: int


class TopupRequested(_CreditEvent):
    """A write left `available` below an auto top-up rule's threshold: a top-up is in the
    outbox, and the relay sends it to the worker that charges the payment provider."""

    type: Literal["credits.topup_requested"] = "credits.topup_requested"
    topup_id: int
    credits: int


class TopupSucceeded(_CreditEvent):
    """The provider charged a top-up and its credits were granted."""

    type: Literal["credits.topup_succeeded"] = "credits.topup_succeeded"
    topup_id: int
    credits: int
    lot_id: int
    provider_reference: str | None


class TopupFailed(_CreditEvent):
    """The provider refused (or could not take) a top-up's charge: nothing was granted."""

    type: Literal["credits.topup_failed"] = "credits.topup_failed"
    topup_id: int
    credits: int
    error: str | None
    consecutive_failures: int


class TopupDisabled(_CreditEvent):
    """An auto top-up rule was turned off after too many failed charges in a row."""

    type: Literal["credits.topup_disabled"] = "credits.topup_disabled"
    consecutive_failures: int


class WebhookEndpointDisabled(_SystemEvent):
    """A webhook endpoint was turned off: it answered 410 Gone, or it failed for a whole
    retry schedule (docs/webhooks.md)."""

    type: Literal["webhooks.endpoint_disabled"] = "webhooks.endpoint_disabled"
    endpoint_id: int
    url: str
    reason: str


Event = Annotated[
    WebhookEndpointDisabled | CreditsLow | CreditsDepleted | CreditsRecovered | CreditsExpiring | CreditsExpired | CreditsVoided | CreditsRefunded | CreditsExpiryChanged | ReservationExpired | SubscriptionAllocated | SubscriptionChanged | SubscriptionEnded | TopupRequested | TopupSucceeded | TopupFailed | TopupDisabled,
    Field(discriminator="type"),
]

EVENT_TYPES: tuple[type[_SystemEvent], ...] = (
    CreditsLow,
    CreditsDepleted,
    CreditsRecovered,
    CreditsExpiring,
    CreditsExpired,
    CreditsVoided,
    CreditsRefunded,
    CreditsExpiryChanged,
    ReservationExpired,
    SubscriptionAllocated,
    SubscriptionChanged,
    SubscriptionEnded,
    TopupRequested,
    TopupSucceeded,
    TopupFailed,
    TopupDisabled,
    WebhookEndpointDisabled,
)
ROUTING_KEYS: tuple[str, ...] = tuple(
    str(cls.model_fields["type"].default) for cls in EVENT_TYPES
)

_EVENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(Event)


def parse_event(payload: dict[str, Any]) -> _SystemEvent:
    """Validate a received event payload into its model (raises pydantic's ValidationError)."""
    event: _SystemEvent = _EVENT_ADAPTER.validate_python(payload)
    return event


def queue_name(routing_key: str) -> str:
    """The durable queue the worker declares for each routing key, e.g. `creditworker.events.credits.low`."""
    return f"{EXCHANGE}.{routing_key}"
