"""The wire contract of plans and subscriptions (pydantic only, shared with producers)."""

from __future__ import annotations

import hashlib
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    field_validator,
    model_validator,
)
from typing_extensions import TypedDict

from creditworker.contract.credits import (
    MAX_AMOUNT,
    Request,
    UserId,
    UtcDateTime,
    _check_identifier,
    _Message,
)
from creditworker.contract.periods import BillingPeriod

PlanName = Annotated[
    str, Strict(), Field(min_length=1, max_length=100), AfterValidator(_check_identifier)
]
Currency = Annotated[str, Field(pattern=r"^[A-Z]{3}$")]
CreditLimit = Annotated[int, Strict(), Field(gt=0, le=MAX_AMOUNT)]
ValidityDays = Annotated[int, Strict(), Field(gt=0, le=3660)]
RolloverMax = Annotated[int, Strict(), Field(ge=0, le=MAX_AMOUNT)]
"""The most credits of a period's allocation that roll into the next period."""
RolloverPercent = Annotated[int, Strict(), Field(ge=0, le=100)]
"""The same limit as a percentage of the allocation (rounded down)."""
RolloverPeriods = Annotated[int, Strict(), Field(ge=1, le=1000)]
"""Rolled credits expire this many periods after the boundary they rolled at (default 1)."""
ROLLOVER_FIELDS = ("rollover_max", "rollover_max_percent", "rollover_expires_after_periods")
"""Plan fields that a null clears on update (as `validity_days`)."""


class _Rollover(_Message):
    """A plan's rollover: at most one of the two limits."""

    @model_validator(mode="after")
    def _one_limit(self) -> Self:
        if getattr(self, "rollover_max", None) is not None and getattr(self, "rollover_max_percent", None) is not None:
            raise ValueError("give rollover_max or rollover_max_percent, not both")
        return self


MAX_PRICE_EXCLUSIVE = Decimal(10) ** 14
"""The column is NUMERIC(18, 4): 14 digits before the point. `max_digits` alone lets
123456789012345.5 (16 digits) through, which the database then refuses."""


def _price(value: Decimal) -> Decimal:
    if not value.is_finite() or value < 0 or value.as_tuple().exponent < -4:  # type: ignore[operator]
        raise ValueError("must be a non-negative amount with at most 4 decimal places")
    if value >= MAX_PRICE_EXCLUSIVE:
        raise ValueError("must be less than 10^14")
    return value


Price = Annotated[Decimal, AfterValidator(_price), Field(max_digits=18, decimal_places=4)]
PlanRef = Annotated[int | PlanName, Field(union_mode="left_to_right")]
"""A plan by id or by name."""


class CreatePlan(Request, _Rollover):
    name: PlanName
    credit_limit: CreditLimit
    price: Price = Decimal(0)
    currency: Currency = "USD"
    billing_period: BillingPeriod = BillingPeriod.MONTHLY
    validity_days: ValidityDays | None = None
    active: bool = True
    rollover_max: RolloverMax | None = None
    rollover_max_percent: RolloverPercent | None = None
    rollover_expires_after_periods: RolloverPeriods | None = None


class PlanChanges(_Rollover):
    """What `update_plan` may change (the HTTP gateway takes it as the PATCH body). Setting
    one rollover limit clears the other."""

    name: PlanName | None = None
    credit_limit: CreditLimit | None = None
    price: Price | None = None
    currency: Currency | None = None
    validity_days: ValidityDays | None = None
    active: bool | None = None
    rollover_max: RolloverMax | None = None
    rollover_max_percent: RolloverPercent | None = None
    rollover_expires_after_periods: RolloverPeriods | None = None


class UpdatePlan(Request, PlanChanges):
    plan: PlanRef

    def fingerprint(self) -> str:
        """Also which fields were given: an unset `validity_days` keeps it, a null one clears it."""
        given = sorted(self.model_fields_set - self.NOT_FINGERPRINTED)
        return hashlib.sha256(f"{super().fingerprint()}:{','.join(given)}".encode()).hexdigest()


class GetPlan(_Message):
    plan: PlanRef


class DeletePlan(Request):
    plan: PlanRef


class PlanDeletion(BaseModel):
    """What a delete did, stored under its idempotency key so that a repeat answers the same."""

    plan: int | str
    deleted: bool
    active_subscriptions: int


class DeletedPlan(TypedDict):
    """The wire result of a delete (a plan in use answers the `plan_in_use` error)."""

    deleted: int | str


class ListPlans(_Message):
    include_inactive: bool = False


class GetSubscription(_Message):
    user_id: UserId


class AllocateSubscriptions(_Message):
    """One chunk of due subscriptions, as the beat fan-out sends it."""

    subscription_ids: Annotated[list[Annotated[int, Strict(), Field(gt=0)]], Field(min_length=1, max_length=1000)]


class AssignPlan(Request):
    user_id: UserId
    plan: PlanRef
    start_at: UtcDateTime | None = None


class ChangePlan(Request):
    user_id: UserId
    plan: PlanRef


class RemovePlan(Request):
    user_id: UserId
    at_period_end: bool = True


class Plan(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    name: str
    credit_limit: int
    price: Decimal
    currency: str
    billing_period: BillingPeriod
    validity_days: int | None
    active: bool
    created_at: datetime
    rollover_max: int | None = None
    rollover_max_percent: int | None = None
    rollover_expires_after_periods: int | None = None

    @field_validator("price")
    @classmethod
    def _four_places(cls, price: Decimal) -> Decimal:
        """The price as stored (4 decimal places), however it was written."""
        return price.quantize(Decimal("0.0001"))


class Subscription(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    user_id: str
    plan_id: int
    status: str
    anchor_at: datetime
    period_index: int
    current_period_start: datetime
    current_period_end: datetime
    pending_plan_id: int | None
    cancel_at_period_end: bool
    ended_at: datetime | None
