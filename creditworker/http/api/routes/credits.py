"""Grant and deduct credits; a user's balance, history and expiring lots."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from starlette.responses import JSONResponse

from creditworker.contract.credits import (
    MAX_HISTORY_PAGE,
    MAX_WITHIN_DAYS,
    AddCredits,
    DeductCredits,
    EntryKind,
    Granularity,
)
from creditworker.contract.operations import ADD, BALANCE, DEDUCT, EXPIRING, HISTORY, USAGE
from creditworker.http.api import examples
from creditworker.http.api.backends import json_answer
from creditworker.http.api.bodies import HistoryPage, KeyHeader, UserIdPath, fields
from creditworker.http.api.deps import Run, Wait
from creditworker.http.api.examples import body_example
from creditworker.http.api.routes import served

router = APIRouter(tags=["credits"])

CreditTypeQuery = Annotated[
    str | None,
    Query(description="One credit type's figures (without it: the default type's, and `by_type`)."),
]


@served(router, ADD, summary="Grant credits to a user", example=examples.ENTRY, errors=[409])
async def add_credits(
    body: Annotated[AddCredits, body_example("100 credits from a purchase", {
        "user_id": "alice", "amount": 100, "source": "purchase", "description": "top-up",
        "idempotency_key": "order-1001",
    })],
    run: Run, wait: Wait, idempotency_key: KeyHeader = None,
) -> JSONResponse:
    return await run.write(ADD, fields(body, idempotency_key), wait)


@served(router, DEDUCT, summary="Deduct credits from a user",
        example=examples.DEDUCT_ENTRY, errors=[402, 404, 409])
async def deduct_credits(
    body: Annotated[DeductCredits, body_example("Charge 30 credits for an export", {
        "user_id": "alice", "amount": 30, "description": "report export",
        "idempotency_key": "export-77",
    })],
    run: Run, wait: Wait, idempotency_key: KeyHeader = None,
) -> JSONResponse:
    return await run.write(DEDUCT, fields(body, idempotency_key), wait)


@served(router, BALANCE, summary="A user's total, held and available credits",
        example=examples.BALANCE, errors=[404])
async def balance(
    user_id: UserIdPath,
    run: Run,
    at: Annotated[
        datetime | None,
        Query(description="The balance as it was at this moment (ISO 8601; without a zone, UTC)."),
    ] = None,
    credit_type: CreditTypeQuery = None,
) -> JSONResponse:
    return json_answer(await run.read(BALANCE, user_id, at=at, credit_type=credit_type))


@served(router, USAGE, summary="Credits granted, consumed, expired, voided, refunded per period",
        example=[examples.USAGE_PERIOD], errors=[404])
async def usage(
    run: Run,
    start: Annotated[datetime, Query(description="First moment counted (ISO 8601, UTC).")],
    end: Annotated[datetime, Query(description="First moment not counted.")],
    granularity: Annotated[Granularity, Query(description="`day` or `month`.")] = Granularity.DAY,
    user_id: Annotated[
        str | None, Query(description="One user's usage; every account's without it.")
    ] = None,
    credit_type: Annotated[str | None, Query(description="One credit type's usage (default: every type).")] = None,
) -> JSONResponse:
    return json_answer(await run.read(
        USAGE, user_id, start=start, end=end, granularity=granularity.value, credit_type=credit_type,
    ))


@served(router, HISTORY, summary="A user's ledger entries, newest first", model=HistoryPage,
        example={"entries": [examples.DEDUCT_ENTRY, examples.ENTRY], "next_before": None},
        errors=[404])
async def history(
    user_id: UserIdPath,
    run: Run,
    limit: Annotated[
        int, Query(gt=0, le=MAX_HISTORY_PAGE, description="Entries per page (at most 1000).")
    ] = 50,
    before: Annotated[
        int | None, Query(gt=0, description="Only entries with a smaller id.")
    ] = None,
    kind: Annotated[list[EntryKind] | None, Query(description="Only these kinds.")] = None,
    credit_type: CreditTypeQuery = None,
) -> JSONResponse:
    entries = await run.read(HISTORY, user_id, limit=limit, before=before, kinds=kind, credit_type=credit_type)
    next_before = entries[-1].id if entries and len(entries) == limit else None
    return json_answer(HistoryPage(entries=entries, next_before=next_before))


@served(router, EXPIRING, summary="Lots that expire soon, soonest first",
        example=[examples.LOT], errors=[404])
async def expiring(
    user_id: UserIdPath,
    run: Run,
    within_days: Annotated[
        int, Query(ge=0, le=MAX_WITHIN_DAYS, description="Horizon in days (0 to 3660).")
    ] = 7,
    credit_type: CreditTypeQuery = None,
) -> JSONResponse:
    return json_answer(await run.read(EXPIRING, user_id, within_days, credit_type=credit_type))
