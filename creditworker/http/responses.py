"""How every HTTP error looks: `{"error": {"code", "message", "details"}}`, the worker's shape.

The gateway and the middleware both answer through here, so a producer that understands a
task's error envelope understands an HTTP error too, and one table says which status each
stable error code gets.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import Scope

from creditworker.contract.errors import CreditError

STATUS_BY_CODE: dict[str, int] = {
    "invalid_input": 422,
    "insufficient_credits": 402,
    "unknown_user": 404,
    "unknown_plan": 404,
    "unknown_reservation": 404,
    "unknown_lot": 404,
    "unknown_entry": 404,
    "unknown_subscription": 404,
    "idempotency_conflict": 409,
    "duplicate_plan": 409,
    "plan_in_use": 409,
    "reservation_not_active": 409,
    "service_unavailable": 503,
    "invalid_webhook_url": 422,
    "unknown_event_pattern": 422,
    "unknown_webhook_endpoint": 404,
    "unknown_webhook_delivery": 404,
    "unknown_topup": 404,
    "topup_not_pending": 409,
    "payment_provider_error": 502,
}
"""Any other `CreditError` is a refused request: 400."""


class ErrorDetail(BaseModel):
    code: str = Field(examples=["insufficient_credits"])
    message: str = Field(examples=["user 'alice' has 5 credits available, 20 requested"])
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_response(
    status: int, code: str, message: str, details: dict[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": details or {}}}
    return JSONResponse(body, status_code=status, headers=headers)


def credit_error_response(exc: CreditError) -> JSONResponse:
    status = STATUS_BY_CODE.get(exc.code, 400)
    headers = {"Retry-After": "1"} if status == 503 else None
    return error_response(status, exc.code, exc.message, exc.details, headers)


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own validation errors, named like `contract.parse` names its problems."""
    problems = [
        {"field": ".".join(str(part) for part in err["loc"]) or "(root)", "problem": err["msg"]}
        for err in exc.errors()
    ]
    summary = "; ".join(f"{p['field']}: {p['problem']}" for p in problems)
    message = f"invalid request: {summary}"
    return error_response(422, "invalid_input", message, {"problems": problems})


def http_error_response(exc: HTTPException) -> JSONResponse:
    """Unknown routes, wrong methods and auth refusals, coded by their status phrase."""
    code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
    return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)


def refusal_before_body(
    scope: Scope, status: int, code: str, message: str, details: dict[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """An error answered before the request's body was read. If the request has one, the
    connection is closed after the answer: else the server would go on reading (and
    discarding) every byte the client sends, which is what the refusal was meant to spare."""
    request_headers = Headers(scope=scope)
    has_body = "transfer-encoding" in request_headers or (
        request_headers.get("content-length", "0").strip() not in ("", "0")
    )
    closing = {"Connection": "close"} if has_body else {}
    return error_response(status, code, message, details, {**(headers or {}), **closing})
