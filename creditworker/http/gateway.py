"""The HTTP gateway: writes go to the workers through the producer, reads come from the database.

Each route turns a request into one producer call or one engine read. Bodies are the
contract's models (or thin ones built from its field types), so the gateway refuses exactly
what the workers refuse. Writes answer 202 with a task id unless the caller asks to wait
(`?wait=true`, or `Prefer: wait=N` for up to N seconds); a reservation always waits, since
the caller needs its id. Reads run in the thread pool, so the event loop never blocks.
In the standalone app the API key is checked, then the body's size, before FastAPI reads a
body (see auth.py and body_limit.py).
"""

import math
import uuid
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from celery.result import AsyncResult
from fastapi import APIRouter, Body, Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import to_jsonable_python
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from creditworker import __version__
from creditworker.contract import (
    MAX_HISTORY_PAGE,
    MAX_WITHIN_DAYS,
    AddCredits,
    CreditLot,
    CreditsInfo,
    DeductCredits,
    Description,
    EntryKind,
    IdempotencyKey,
    LedgerEntry,
    Metadata,
    NonNegativeAmount,
    Reservation,
    ReservationId,
    ReserveCredits,
    UserId,
    UtcDateTime,
)
from creditworker.engine import CreditService, SubscriptionService
from creditworker.errors import CreditError, ServiceUnavailable, ValidationFailed
from creditworker.http.auth import (
    ApiKeyCheck,
    ApiKeyGuard,
    AuthDependency,
    api_key_auth,
    configured_api_keys,
)
from creditworker.http.body_limit import MAX_BODY_BYTES_VARIABLE, BodyLimit
from creditworker.http.console import create_console
from creditworker.http.responses import (
    ErrorBody,
    credit_error_response,
    error_response,
    http_error_response,
    validation_error_response,
)
from creditworker.plans_contract import (
    CreatePlan,
    Plan,
    PlanChanges,
    PlanName,
    PlanRef,
    Subscription,
)
from creditworker.settings import Settings, get_settings
from creditworker.storage.database import is_transient
from producers.aio import AsyncCreditClient, AsyncTaskHandle
from producers.client import DEFAULT_TIMEOUT, unwrap

MAX_WAIT_SECONDS = 60.0
"""The longest `Prefer: wait=N` honoured; a longer wait is cut to this."""

TAGS = [
    {"name": "credits", "description": "Grant and deduct credits, read balances and history, "
                                       "and poll operations that were queued."},
    {"name": "reservations", "description": "Hold credits before the work, then commit the "
                                            "actual amount or release the hold."},
    {"name": "plans", "description": "Subscription plans: what a period grants, and its price."},
    {"name": "subscriptions", "description": "Which plan each user is on."},
]


# ------------------------------------------------------------------ bodies and answers


class _Body(BaseModel):
    """The part of a contract request that is not in the URL, with the contract's types."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class CommitBody(_Body):
    amount: NonNegativeAmount | None = Field(
        default=None, description="Credits to charge; omitted: the amount held."
    )
    description: Description | None = None
    metadata: Metadata | None = None
    idempotency_key: IdempotencyKey | None = None


class ReleaseBody(_Body):
    idempotency_key: IdempotencyKey | None = None


class AssignBody(_Body):
    plan: PlanRef
    start_at: UtcDateTime | None = None
    idempotency_key: IdempotencyKey | None = None


class ChangeBody(_Body):
    plan: PlanRef
    idempotency_key: IdempotencyKey | None = None


class TaskAccepted(BaseModel):
    task_id: str = Field(description="Poll GET /credits/tasks/{task_id} for the outcome.")


class HistoryPage(BaseModel):
    entries: list[LedgerEntry]
    next_before: int | None = Field(
        description="Pass as `before` for the next page; null when this page came back short."
    )


def _wait_seconds(
    wait: Annotated[bool, Query(description="Wait (up to 10 s) for the result, not 202.")] = False,
    prefer: Annotated[
        str | None, Header(alias="Prefer", description="`wait=N`: wait up to N s (RFC 7240).")
    ] = None,
) -> float | None:
    """How long the caller waits for a write's result; None answers 202 at once."""
    for preference in (prefer or "").split(","):
        name, _, value = preference.split(";")[0].partition("=")
        if name.strip().lower() != "wait":
            continue
        try:
            seconds = float(value.strip().strip('"'))
        except ValueError:
            continue  # RFC 7240: a preference that cannot be understood is ignored
        if math.isfinite(seconds) and seconds > 0:
            return min(seconds, MAX_WAIT_SECONDS)
    return DEFAULT_TIMEOUT if wait else None


