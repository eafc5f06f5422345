"""Corrections from the account page: void a grant, refund a charge, move a grant's expiry.

Each is the engine's correction (a new ledger entry, never an edit), with a required reason
(kept in the entry, and in the console's log for an expiry change, whose entry has no room
for one), on the account of the lot or entry named (whatever page the form was on), and an idempotency key from the
form's token, so a form sent twice corrects once.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from creditworker.contract.credits import LedgerEntry
from creditworker.http.console import forms
from creditworker.http.console.deps import ConsoleDep
from creditworker.http.console.pages import Refused, redirect
from creditworker.http.console.routes import log_action

router = APIRouter(prefix="/actions")


@router.post("/void")
async def void(request: Request, console: ConsoleDep) -> Response:
    return await _take_back(request, console.credits.void_lot, "lot_id", "void")


@router.post("/refund")
async def refund(request: Request, console: ConsoleDep) -> Response:
    return await _take_back(request, console.credits.refund_deduction, "entry_id", "refund")


async def _take_back(request: Request, correction: Callable[..., LedgerEntry], id_field: str, done: str) -> Response:
    """A void (of a lot) or a refund (of an entry): all of it, or `amount` of it."""
    fields = await forms.posted_form(request)
    reason = forms.reason(fields)
    target = forms.integer(fields, id_field)
    amount = forms.optional_integer(fields, "amount")
    entry = await run_in_threadpool(
        correction, target, amount=amount, reason=reason, idempotency_key=forms.idempotency_key(fields, done),
    )
    whole = "all" if amount is None else amount
    log_action(request, f"{done} {id_field.removesuffix('_id')} {target} ({whole})", entry.user_id, reason)
    return redirect(request, "/account", user_id=entry.user_id, done=done)


@router.post("/expiry")
async def expiry(request: Request, console: ConsoleDep) -> Response:
    fields = await forms.posted_form(request)
    reason = forms.reason(fields)
    lot_id = forms.integer(fields, "lot_id")
    expires_at = forms.moment(forms.text(fields, "expires_at"))
    if expires_at is None:
        raise Refused(422, "expires at is required")
    entry = await run_in_threadpool(
        console.credits.change_lot_expiry, lot_id, expires_at,
        idempotency_key=forms.idempotency_key(fields, "expiry"),
    )
    log_action(request, f"expiry of lot {lot_id} to {expires_at.isoformat()}", entry.user_id, reason)
    return redirect(request, "/account", user_id=entry.user_id, done="expiry")
