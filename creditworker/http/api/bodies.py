"""What a `/credits` request carries beyond the contract's own requests, and what the
gateway answers of its own.

Bodies are the part of a contract request that is not in the URL, built from the contract's
field types, so the gateway refuses exactly what the workers refuse. Path parameters carry
the contract's types too, so a bad one is refused here, named by where it is
(`path.user_id`). User ids and plan names may contain `/`: they take the rest of the path,
so `a%2Fb` and `a/b` both name the user `a/b`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Header, Path
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from creditworker.contract.credits import (
    DEFAULT_CREDIT_TYPE,
    Amount,
    CreditType,
    Description,
    IdempotencyKey,
    LedgerEntry,
    LowThreshold,
    Metadata,
    NonNegativeAmount,
    Reason,
    ReservationId,
    ThresholdPercent,
    UserId,
    UtcDateTime,
)
from creditworker.contract.errors import ValidationFailed
from creditworker.contract.plans import PlanName, PlanRef


class _Body(BaseModel):
    """The part of a contract request that is not in the URL, with the contract's types."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class CommitBody(_Body):
    amount: NonNegativeAmount | None = Field(
        default=None, description="Credits to charge; omitted: the amount held."
    )
    description: Description | None = None
    metadata: Metadata | None = None
    idempotency_key: IdempotencyKey | None = None


class ReleaseBody(_Body):
    idempotency_key: IdempotencyKey | None = None


class VoidBody(_Body):
    reason: Reason
    amount: Amount | None = Field(default=None, description="Credits to void; omitted: all that is left.")
    idempotency_key: IdempotencyKey | None = None


class RefundBody(_Body):
    reason: Reason
    amount: Amount | None = Field(default=None, description="Credits to give back; omitted: all that is left.")
    idempotency_key: IdempotencyKey | None = None


class ExpiryBody(_Body):
    expires_at: UtcDateTime
    idempotency_key: IdempotencyKey | None = None


class AssignBody(_Body):
    plan: PlanRef
    start_at: UtcDateTime | None = None
    idempotency_key: IdempotencyKey | None = None


class ChangeBody(_Body):
    plan: PlanRef
    idempotency_key: IdempotencyKey | None = None


class ThresholdBody(_Body):
    """Neither `threshold` nor `percent`: back to the service default (the default type) or
    no `credits.low` (another type)."""

    threshold: LowThreshold | None = None
    percent: ThresholdPercent | None = None
    credit_type: CreditType = DEFAULT_CREDIT_TYPE
    idempotency_key: IdempotencyKey | None = None


class TaskAccepted(BaseModel):
    task_id: str = Field(description="Poll GET /credits/tasks/{task_id} for the outcome.")


class HistoryPage(BaseModel):
    entries: list[LedgerEntry]
    next_before: int | None = Field(
        description="Pass as `before` for the next page; null when this page came back short."
    )


def _ascii_only(value: str) -> str:
    """HTTP leaves the encoding of other header bytes open (clients send UTF-8 or latin-1),
    so a non-ASCII key could not be told apart from another key."""
    if not value.isascii():
        raise ValueError(
            "must be ASCII; send a key with other characters as the body's idempotency_key"
        )
    return value


KeyHeader = Annotated[
    Annotated[IdempotencyKey, AfterValidator(_ascii_only)] | None,
    Header(alias="Idempotency-Key", description="The operation's idempotency key (ASCII): a "
                                                "repeat returns the first result and changes "
                                                "nothing."),
]
UserIdPath = Annotated[UserId, Path(description="A user id, percent-encoded (`/` as `%2F`).")]
ReservationIdPath = Annotated[ReservationId, Path()]
LotIdPath = Annotated[int, Path(gt=0, le=2**63 - 1, description="A lot (grant) id: `lot_id` of its `add` entry.")]
EntryIdPath = Annotated[int, Path(gt=0, le=2**63 - 1, description="A ledger entry id (a deduct or commit).")]
PlanPath = Annotated[PlanName, Path(description="A plan id or name, percent-encoded.")]


def fields(body: BaseModel, key_header: str | None) -> dict[str, Any]:
    """The body's fields for the operation, with the Idempotency-Key header as its key."""
    given = body.model_dump()
    body_key = given.get("idempotency_key")
    if key_header is not None and body_key is not None and key_header != body_key:
        raise ValidationFailed(
            "the Idempotency-Key header and the body's idempotency_key differ",
            header=key_header, body=body_key,
        )
    given["idempotency_key"] = key_header if key_header is not None else body_key
    return given