def _ascii_only(value: str) -> str:
    """HTTP leaves the encoding of other header bytes open (clients send UTF-8 or latin-1),
    so a non-ASCII key could not be told apart from another key."""
    if not value.isascii():
        raise ValueError(
            "must be ASCII; send a key with other characters as the body's idempotency_key"
        )
    return value


Wait = Annotated[float | None, Depends(_wait_seconds)]
KeyHeader = Annotated[
    Annotated[IdempotencyKey, AfterValidator(_ascii_only)] | None,
    Header(alias="Idempotency-Key", description="The operation's idempotency key (ASCII): a "
                                                "repeat returns the first result and changes "
                                                "nothing."),
]

# Path parameters carry the contract's types, so a bad one is refused here, named by where it
# is (`path.user_id`). User ids and plan names may contain `/`: they take the rest of the path,
# so `a%2Fb` and `a/b` both name the user `a/b`.
UserIdPath = Annotated[UserId, Path(description="A user id, percent-encoded (`/` as `%2F`).")]
ReservationIdPath = Annotated[ReservationId, Path()]
PlanPath = Annotated[PlanName, Path(description="A plan id or name, percent-encoded.")]


def _fields(body: BaseModel, key_header: str | None) -> dict[str, Any]:
    """The body's fields for the producer, with the Idempotency-Key header as its key."""
    fields = body.model_dump()
    body_key = fields.get("idempotency_key")
    if key_header is not None and body_key is not None and key_header != body_key:
        raise ValidationFailed(
            "the Idempotency-Key header and the body's idempotency_key differ",
            header=key_header, body=body_key,
        )
    fields["idempotency_key"] = key_header if key_header is not None else body_key
    return fields


