"""What the OpenAPI document shows: tags, one example per answer, and each route's errors.

Kept apart from the routes so that a route reads as the request it takes and the call it
makes; the examples are data the document needs, not behaviour.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import Body

from creditworker.http.api.bodies import TaskAccepted
from creditworker.http.body_limit import MAX_BODY_BYTES_VARIABLE
from creditworker.http.responses import ErrorBody

TAGS = [
    {"name": "credits", "description": "Grant and deduct credits, read balances and history, "
                                       "and poll operations that were queued."},
    {"name": "reservations", "description": "Hold credits before the work, then commit the "
                                            "actual amount or release the hold."},
    {"name": "corrections", "description": "Void a grant, refund a deduction, move a grant's "
                                           "expiry: each a new ledger entry."},
    {"name": "plans", "description": "Subscription plans: what a period grants, and its price."},
    {"name": "subscriptions", "description": "Which plan each user is on."},
    {"name": "alerts", "description": "Low-credit thresholds per credit type: `credits.low`, "
                                      "`credits.depleted` and `credits.recovered` events."},
]

AT = "2025-01-01T12:00:00Z"
ENTRY = {
    "id": 41, "user_id": "alice", "kind": "add", "amount": 100, "held": 0, "balance_after": 100,
    "reserved_after": 0, "available_after": 100, "lot_id": 7, "reservation_id": None,
    "draws": [], "description": "top-up", "metadata": None, "idempotency_key": "order-1001",
    "created_at": AT,
}
DEDUCT_ENTRY = {**ENTRY, "id": 42, "kind": "deduct", "amount": -30, "balance_after": 70,
                "available_after": 70, "lot_id": None, "draws": [{"lot_id": 7, "amount": 30}],
                "description": "report export", "idempotency_key": "export-77"}
RESERVATION = {
    "id": "6f1c0c8e6a5b4f0c9d2e3a4b5c6d7e8f", "user_id": "alice", "amount": 20,
    "status": "active", "expires_at": "2025-01-01T12:05:00Z", "created_at": AT,
    "committed_amount": None, "idempotency_key": "chat-123:reserve",
}
COMMIT_ENTRY = {**ENTRY, "id": 44, "kind": "commit", "amount": -12, "held": -20,
                "balance_after": 58, "available_after": 58, "lot_id": None,
                "reservation_id": RESERVATION["id"], "draws": [{"lot_id": 7, "amount": 12}],
                "description": None, "idempotency_key": "chat-123:commit"}
RELEASE_ENTRY = {**COMMIT_ENTRY, "id": 45, "kind": "release", "amount": 0,
                 "balance_after": 70, "available_after": 70, "draws": [],
                 "idempotency_key": "chat-123:release"}
VOID_ENTRY = {**ENTRY, "id": 46, "kind": "void", "amount": -10, "balance_after": 60,
              "available_after": 60, "description": None, "metadata": {"reason": "chargeback"},
              "idempotency_key": "chargeback-1001"}
REFUND_ENTRY = {**ENTRY, "id": 47, "kind": "refund", "amount": 30, "balance_after": 90,
                "available_after": 90, "lot_id": None, "draws": [{"lot_id": 7, "amount": 30}],
                "description": None, "metadata": {"reason": "failed export", "refund_of": 42},
                "idempotency_key": "refund-export-77"}
EXPIRY_ENTRY = {**ENTRY, "id": 48, "kind": "expiry_changed", "amount": 0, "description": None,
                "metadata": {"expires_at": "2025-03-01T00:00:00+00:00",
                             "previous_expires_at": "2025-01-05T00:00:00+00:00"},
                "idempotency_key": "extend-7"}
THRESHOLD = {"user_id": "alice", "credit_type": "tokens", "threshold": 5000, "percent": 10}
BALANCE = {"user_id": "alice", "total": 70, "reserved": 20, "available": 50,
           "expiring_soon": 10, "expiring_within_days": 7}
USAGE_PERIOD = {"period": "2025-01-01", "granted": 100, "consumed": 30, "expired": 0,
                "voided": 0, "refunded": 0,
                "by_kind": {"add": 100, "deduct": -30, "reserve": 0, "commit": 0}}
LOT = {"id": 7, "user_id": "alice", "amount": 100, "remaining": 10, "source": "bonus",
       "priority": 0, "expires_at": "2025-01-05T00:00:00Z", "created_at": AT}
PLAN = {"id": 3, "name": "pro", "credit_limit": 1000, "price": "19.9", "currency": "USD",
        "billing_period": "monthly", "validity_days": None, "active": True, "created_at": AT}
SUBSCRIPTION = {
    "id": 9, "user_id": "alice", "plan_id": 3, "status": "active", "anchor_at": AT,
    "period_index": 0, "current_period_start": AT, "current_period_end": "2025-02-01T12:00:00Z",
    "pending_plan_id": None, "cancel_at_period_end": False, "ended_at": None,
}
TASK = {"task_id": "2b7e1516-28ae-4d2a-a6d2-3f1c5e8b9a10"}

ERROR_DESCRIPTIONS = {
    401: "No valid API key (`unauthorized`).",
    402: "The available credits do not cover the amount (`insufficient_credits`).",
    404: "No such user, reservation, lot, ledger entry, plan or subscription (`unknown_*`).",
    409: "Idempotency key reused for another request, plan name taken, plan in use, or "
         "reservation no longer active.",
    413: f"The body is larger than {MAX_BODY_BYTES_VARIABLE} (`content_too_large`).",
    422: "Invalid input (`invalid_input`), with every problem in `details.problems`.",
    503: "The broker, the workers or the database did not answer (`service_unavailable`).",
}

ROUTER_ERRORS = {code: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[code]}
                 for code in (401, 413, 422, 503)}
"""The errors every route may answer, documented once on the router."""

Responses = dict[int | str, dict[str, Any]]


def responses(
    model: Any, example: Any, *, status: int = 200, errors: Sequence[int] = ()
) -> Responses:
    """OpenAPI responses of a route answered at once: its result (`model` None: any JSON)
    and the errors of its own beyond the router's 401, 413, 422 and 503."""
    result: dict[str, Any] = {"content": {"application/json": {"example": example}}}
    if model is not None:
        result["model"] = model
    documented: Responses = {status: result}
    for code in errors:
        documented[code] = {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[code]}
    return documented


def queued(answered: Responses, status: int) -> Responses:
    """The same responses for a route that may queue: the result only for a caller that
    waited, and 202 with the task id otherwise."""
    documented = {code: dict(answer) for code, answer in answered.items()}
    documented[status]["description"] = "The result, when the caller waited for it."
    documented[202] = {
        "model": TaskAccepted, "description": "Queued; poll GET /credits/tasks/{task_id}.",
        "content": {"application/json": {"example": TASK}},
    }
    return documented


def body_example(summary: str, value: dict[str, Any]) -> Any:
    return Body(openapi_examples={"example": {"summary": summary, "value": value}})
