"""Auto top-ups (issue 29): the rule an account sets, and the top-ups it causes.

A rule says "when `available` of this credit type drops below `threshold`, buy `amount`
credits (or enough to reach `target`)". The write that crosses the threshold puts a
`requested` top-up in the outbox in its own transaction; a task charges the payment provider
and grants only what was paid. Pydantic only, like the rest of the contract: producers
import it without the storage stack.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator

from creditworker.contract.credits import (
    DEFAULT_CREDIT_TYPE,
    MAX_WITHIN_DAYS,
    Amount,
    CreditType,
    NonNegativeAmount,
    Request,
    RowId,
    UserId,
    _Message,
)

MAX_CHARGE = 10**12
"""A top-up's cost stays below this (its column holds 12 digits before the point)."""
MAX_CONSECUTIVE_FAILURES = 3
"""Failed charges in a row after which a rule is disabled (`credits.topup_disabled`)."""

Money = Annotated[Decimal, Field(ge=0, max_digits=24, decimal_places=12, allow_inf_nan=False)]
Currency = Annotated[str, Strict(), Field(pattern=r"^[A-Z]{3}$")]
ExpiresAfterDays = Annotated[int, Strict(), Field(gt=0, le=MAX_WITHIN_DAYS)]


class TopupState(StrEnum):
    """A top-up's life: requested by the write that crossed, charging while the provider is
    asked, then succeeded (credits granted), failed (nothing granted) or pending (the
    provider answers later: `complete_topup`)."""

    REQUESTED = "requested"
    CHARGING = "charging"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    PENDING = "pending"


IN_FLIGHT_STATES: tuple[str, ...] = (TopupState.REQUESTED.value, TopupState.CHARGING.value)
"""States that block another top-up of the same account and type (one in flight)."""


class SetAutoTopup(Request):
    """Create or replace the rule of (user, credit type). Exactly one of `amount` (a fixed
    grant) or `target` (top up to that balance) is given."""

    user_id: UserId
    threshold: NonNegativeAmount
    amount: Amount | None = None
    target: Amount | None = None
    credit_type: CreditType = DEFAULT_CREDIT_TYPE
    max_per_month: Money | None = None
    """The most money charged per calendar month (UTC), in `currency`; needs `unit_price`."""
    unit_price: Money | None = None
    """The price of one credit, charged to the provider and kept as the lot's cost basis."""
    currency: Currency = "USD"
    expires_after_days: ExpiresAfterDays | None = None
    """The granted lot expires this many days after the grant (None: never)."""

    @model_validator(mode="after")
    def _one_of_amount_and_target(self) -> SetAutoTopup:
        if (self.amount is None) == (self.target is None):
            raise ValueError("give exactly one of amount (a fixed grant) and target (top up to that balance)")
        if self.target is not None and self.target <= self.threshold:
            raise ValueError("target must be above threshold")
        if self.max_per_month is not None and self.unit_price is None:
            raise ValueError("max_per_month caps money: give unit_price too")
        most = self.amount if self.amount is not None else self.target
        if self.unit_price is not None and most is not None and most * self.unit_price >= MAX_CHARGE:
            raise ValueError(f"{'amount' if self.amount is not None else 'target'} times unit_price "
                             f"must be below the maximum charge of 10^12")
        return self


class GetAutoTopup(_Message):
    user_id: UserId
    credit_type: CreditType = DEFAULT_CREDIT_TYPE


class RemoveAutoTopup(Request):
    user_id: UserId
    credit_type: CreditType = DEFAULT_CREDIT_TYPE


class ChargeTopup(_Message):
    """The worker's step for one top-up (sent by the relay and by beat's sweep)."""

    topup_id: RowId


class CompleteTopup(Request):
    """The provider's late answer to a `pending` top-up (its webhook calls this)."""

    topup_id: RowId
    succeeded: bool
    reference: Annotated[str, Strict(), Field(min_length=1, max_length=200)] | None = Field(
        default=None, description="The provider's charge id.")
    error: Annotated[str, Strict(), Field(max_length=500)] | None = Field(default=None, description="Why it failed.")


class ListTopups(_Message):
    user_id: UserId | None = None
    state: TopupState | None = None
    limit: Annotated[int, Strict(), Field(gt=0, le=1000)] = 50


class AutoTopupRule(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    user_id: str
    credit_type: str
    threshold: int
    amount: int | None
    target: int | None
    max_per_month: Decimal | None
    unit_price: Decimal | None
    currency: str
    expires_after_days: int | None
    enabled: bool
    consecutive_failures: int
    created_at: datetime
    updated_at: datetime


class Topup(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    rule_id: int
    user_id: str
    credit_type: str
    credits: int
    state: TopupState
    idempotency_key: str
    """Sent to the provider with every attempt: `topup:<user>:<rule>:<sequence>`."""
    cost: Decimal | None
    currency: str
    provider_reference: str | None
    error: str | None
    attempts: int
    lot_id: int | None
    requested_at: datetime
    updated_at: datetime


class RemovedAutoTopup(BaseModel):
    model_config = ConfigDict(frozen=True)

    user_id: str
    credit_type: str
    removed: bool

