"""An account's auto top-up rules from the account page: set (or replace) one, remove one.

Both go through the engine's `set_auto_topup` / `remove_auto_topup` with an idempotency key
from the form's token, so a form sent twice acts once. No reason is asked: the rule itself
is what the operator means, and the engine keeps no reason for it (the action is logged).
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from creditworker.contract.credits import DEFAULT_CREDIT_TYPE
from creditworker.http.console import forms
from creditworker.http.console.deps import ConsoleDep
from creditworker.http.console.pages import redirect
from creditworker.http.console.routes import log_action

router = APIRouter(prefix="/actions/topup")


@router.post("/set")
async def set_rule(request: Request, console: ConsoleDep) -> Response:
    fields = await forms.posted_form(request)
    user_id = forms.text(fields, "user_id")
    credit_type = forms.text(fields, "credit_type", required=False) or DEFAULT_CREDIT_TYPE
    # Prices stay text: the engine reads them as Decimal and refuses what is not one.
    rule = await run_in_threadpool(
        console.credits.set_auto_topup, user_id,
        threshold=forms.integer(fields, "threshold"),
        amount=forms.optional_integer(fields, "amount"),
        target=forms.optional_integer(fields, "target"),
        credit_type=credit_type,
        unit_price=forms.text(fields, "unit_price", required=False) or None,
        currency=(forms.text(fields, "currency", required=False) or "USD").upper(),
        max_per_month=forms.text(fields, "max_per_month", required=False) or None,
        expires_after_days=forms.optional_integer(fields, "expires_after_days"),
        idempotency_key=forms.idempotency_key(fields, "topup-set"),
    )
    wanted = f"{rule.amount} credits" if rule.amount is not None else f"up to {rule.target}"
    log_action(request, f"auto top-up of {credit_type}: below {rule.threshold}, buy {wanted}", user_id, "")
    return redirect(request, "/account", user_id=user_id, done="topup-set")


@router.post("/remove")
async def remove_rule(request: Request, console: ConsoleDep) -> Response:
    fields = await forms.posted_form(request)
    user_id = forms.text(fields, "user_id")
    credit_type = forms.text(fields, "credit_type", required=False) or DEFAULT_CREDIT_TYPE
    await run_in_threadpool(
        console.credits.remove_auto_topup, user_id, credit_type=credit_type,
        idempotency_key=forms.idempotency_key(fields, "topup-remove"),
    )
    log_action(request, f"auto top-up of {credit_type} removed", user_id, "")
    return redirect(request, "/account", user_id=user_id, done="topup-remove")
