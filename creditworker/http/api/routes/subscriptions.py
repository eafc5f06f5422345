"""Which plan each user is on."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from starlette.responses import JSONResponse

from creditworker.contract.operations import (
    ASSIGN_PLAN,
    CHANGE_PLAN,
    GET_SUBSCRIPTION,
    REMOVE_PLAN,
)
from creditworker.http.api import examples
from creditworker.http.api.backends import json_answer
from creditworker.http.api.bodies import AssignBody, ChangeBody, KeyHeader, UserIdPath, fields
from creditworker.http.api.deps import Run, Wait
from creditworker.http.api.examples import body_example
from creditworker.http.api.routes import served

router = APIRouter(tags=["subscriptions"])


@served(router, ASSIGN_PLAN, summary="Put a user on a plan", example=examples.SUBSCRIPTION,
        errors=[404, 409])
async def assign_plan(
    user_id: UserIdPath,
    body: Annotated[AssignBody, body_example("Start the pro plan now", {"plan": "pro"})],
    run: Run, wait: Wait, idempotency_key: KeyHeader = None,
) -> JSONResponse:
    given = fields(body, idempotency_key)
    return await run.write(ASSIGN_PLAN, {"user_id": user_id, **given}, wait)


@served(router, CHANGE_PLAN,
        summary="Move a user to another plan (upgrade now, downgrade at period end)",
        example={**examples.SUBSCRIPTION, "pending_plan_id": 2}, errors=[404, 409])
async def change_plan(
    user_id: UserIdPath,
    body: Annotated[ChangeBody, body_example("Downgrade to basic", {"plan": "basic"})],
    run: Run, wait: Wait, idempotency_key: KeyHeader = None,
) -> JSONResponse:
    given = fields(body, idempotency_key)
    return await run.write(CHANGE_PLAN, {"user_id": user_id, **given}, wait)


@served(router, REMOVE_PLAN,
        summary="End a user's subscription (at the end of the period by default)",
        example={**examples.SUBSCRIPTION, "cancel_at_period_end": True}, errors=[404, 409])
async def remove_plan(
    user_id: UserIdPath,
    run: Run,
    wait: Wait,
    at_period_end: Annotated[bool, Query(description="false: end it now.")] = True,
    idempotency_key: KeyHeader = None,
) -> JSONResponse:
    given = {"user_id": user_id, "at_period_end": at_period_end,
             "idempotency_key": idempotency_key}
    return await run.write(REMOVE_PLAN, given, wait)


@served(router, GET_SUBSCRIPTION, summary="A user's active subscription",
        example=examples.SUBSCRIPTION, errors=[404])
async def get_subscription(user_id: UserIdPath, run: Run) -> JSONResponse:
    return json_answer(await run.read(GET_SUBSCRIPTION, user_id))
