"""The plans: list them with their subscriber counts, create one, edit one."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from creditworker.contract.periods import BillingPeriod
from creditworker.http.console import forms, queries
from creditworker.http.console.deps import ConsoleDep
from creditworker.http.console.pages import DONE, redirect
from creditworker.http.console.routes import log_action

router = APIRouter(prefix="/plans")


@router.get("")
async def plans_page(request: Request, console: ConsoleDep, done: str = "") -> Response:
    plans = await run_in_threadpool(console.subscriptions.list_plans, include_inactive=True)
    counts = await run_in_threadpool(queries.subscriber_counts, console.engine)
    return console.pages.render(
        request, "plans.html", plans=plans, counts=counts, done=DONE.get(done),
        periods=[period.value for period in BillingPeriod],
    )


@router.post("")
async def create_plan(request: Request, console: ConsoleDep) -> Response:
    fields = await forms.posted_form(request)
    reason = forms.reason(fields)
    name = forms.text(fields, "name")
    await run_in_threadpool(
        console.subscriptions.create_plan, name, forms.integer(fields, "credit_limit"),
        price=forms.price(fields), currency=forms.text(fields, "currency").upper(),
        billing_period=forms.text(fields, "billing_period"),
        validity_days=forms.optional_integer(fields, "validity_days"),
        **rollover(fields),
        idempotency_key=forms.idempotency_key(fields, "create-plan"),
    )
    log_action(request, "create plan", name, reason)
    return redirect(request, "/plans", done="plan-created")


@router.get("/edit")
async def edit_plan_page(request: Request, console: ConsoleDep, plan: str) -> Response:
    found = await run_in_threadpool(console.subscriptions.get_plan, forms.plan_ref(plan))
    return console.pages.render(request, "plan_edit.html", plan=found)


@router.post("/edit")
async def edit_plan(request: Request, console: ConsoleDep) -> Response:
    fields = await forms.posted_form(request)
    reason = forms.reason(fields)
    plan = forms.plan_ref(forms.text(fields, "plan"))
    validity = forms.optional_integer(fields, "validity_days")
    # Setting values is idempotent by nature: a second submit sets the same values.
    changes: dict[str, Any] = {
        "name": forms.text(fields, "name"), "credit_limit": forms.integer(fields, "credit_limit"),
        "price": forms.price(fields), "currency": forms.text(fields, "currency").upper(),
        "active": fields.get("active") == "on",
    }
    if validity is not None:
        changes["validity_days"] = validity
    changes.update(rollover(fields))  # an empty rollover field clears it
    await run_in_threadpool(lambda: console.subscriptions.update_plan(plan, **changes))
    log_action(request, "update plan", str(plan), reason)
    return redirect(request, "/plans", done="plan-updated")


def rollover(fields: dict[str, str]) -> dict[str, int | None]:
    """The plan form's rollover fields (engine/rollover.py); empty is none."""
    return {name: forms.optional_integer(fields, name)
            for name in ("rollover_max", "rollover_max_percent", "rollover_expires_after_periods")}
