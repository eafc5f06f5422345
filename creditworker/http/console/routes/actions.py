"""An operator's changes to one account: grant, adjust, release a hold, set the low-credit
threshold, assign or change a plan. Each needs a reason, and each redirects to the account."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from creditworker.contract.credits import DEFAULT_CREDIT_TYPE
from creditworker.http.console import forms
from creditworker.http.console.deps import ConsoleDep
from creditworker.http.console.pages import Refused, redirect
from creditworker.http.console.routes import log_action

router = APIRouter(prefix="/actions")

SOURCES = ("purchase", "bonus", "adjustment")


@router.post("/grant")
async def grant(request: Request, console: ConsoleDep) -> Response:
    fields = await forms.posted_form(request)
    user_id, reason = forms.text(fields, "user_id"), forms.reason(fields)
    amount = forms.integer(fields, "amount")
    source = fields.get("source") or "purchase"
    if source not in SOURCES:
        raise Refused(422, f"unknown source {source!r}")
    credit_type = forms.text(fields, "credit_type", required=False) or DEFAULT_CREDIT_TYPE
    await run_in_threadpool(
        console.credits.add_credits, user_id, amount,
        expires_at=forms.moment(fields.get("expires_at", "").strip()),
        priority=forms.optional_integer(fields, "priority"), source=source, credit_type=credit_type,
        description=reason, metadata=forms.metadata(request, reason),
        idempotency_key=forms.idempotency_key(fields, "grant"),
    )
    log_action(request, f"grant {amount}" + ("" if credit_type == DEFAULT_CREDIT_TYPE else f" of {credit_type}"),
               user_id, reason)
    return redirect(request, "/account", user_id=user_id, done="grant")


@router.post("/adjust")
async def adjust(request: Request, console: ConsoleDep) -> Response:
    fields = await forms.posted_form(request)
    user_id, reason = forms.text(fields, "user_id"), forms.reason(fields)
    delta = forms.integer(fields, "amount")
    key = forms.idempotency_key(fields, "adjust")
    if not delta:
        raise Refused(422, "the adjustment must not be zero")
    if delta > 0:
        await run_in_threadpool(
            console.credits.add_credits, user_id, delta, source="adjustment",
            description=reason, metadata=forms.metadata(request, reason), idempotency_key=key,
        )
    else:
        await run_in_threadpool(
            console.credits.deduct_credits, user_id, -delta, description=reason,
            metadata=forms.metadata(request, reason), idempotency_key=key,
        )
    log_action(request, f"adjust {delta:+}", user_id, reason)
    return redirect(request, "/account", user_id=user_id, done="adjust")


@router.post("/release")
async def release(request: Request, console: ConsoleDep) -> Response:
    fields = await forms.posted_form(request)
    user_id, reason = forms.text(fields, "user_id"), forms.reason(fields)
    reservation_id = forms.text(fields, "reservation_id")
    await run_in_threadpool(
        console.credits.release_reservation, reservation_id,
        idempotency_key=forms.idempotency_key(fields, "release"),
    )
    log_action(request, f"release {reservation_id}", user_id, reason)
    return redirect(request, "/account", user_id=user_id, done="release")


@router.post("/threshold")
async def threshold(request: Request, console: ConsoleDep) -> Response:
    fields = await forms.posted_form(request)
    user_id, reason = forms.text(fields, "user_id"), forms.reason(fields)
    value = forms.optional_integer(fields, "threshold")
    percent = forms.optional_integer(fields, "percent")
    credit_type = forms.text(fields, "credit_type", required=False) or DEFAULT_CREDIT_TYPE
    if value is not None and percent is not None:
        raise Refused(422, "give a threshold in credits or a percentage of the last grant, not both")
    # Setting a value is idempotent by nature: a second submit sets the same value.
    await run_in_threadpool(console.credits.set_low_credit_threshold, user_id, value, percent=percent,
                            credit_type=credit_type)
    shown = f"{percent}% of the last grant" if percent is not None else str(value)
    log_action(request, f"threshold {shown}" + ("" if credit_type == DEFAULT_CREDIT_TYPE else f" of {credit_type}"),
               user_id, reason)
    return redirect(request, "/account", user_id=user_id, done="threshold")


@router.post("/plan")
async def set_plan(request: Request, console: ConsoleDep) -> Response:
    fields = await forms.posted_form(request)
    user_id, reason = forms.text(fields, "user_id"), forms.reason(fields)
    plan = forms.plan_ref(forms.text(fields, "plan"))
    key = forms.idempotency_key(fields, "plan")
    # Assign or change was decided when the form was drawn, so a second submit repeats
    # the same operation with the same key instead of turning into a change.
    subscriptions = console.subscriptions
    if fields.get("operation") == "change":
        await run_in_threadpool(subscriptions.change_plan, user_id, plan, idempotency_key=key)
    else:
        await run_in_threadpool(subscriptions.assign_plan, user_id, plan, idempotency_key=key)
    log_action(request, f"plan {plan}", user_id, reason)
    return redirect(request, "/account", user_id=user_id, done="plan")
