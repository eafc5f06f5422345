"""Corrections: void a grant, refund a deduction, move a grant's expiry (each a new entry)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from starlette.responses import JSONResponse

from creditworker.contract.operations import CHANGE_EXPIRY, REFUND, VOID_LOT
from creditworker.http.api import examples
from creditworker.http.api.bodies import (
    EntryIdPath,
    ExpiryBody,
    KeyHeader,
    LotIdPath,
    RefundBody,
    VoidBody,
    fields,
)
from creditworker.http.api.deps import Run, Wait
from creditworker.http.api.examples import body_example
from creditworker.http.api.routes import served

router = APIRouter(tags=["corrections"])


@served(router, VOID_LOT, summary="Void what is left of a grant (or part), with a reason",
        example=examples.VOID_ENTRY, errors=[402, 404, 409])
async def void_lot(
    lot_id: LotIdPath,
    body: Annotated[VoidBody, body_example("Void 10 credits after a chargeback", {
        "reason": "chargeback", "amount": 10, "idempotency_key": "chargeback-1001",
    })],
    run: Run, wait: Wait, idempotency_key: KeyHeader = None,
) -> JSONResponse:
    return await run.write(VOID_LOT, {"lot_id": lot_id, **fields(body, idempotency_key)}, wait)


@served(router, REFUND, summary="Give back a deduction or commit (or part) to its lots",
        example=examples.REFUND_ENTRY, errors=[404, 409])
async def refund_deduction(
    entry_id: EntryIdPath,
    body: Annotated[RefundBody, body_example("Refund a failed export", {
        "reason": "failed export", "idempotency_key": "refund-export-77",
    })],
    run: Run, wait: Wait, idempotency_key: KeyHeader = None,
) -> JSONResponse:
    return await run.write(REFUND, {"entry_id": entry_id, **fields(body, idempotency_key)}, wait)


@served(router, CHANGE_EXPIRY, summary="Extend or shorten a grant (a past moment expires it now)",
        example=examples.EXPIRY_ENTRY, errors=[404, 409])
async def change_lot_expiry(
    lot_id: LotIdPath,
    body: Annotated[ExpiryBody, body_example("Extend a grant to March", {
        "expires_at": "2025-03-01T00:00:00Z", "idempotency_key": "extend-7",
    })],
    run: Run, wait: Wait, idempotency_key: KeyHeader = None,
) -> JSONResponse:
    return await run.write(CHANGE_EXPIRY, {"lot_id": lot_id, **fields(body, idempotency_key)}, wait)