def _json(value: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(to_jsonable_python(value), status_code=status)


async def _answer(
    handle: AsyncTaskHandle[Any], wait: float | None, status: int = 200
) -> JSONResponse:
    """202 with the task id, or the result once the worker answered."""
    if wait is None:
        return _json(TaskAccepted(task_id=handle.task_id), 202)
    return _json(await handle.get(wait), status)


def _task_outcome(app_result: AsyncResult) -> tuple[bool, Any]:
    """(finished, result) of a task; raises its typed error. An unknown id stays pending."""
    try:
        if not app_result.ready():
            return False, None
        failed, envelope = app_result.failed(), app_result.result
    except Exception as exc:  # the result backend did not answer
        raise ServiceUnavailable(f"the result backend did not answer: {exc!r}") from exc
    if failed:
        raise ServiceUnavailable(f"task {app_result.id} failed", task_id=app_result.id)
    return True, unwrap(envelope, lambda result: result)


class _EnvelopeRoute(APIRoute):
    """Errors leave every route in the worker's envelope, also when a host app includes it."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handle = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handle(request)
            except CreditError as exc:
                return credit_error_response(exc)
            except RequestValidationError as exc:
                return validation_error_response(exc)
            except HTTPException as exc:
                return http_error_response(exc)
            except DBAPIError as exc:
                if not is_transient(exc):
                    raise
                return credit_error_response(ServiceUnavailable(
                    f"the database did not answer: {type(exc.orig).__name__}"
                ))

        return answer


# ------------------------------------------------------------------ OpenAPI examples

_AT = "2025-01-01T12:00:00Z"
_ENTRY = {
    "id": 41, "user_id": "alice", "kind": "add", "amount": 100, "held": 0, "balance_after": 100,
    "reserved_after": 0, "available_after": 100, "lot_id": 7, "reservation_id": None,
    "draws": [], "description": "top-up", "metadata": None, "idempotency_key": "order-1001",
    "created_at": _AT,
}
_DEDUCT_ENTRY = {**_ENTRY, "id": 42, "kind": "deduct", "amount": -30, "balance_after": 70,
                 "available_after": 70, "lot_id": None, "draws": [{"lot_id": 7, "amount": 30}],
                 "description": "report export", "idempotency_key": "export-77"}
_RESERVATION = {
    "id": "6f1c0c8e6a5b4f0c9d2e3a4b5c6d7e8f", "user_id": "alice", "amount": 20,
    "status": "active", "expires_at": "2025-01-01T12:05:00Z", "created_at": _AT,
    "committed_amount": None, "idempotency_key": "chat-123:reserve",
}
_COMMIT_ENTRY = {**_ENTRY, "id": 44, "kind": "commit", "amount": -12, "held": -20,
                 "balance_after": 58, "available_after": 58, "lot_id": None,
                 "reservation_id": _RESERVATION["id"], "draws": [{"lot_id": 7, "amount": 12}],
                 "description": None, "idempotency_key": "chat-123:commit"}
_RELEASE_ENTRY = {**_COMMIT_ENTRY, "id": 45, "kind": "release", "amount": 0,
                  "balance_after": 70, "available_after": 70, "draws": [],
                  "idempotency_key": "chat-123:release"}
_BALANCE = {"user_id": "alice", "total": 70, "reserved": 20, "available": 50,
            "expiring_soon": 10, "expiring_within_days": 7}
_LOT = {"id": 7, "user_id": "alice", "amount": 100, "remaining": 10, "source": "bonus",
        "priority": 0, "expires_at": "2025-01-05T00:00:00Z", "created_at": _AT}
_PLAN = {"id": 3, "name": "pro", "credit_limit": 1000, "price": "19.9", "currency": "USD",
         "billing_period": "monthly", "validity_days": None, "active": True, "created_at": _AT}
_SUBSCRIPTION = {
    "id": 9, "user_id": "alice", "plan_id": 3, "status": "active", "anchor_at": _AT,
    "period_index": 0, "current_period_start": _AT, "current_period_end": "2025-02-01T12:00:00Z",
    "pending_plan_id": None, "cancel_at_period_end": False, "ended_at": None,
}
_TASK = {"task_id": "2b7e1516-28ae-4d2a-a6d2-3f1c5e8b9a10"}

_ERROR_DESCRIPTIONS = {
    401: "No valid API key (`unauthorized`).",
    402: "The available credits do not cover the amount (`insufficient_credits`).",
    404: "No such user, reservation, plan or subscription (`unknown_*`).",
    409: "Idempotency key reused for another request, plan name taken, plan in use, or "
         "reservation no longer active.",
    413: f"The body is larger than {MAX_BODY_BYTES_VARIABLE} (`content_too_large`).",
    422: "Invalid input (`invalid_input`), with every problem in `details.problems`.",
    503: "The broker, the workers or the database did not answer (`service_unavailable`).",
}


def _responses(
    model: Any, example: Any, *, status: int = 200, queued: bool = False, errors: Sequence[int] = ()
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses of a route: its result (`model` None: any JSON), 202 if it queues,
    and the errors of its own beyond the router's 401, 413, 422 and 503."""
    result: dict[str, Any] = {"content": {"application/json": {"example": example}}}
    if model is not None:
        result["model"] = model
    responses: dict[int | str, dict[str, Any]] = {status: result}
    if queued:
        result["description"] = "The result, when the caller waited for it."
        responses[202] = {
            "model": TaskAccepted, "description": "Queued; poll GET /credits/tasks/{task_id}.",
            "content": {"application/json": {"example": _TASK}},
        }
    for code in errors:
        responses[code] = {"model": ErrorBody, "description": _ERROR_DESCRIPTIONS[code]}
    return responses


def _body_example(summary: str, value: dict[str, Any]) -> Any:
    return Body(openapi_examples={"example": {"summary": summary, "value": value}})


# ------------------------------------------------------------------ routes


def build_router(
    client: AsyncCreditClient,
    reads: CreditService,
    subscriptions: SubscriptionService,
    auth: AuthDependency,
) -> APIRouter:
    """The `/credits` routes; `auth` is any FastAPI dependency that raises to refuse."""
    router = APIRouter(
        prefix="/credits",
        route_class=_EnvelopeRoute,
        dependencies=[Depends(auth)],
        responses={code: {"model": ErrorBody, "description": _ERROR_DESCRIPTIONS[code]}
                   for code in (401, 413, 422, 503)},
    )

    # -------------------------------------------------------------- credits

    @router.post(
        "/add", status_code=202, tags=["credits"], summary="Grant credits to a user",
        responses=_responses(LedgerEntry, _ENTRY, queued=True, errors=[409]),
    )
    async def add_credits(
        body: Annotated[AddCredits, _body_example("100 credits from a purchase", {
            "user_id": "alice", "amount": 100, "source": "purchase", "description": "top-up",
            "idempotency_key": "order-1001",
        })],
        wait: Wait, idempotency_key: KeyHeader = None,
    ) -> JSONResponse:
        return await _answer(await client.add_credits(**_fields(body, idempotency_key)), wait)

    @router.post(
        "/deduct", status_code=202, tags=["credits"], summary="Deduct credits from a user",
        responses=_responses(LedgerEntry, _DEDUCT_ENTRY, queued=True, errors=[402, 404, 409]),
    )
    async def deduct_credits(
        body: Annotated[DeductCredits, _body_example("Charge 30 credits for an export", {
            "user_id": "alice", "amount": 30, "description": "report export",
            "idempotency_key": "export-77",
        })],
        wait: Wait, idempotency_key: KeyHeader = None,
    ) -> JSONResponse:
        return await _answer(await client.deduct_credits(**_fields(body, idempotency_key)), wait)

    @router.get(
        "/balance/{user_id:path}", tags=["credits"],
        summary="A user's total, held and available credits",
        responses=_responses(CreditsInfo, _BALANCE, errors=[404]),
    )
    async def balance(user_id: UserIdPath) -> JSONResponse:
        return _json(await run_in_threadpool(reads.get_user_credits_info, user_id))

    @router.get(
        "/history/{user_id:path}", tags=["credits"], summary="A user's ledger entries, newest first",
        responses=_responses(HistoryPage, {"entries": [_DEDUCT_ENTRY, _ENTRY], "next_before": None},
                             errors=[404]),
    )
    async def history(
        user_id: UserIdPath,
        limit: Annotated[
            int, Query(gt=0, le=MAX_HISTORY_PAGE, description="Entries per page (at most 1000).")
        ] = 50,
        before: Annotated[
            int | None, Query(gt=0, description="Only entries with a smaller id.")
        ] = None,
        kind: Annotated[list[EntryKind] | None, Query(description="Only these kinds.")] = None,
    ) -> JSONResponse:
        entries = await run_in_threadpool(
            reads.get_history, user_id, limit=limit, before=before, kinds=kind
        )
        next_before = entries[-1].id if entries and len(entries) == limit else None
        return _json(HistoryPage(entries=entries, next_before=next_before))

    @router.get(
        "/expiring/{user_id:path}", tags=["credits"], summary="Lots that expire soon, soonest first",
        responses=_responses(list[CreditLot], [_LOT], errors=[404]),
    )
    async def expiring(
        user_id: UserIdPath,
        within_days: Annotated[
            int, Query(ge=0, le=MAX_WITHIN_DAYS, description="Horizon in days (0 to 3660).")
        ] = 7,
    ) -> JSONResponse:
        return _json(await run_in_threadpool(reads.get_expiring_credits, user_id, within_days))

    @router.get(
        "/tasks/{task_id}", tags=["credits"], summary="The outcome of a queued operation",
        responses=_responses(None, _ENTRY, queued=True, errors=[402, 404, 409]),
    )
    async def task_outcome(task_id: uuid.UUID) -> JSONResponse:
        finished, result = await run_in_threadpool(
            _task_outcome, client.sync.app.AsyncResult(str(task_id))
        )
        if not finished:
            return _json(TaskAccepted(task_id=str(task_id)), 202)
        return _json(result)

    # -------------------------------------------------------------- reservations

    @router.post(
        "/reserve", status_code=201, tags=["reservations"],
        summary="Hold credits before the work (always waits for the reservation)",
        responses=_responses(Reservation, _RESERVATION, status=201, errors=[402, 404, 409]),
    )
    async def reserve_credits(
        body: Annotated[ReserveCredits, _body_example("Hold 20 credits for 5 minutes", {
            "user_id": "alice", "amount": 20, "ttl_seconds": 300,
            "idempotency_key": "chat-123:reserve",
        })],
        wait: Wait, idempotency_key: KeyHeader = None,
    ) -> JSONResponse:
        reservation = await client.reserve_credits(
            **_fields(body, idempotency_key), timeout=wait or DEFAULT_TIMEOUT
        )
        return _json(reservation, 201)

    @router.post(
        "/reservations/{reservation_id}/commit", status_code=202, tags=["reservations"],
        summary="Charge a reservation (the amount held, or the actual amount given)",
        responses=_responses(LedgerEntry, _COMMIT_ENTRY, queued=True, errors=[402, 404, 409]),
    )
    async def commit_reservation(
        reservation_id: ReservationIdPath,
        wait: Wait,
        body: Annotated[CommitBody | None, _body_example("Charge the 12 credits used", {
            "amount": 12, "idempotency_key": "chat-123:commit",
        })] = None,
        idempotency_key: KeyHeader = None,
    ) -> JSONResponse:
        fields = _fields(body or CommitBody(), idempotency_key)
        return await _answer(await client.commit_reservation(reservation_id, **fields), wait)

    @router.post(
        "/reservations/{reservation_id}/release", status_code=202, tags=["reservations"],
        summary="Release a reservation without charging",
        responses=_responses(LedgerEntry, _RELEASE_ENTRY, queued=True, errors=[404, 409]),
    )
    async def release_reservation(
        reservation_id: ReservationIdPath,
        wait: Wait,
        body: Annotated[ReleaseBody | None, _body_example("Release the hold", {
            "idempotency_key": "chat-123:release",
        })] = None,
        idempotency_key: KeyHeader = None,
    ) -> JSONResponse:
        fields = _fields(body or ReleaseBody(), idempotency_key)
        return await _answer(await client.release_reservation(reservation_id, **fields), wait)

    @router.get(
        "/reservations/{reservation_id}", tags=["reservations"],
        summary="A reservation and its status",
        responses=_responses(Reservation, _RESERVATION, errors=[404]),
    )
    async def reservation(reservation_id: ReservationIdPath) -> JSONResponse:
        return _json(await run_in_threadpool(reads.get_reservation, reservation_id))

    # -------------------------------------------------------------- plans

    @router.post(
        "/plans", status_code=202, tags=["plans"], summary="Create a plan",
        responses=_responses(Plan, _PLAN, status=201, queued=True, errors=[409]),
    )
    async def create_plan(
        body: Annotated[CreatePlan, _body_example("1,000 credits a month for 19.90 USD", {
            "name": "pro", "credit_limit": 1000, "price": "19.90", "currency": "USD",
            "billing_period": "monthly",
        })],
        wait: Wait, idempotency_key: KeyHeader = None,
    ) -> JSONResponse:
        return await _answer(await client.create_plan(**_fields(body, idempotency_key)), wait, 201)

    @router.get(
        "/plans", tags=["plans"], summary="List plans",
        responses=_responses(list[Plan], [_PLAN]),
    )
    async def list_plans(
        include_inactive: Annotated[bool, Query(description="Also deactivated plans.")] = False,
    ) -> JSONResponse:
        plans = await run_in_threadpool(subscriptions.list_plans, include_inactive=include_inactive)
        return _json(plans)

    @router.get(
        "/plans/{plan:path}", tags=["plans"], summary="A plan, by id or by name",
        responses=_responses(Plan, _PLAN, errors=[404]),
    )
    async def get_plan(plan: PlanPath) -> JSONResponse:
        return _json(await run_in_threadpool(subscriptions.get_plan, plan))

    @router.patch(
        "/plans/{plan:path}", status_code=202, tags=["plans"], summary="Change a plan (id or name)",
        responses=_responses(Plan, {**_PLAN, "credit_limit": 1200}, queued=True, errors=[404, 409]),
    )
    async def update_plan(
        plan: PlanPath,
        body: Annotated[
            PlanChanges, _body_example("Raise the monthly grant", {"credit_limit": 1200})
        ],
        wait: Wait,
    ) -> JSONResponse:
        changes = body.model_dump(exclude_none=True)
        return await _answer(await client.update_plan(plan, **changes), wait)

    @router.delete(
        "/plans/{plan:path}", status_code=202, tags=["plans"],
        summary="Delete an unused plan (one in use is deactivated: 409 plan_in_use)",
        responses=_responses(dict[str, Any], {"deleted": "pro"}, queued=True, errors=[404, 409]),
    )
    async def delete_plan(plan: PlanPath, wait: Wait) -> JSONResponse:
        return await _answer(await client.delete_plan(plan), wait)

    # -------------------------------------------------------------- subscriptions

    @router.put(
        "/subscriptions/{user_id:path}", status_code=202, tags=["subscriptions"],
        summary="Put a user on a plan",
        responses=_responses(Subscription, _SUBSCRIPTION, queued=True, errors=[404, 409]),
    )
    async def assign_plan(
        user_id: UserIdPath,
        body: Annotated[AssignBody, _body_example("Start the pro plan now", {"plan": "pro"})],
        wait: Wait, idempotency_key: KeyHeader = None,
    ) -> JSONResponse:
        return await _answer(
            await client.assign_plan(user_id, **_fields(body, idempotency_key)), wait
        )

    @router.post(
        "/subscriptions/{user_id:path}/change", status_code=202, tags=["subscriptions"],
        summary="Move a user to another plan (upgrade now, downgrade at period end)",
        responses=_responses(Subscription, {**_SUBSCRIPTION, "pending_plan_id": 2}, queued=True,
                             errors=[404, 409]),
    )
    async def change_plan(
        user_id: UserIdPath,
        body: Annotated[ChangeBody, _body_example("Downgrade to basic", {"plan": "basic"})],
        wait: Wait, idempotency_key: KeyHeader = None,
    ) -> JSONResponse:
        return await _answer(
            await client.change_plan(user_id, **_fields(body, idempotency_key)), wait
        )

    @router.delete(
        "/subscriptions/{user_id:path}", status_code=202, tags=["subscriptions"],
        summary="End a user's subscription (at the end of the period by default)",
        responses=_responses(Subscription, {**_SUBSCRIPTION, "cancel_at_period_end": True},
                             queued=True, errors=[404, 409]),
    )
    async def remove_plan(
        user_id: UserIdPath,
        wait: Wait,
        at_period_end: Annotated[bool, Query(description="false: end it now.")] = True,
        idempotency_key: KeyHeader = None,
    ) -> JSONResponse:
        handle = await client.remove_plan(
            user_id, at_period_end=at_period_end, idempotency_key=idempotency_key
        )
        return await _answer(handle, wait)

    @router.get(
        "/subscriptions/{user_id:path}", tags=["subscriptions"], summary="A user's active subscription",
        responses=_responses(Subscription, _SUBSCRIPTION, errors=[404]),
    )
    async def get_subscription(user_id: UserIdPath) -> JSONResponse:
        return _json(await run_in_threadpool(subscriptions.get_user_subscription, user_id))

    return router


# ------------------------------------------------------------------ the app


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return http_error_response(exc)


async def _internal_error(_request: Request, _exc: Exception) -> Response:
    return error_response(500, "internal_error", "the gateway failed; see its log")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway as a standalone app, wired from settings (CREDITWORKER_* variables)."""
    settings = settings or get_settings()
    reads = CreditService.from_settings(settings)
    app = FastAPI(
        title="creditworker gateway",
        summary="Credits and subscriptions over HTTP: writes are queued to the workers, "
                "reads come from the database.",
        version=__version__,
        openapi_tags=TAGS,
    )
    api_keys = configured_api_keys(settings)
    router = build_router(
        AsyncCreditClient(settings), reads, SubscriptionService(reads),
        api_key_auth(api_keys, broker_url=settings.broker_url),
    )
    app.include_router(router)
    app.mount("/console", create_console(settings, reads))
    # Unknown routes and wrong methods never reach a route, so the app shapes them.
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    # The last added runs first: the key is checked, then the body's size, before FastAPI
    # reads a body (it reads and parses one before it runs the router's auth dependency).
    app.add_middleware(BodyLimit, max_body_bytes=settings.http_max_body_bytes)
    app.add_middleware(
        ApiKeyGuard, check=ApiKeyCheck(api_keys, broker_url=settings.broker_url),
        path_prefix=router.prefix,
    )
    return app
