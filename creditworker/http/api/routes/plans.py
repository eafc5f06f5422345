"""Subscription plans: what a period grants, and its price."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from starlette.responses import JSONResponse

from creditworker.contract.operations import (
    CREATE_PLAN,
    DELETE_PLAN,
    GET_PLAN,
    LIST_PLANS,
    UPDATE_PLAN,
)
from creditworker.contract.plans import CreatePlan
from creditworker.http.api import examples
from creditworker.http.api.backends import json_answer
from creditworker.http.api.bodies import KeyHeader, PlanChangesBody, PlanPath, fields
from creditworker.http.api.deps import Run, Wait
from creditworker.http.api.examples import body_example
from creditworker.http.api.routes import served

router = APIRouter(tags=["plans"])


@served(router, CREATE_PLAN, summary="Create a plan", example=examples.PLAN, errors=[409])
async def create_plan(
    body: Annotated[CreatePlan, body_example("1,000 credits a month for 19.90 USD", {
        "name": "pro", "credit_limit": 1000, "price": "19.90", "currency": "USD",
        "billing_period": "monthly",
    })],
    run: Run, wait: Wait, idempotency_key: KeyHeader = None,
) -> JSONResponse:
    return await run.write(CREATE_PLAN, fields(body, idempotency_key), wait)


@served(router, LIST_PLANS, summary="List plans", example=[examples.PLAN])
async def list_plans(
    run: Run,
    include_inactive: Annotated[bool, Query(description="Also deactivated plans.")] = False,
) -> JSONResponse:
    return json_answer(await run.read(LIST_PLANS, include_inactive=include_inactive))


@served(router, GET_PLAN, summary="A plan, by id or by name", example=examples.PLAN,
        errors=[404])
async def get_plan(plan: PlanPath, run: Run) -> JSONResponse:
    return json_answer(await run.read(GET_PLAN, plan))


@served(router, UPDATE_PLAN, summary="Change a plan (id or name)",
        example={**examples.PLAN, "credit_limit": 1200}, errors=[404, 409])
async def update_plan(
    plan: PlanPath,
    body: Annotated[
        PlanChangesBody, body_example("Raise the monthly grant", {"credit_limit": 1200})
    ],
    run: Run,
    wait: Wait,
    idempotency_key: KeyHeader = None,
) -> JSONResponse:
    changes = fields(body, idempotency_key, given_only=True)  # a null validity_days clears it
    return await run.write(UPDATE_PLAN, {"plan": plan, **changes}, wait)


@served(router, DELETE_PLAN,
        summary="Delete an unused plan (one in use is deactivated: 409 plan_in_use)",
        example={"deleted": "pro"}, errors=[404, 409])
async def delete_plan(plan: PlanPath, run: Run, wait: Wait) -> JSONResponse:
    return await run.write(DELETE_PLAN, {"plan": plan}, wait)
