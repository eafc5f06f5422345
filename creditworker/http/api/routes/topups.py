"""Auto top-ups: an account's rule, and the top-ups it caused (issue 29)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from starlette.responses import JSONResponse

from creditworker.contract.credits import DEFAULT_CREDIT_TYPE
from creditworker.contract.operations import (
    COMPLETE_TOPUP,
    GET_AUTO_TOPUP,
    LIST_TOPUPS,
    REMOVE_AUTO_TOPUP,
    SET_AUTO_TOPUP,
)
from creditworker.contract.topups import TopupState
from creditworker.http.api import examples
from creditworker.http.api.backends import json_answer
from creditworker.http.api.bodies import (
    AutoTopupBody,
    CompleteTopupBody,
    KeyHeader,
    TopupIdPath,
    UserIdPath,
    fields,
)
from creditworker.http.api.deps import Run, Wait
from creditworker.http.api.examples import body_example
from creditworker.http.api.routes import served

router = APIRouter(tags=["top-ups"])

CreditTypeQuery = Annotated[str, Query(description="The credit type of the rule.")]


@served(router, SET_AUTO_TOPUP, summary="Set (or replace) a user's auto top-up rule", example=examples.TOPUP_RULE,
        errors=[404])
async def set_auto_topup(
    user_id: UserIdPath,
    body: Annotated[AutoTopupBody, body_example("Below 100, top up to 1,000 at 0.01 USD a credit", {
        "threshold": 100, "target": 1000, "unit_price": "0.01", "max_per_month": "50",
    })],
    run: Run, wait: Wait, idempotency_key: KeyHeader = None,
) -> JSONResponse:
    return await run.write(SET_AUTO_TOPUP, {"user_id": user_id, **fields(body, idempotency_key)}, wait)


@served(router, GET_AUTO_TOPUP, summary="A user's auto top-up rule (null: none)", example=examples.TOPUP_RULE)
async def get_auto_topup(user_id: UserIdPath, run: Run,
                         credit_type: CreditTypeQuery = DEFAULT_CREDIT_TYPE) -> JSONResponse:
    return json_answer(await run.read(GET_AUTO_TOPUP, user_id, credit_type=credit_type))


@served(router, REMOVE_AUTO_TOPUP, summary="Remove a user's auto top-up rule",
        example={"user_id": "alice", "credit_type": "credits", "removed": True})
async def remove_auto_topup(user_id: UserIdPath, run: Run, wait: Wait,
                            credit_type: CreditTypeQuery = DEFAULT_CREDIT_TYPE,
                            idempotency_key: KeyHeader = None) -> JSONResponse:
    given = {"user_id": user_id, "credit_type": credit_type, "idempotency_key": idempotency_key}
    return await run.write(REMOVE_AUTO_TOPUP, given, wait)


@served(router, LIST_TOPUPS, summary="Top-ups and their states, newest first", example=[examples.TOPUP])
async def list_topups(
    run: Run,
    user_id: Annotated[str | None, Query(description="One user's top-ups.")] = None,
    state: Annotated[TopupState | None, Query(description="Only top-ups in this state.")] = None,
    limit: Annotated[int, Query(gt=0, le=1000)] = 50,
) -> JSONResponse:
    return json_answer(await run.read(LIST_TOPUPS, user_id=user_id, state=state, limit=limit))


@served(router, COMPLETE_TOPUP, summary="Settle a pending top-up with the provider's answer (its webhook)",
        example=examples.TOPUP, errors=[404, 409])
async def complete_topup(
    topup_id: TopupIdPath,
    body: Annotated[CompleteTopupBody, body_example("The PaymentIntent succeeded", {
        "succeeded": True, "reference": "pi_3Q"})],
    run: Run, wait: Wait, idempotency_key: KeyHeader = None,
) -> JSONResponse:
    return await run.write(COMPLETE_TOPUP, {"topup_id": topup_id, **fields(body, idempotency_key)}, wait)
