"""What a `/credits` request carries beyond the contract's own requests, and what the
gateway answers of its own.

Bodies are the part of a contract request that is not in the URL, derived from the contract's
requests (`body_of`), so the gateway refuses exactly what the workers refuse. Path parameters carry
the contract's types too, so a bad one is refused here, named by where it is
(`path.user_id`). User ids and plan names may contain `/`: they take the rest of the path,
so `a%2Fb` and `a/b` both name the user `a/b`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Header, Path
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model

from creditworker.contract.credits import (
    ChangeLotExpiry,
    CommitReservation,
    IdempotencyKey,
    LedgerEntry,
    RefundDeduction,
    ReleaseReservation,
    ReservationId,
    SetLowCreditThreshold,
    UserId,
    VoidLot,
)
from creditworker.contract.errors import ValidationFailed
from creditworker.contract.plans import AssignPlan, ChangePlan, PlanChanges, PlanName, UpdatePlan
from creditworker.contract.topups import CompleteTopup, SetAutoTopup


class _Body(BaseModel):
    """The part of a contract request that is not in the URL, with the contract's types."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def body_of(request: type[BaseModel], *in_path: str, name: str, doc: str | None = None) -> type[_Body]:
    """`request` without the fields its URL carries: the same fields, types, defaults and
    descriptions (derived, so that a contract change reaches the gateway as it is). The
    request's own cross-field checks run when the gateway builds it from body and path."""
    missing = set(in_path) - set(request.model_fields)
    if missing:
        raise ValueError(f"{request.__name__} has no fields {sorted(missing)}")
    fields: dict[str, Any] = {
        field: (info.annotation, info) for field, info in request.model_fields.items() if field not in in_path
    }
    return create_model(name, __base__=_Body, __doc__=doc, __module__=__name__, **fields)


CommitBody = body_of(CommitReservation, "reservation_id", name="CommitBody")
ReleaseBody = body_of(ReleaseReservation, "reservation_id", name="ReleaseBody")
VoidBody = body_of(VoidLot, "lot_id", name="VoidBody")
RefundBody = body_of(RefundDeduction, "entry_id", name="RefundBody")
ExpiryBody = body_of(ChangeLotExpiry, "lot_id", name="ExpiryBody")
AssignBody = body_of(AssignPlan, "user_id", name="AssignBody")
ChangeBody = body_of(ChangePlan, "user_id", name="ChangeBody")
ThresholdBody = body_of(
    SetLowCreditThreshold, "user_id", name="ThresholdBody",
    doc="Neither `threshold` nor `percent`: back to the service default (the default type) or no"
        " `credits.low` (another type).")
AutoTopupBody = body_of(SetAutoTopup, "user_id", name="AutoTopupBody",
                        doc="`SetAutoTopup` without the user (in the path): exactly one of `amount` and `target`.")
CompleteTopupBody = body_of(CompleteTopup, "topup_id", name="CompleteTopupBody")
PlanChangesBody = body_of(UpdatePlan, "plan", name="PlanChangesBody", doc=PlanChanges.__doc__)


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
TopupIdPath = Annotated[int, Path(gt=0, le=2**63 - 1, description="A top-up id (`list_topups`).")]


def fields(body: BaseModel, key_header: str | None, *, given_only: bool = False) -> dict[str, Any]:
    """The body's fields for the operation, with the Idempotency-Key header as its key;
    `given_only`: only those the body names (a change where null clears and absent keeps)."""
    given = body.model_dump(exclude_unset=given_only)
    body_key = given.get("idempotency_key")
    if key_header is not None and body_key is not None and key_header != body_key:
        raise ValidationFailed(
            "the Idempotency-Key header and the body's idempotency_key differ",
            header=key_header, body=body_key,
        )
    given["idempotency_key"] = key_header if key_header is not None else body_key
    return given
