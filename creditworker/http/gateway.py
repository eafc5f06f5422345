"""The HTTP gateway: writes go to the workers through the producer, reads come from the database.

Each route turns a request into one producer call or one engine read. Bodies are the
contract's models (or thin ones built from its field types), so the gateway refuses exactly
what the workers refuse. Writes answer 202 with a task id unless the caller asks to wait
(`?wait=true`, or `Prefer: wait=N` for up to N seconds); a reservation always waits, since
the caller needs its id. Reads run in the thread pool, so the event loop never blocks.
In the standalone app the API key is checked, then the body's size, before FastAPI reads a
body (see auth.py and body_limit.py).
"""

import functools
import math
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Protocol

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
    DeductCredits,
    Description,
    EntryKind,
    IdempotencyKey,
    LedgerEntry,
    Metadata,
    NonNegativeAmount,
    ReservationId,
    ReserveCredits,
    UserId,
    UtcDateTime,
)
from creditworker.engine import CreditService, SubscriptionService
from creditworker.engine.service import embedded_tables
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
from creditworker.http.metering.meters import call_engine
from creditworker.http.responses import (
    ErrorBody,
    credit_error_response,
    error_response,
    http_error_response,
    validation_error_response,
)
from creditworker.operations import (
    ADD,
    ASSIGN_PLAN,
    BALANCE,
    CHANGE_PLAN,
    COMMIT,
    CREATE_PLAN,
    DEDUCT,
    DELETE_PLAN,
    EXPIRING,
    GET_PLAN,
    GET_SUBSCRIPTION,
    HISTORY,
    LIST_PLANS,
    OPERATIONS,
    RELEASE,
    REMOVE_PLAN,
    RESERVATION,
    RESERVE,
    UPDATE_PLAN,
    Operation,
)
from creditworker.plans_contract import (
    CreatePlan,
    PlanChanges,
    PlanName,
    PlanRef,
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


class _Backend(Protocol):
    """Where a route's operation runs: through the workers, or in this process."""

    async def write(self, operation: Operation, fields: dict[str, Any], wait: float | None) -> JSONResponse: ...

    async def read(self, operation: Operation, *args: Any, **kwargs: Any) -> Any: ...


def _status(operation: Operation) -> int:
    """201 for what creates a resource the caller names next (a hold, a plan), else 200."""
    return 201 if operation in (RESERVE, CREATE_PLAN) else 200


async def _engine_call(services: tuple[Any, Any], operation: Operation, *args: Any, **kwargs: Any) -> Any:
    """The engine method the registry names (`credits.x` or `subscriptions.x`)."""
    if operation is DELETE_PLAN:  # the registry names no method: the task has an adapter
        await call_engine(services[1], "delete_plan", *args, **kwargs)
        return {"deleted": args[0] if args else kwargs["plan"]}
    assert operation.engine is not None
    owner, method = operation.engine.split(".")
    return await call_engine(services[0] if owner == "credits" else services[1], method, *args, **kwargs)


class _WorkerBackend:
    """Writes are tasks (202, or the result for a caller that waits); reads use the engine."""

    def __init__(self, client: AsyncCreditClient, reads: Any, subscriptions: Any) -> None:
        self.client = client
        self.services = (reads, subscriptions)

    async def write(self, operation: Operation, fields: dict[str, Any], wait: float | None) -> JSONResponse:
        if operation is RESERVE:  # the caller needs the hold's id: always waits
            return _json(await self.client.reserve_credits(**fields, timeout=wait or DEFAULT_TIMEOUT), 201)
        assert operation.producer is not None
        handle = await getattr(self.client, operation.producer)(**fields)
        return await _answer(handle, wait, _status(operation))

    async def read(self, operation: Operation, *args: Any, **kwargs: Any) -> Any:
        return await _engine_call(self.services, operation, *args, **kwargs)


class _EngineBackend:
    """In process: every operation is one call of the engine, answered with its result."""

    def __init__(self, credits: Any) -> None:
        self.services = (credits, subscriptions_for(credits))

    async def write(self, operation: Operation, fields: dict[str, Any], wait: float | None) -> JSONResponse:
        return _json(await _engine_call(self.services, operation, **fields), _status(operation))

    async def read(self, operation: Operation, *args: Any, **kwargs: Any) -> Any:
        return await _engine_call(self.services, operation, *args, **kwargs)


_SUBSCRIPTIONS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def subscriptions_for(credits: Any) -> Any:
    """The subscription service over an engine object, made once per engine."""
    service = _SUBSCRIPTIONS.get(credits)
    if service is None:
        from creditworker.engine.async_service import AsyncCreditService, AsyncSubscriptionService

        service = (AsyncSubscriptionService(credits) if isinstance(credits, AsyncCreditService)
                   else SubscriptionService(credits))
        _SUBSCRIPTIONS[credits] = service
    return service


@functools.cache
def _configured_credit_service() -> CreditService:
    settings = get_settings()
    return CreditService.from_settings(
        settings, create_tables=embedded_tables(settings.database_url)
    )


def get_credit_service() -> Any:
    """The engine the in-process router uses: the one CREDITWORKER_* settings describe (an
    embedded SQLite file makes its tables). A host app that has its own engine object says
    so with FastAPI's override: `app.dependency_overrides[get_credit_service] = lambda: svc`."""
    return _configured_credit_service()


def _engine_backend(credits: Annotated[Any, Depends(get_credit_service)]) -> _Backend:
    return _EngineBackend(credits)


async def _no_auth() -> None:
    return None


def build_router(
    client: AsyncCreditClient | None = None,
    reads: Any = None,
    subscriptions: Any = None,
    auth: AuthDependency | None = None,
    *,
    credit_service: Any = None,
) -> APIRouter:
    """The `/credits` routes of every operation the registry gives a route.

    With `client`, writes go to the workers (202, or the result for a caller that waits)
    and reads come from `reads` (an engine; by default the one the settings describe). Without it, every operation runs in this
    process on `credit_service` (`CreditService` or `AsyncCreditService`), or, when none is
    given, on `get_credit_service()`'s, and answers 200 or 201 with its result. `auth` is
    any FastAPI dependency that raises to refuse; none by default.
    """
    if client is not None:
        reads = reads if reads is not None else _configured_credit_service()
        worker = _WorkerBackend(client, reads, subscriptions or subscriptions_for(reads))
        backend_dependency: Callable[..., Any] = lambda: worker
    elif credit_service is not None:
        in_process = _EngineBackend(credit_service)
        backend_dependency = lambda: in_process
    else:
        backend_dependency = _engine_backend
    Run = Annotated[_Backend, Depends(backend_dependency)]
    queued = client is not None
    router = APIRouter(
        prefix="/credits",
        route_class=_EnvelopeRoute,
        dependencies=[Depends(auth or _no_auth)],
        responses={code: {"model": ErrorBody, "description": _ERROR_DESCRIPTIONS[code]}
                   for code in (401, 413, 422, 503)},
    )
    handlers: dict[Operation, tuple[Callable[..., Any], dict[str, Any]]] = {}

    def served(operation: Operation, *, tags: list[str], summary: str, example: Any, model: Any = None,
               errors: Sequence[int] = (), queues: bool = False) -> Callable[[Any], Any]:
        """Registers the handler of `operation`: its path, method and result model come from
        the registry (`model` only where the answer wraps the result: a history page)."""
        model = operation.result if model is None else model

        def register(handler: Callable[..., Any]) -> Callable[..., Any]:
            status = 202 if queues and queued and operation is not RESERVE else _status(operation)
            responses = _responses(model, example, status=_status(operation), queued=queues and queued
                                   and operation is not RESERVE, errors=errors)
            handlers[operation] = (handler, {"status_code": status, "tags": tags, "summary": summary,
                                             "responses": responses})
            return handler
        return register

    # -------------------------------------------------------------- credits

    @served(ADD, tags=["credits"], summary="Grant credits to a user",
            example=_ENTRY, errors=[409], queues=True)
    async def add_credits(
        body: Annotated[AddCredits, _body_example("100 credits from a purchase", {
            "user_id": "alice", "amount": 100, "source": "purchase", "description": "top-up",
            "idempotency_key": "order-1001",
        })],
        run: Run, wait: Wait, idempotency_key: KeyHeader = None,
    ) -> JSONResponse:
        return await run.write(ADD, _fields(body, idempotency_key), wait)

    @served(DEDUCT, tags=["credits"], summary="Deduct credits from a user",
            example=_DEDUCT_ENTRY, errors=[402, 404, 409], queues=True)
    async def deduct_credits(
        body: Annotated[DeductCredits, _body_example("Charge 30 credits for an export", {
            "user_id": "alice", "amount": 30, "description": "report export",
            "idempotency_key": "export-77",
        })],
        run: Run, wait: Wait, idempotency_key: KeyHeader = None,
    ) -> JSONResponse:
        return await run.write(DEDUCT, _fields(body, idempotency_key), wait)

    @served(BALANCE, tags=["credits"], summary="A user's total, held and available credits",
            example=_BALANCE, errors=[404])
    async def balance(user_id: UserIdPath, run: Run) -> JSONResponse:
        return _json(await run.read(BALANCE, user_id))

    @served(HISTORY, tags=["credits"], summary="A user's ledger entries, newest first",
            model=HistoryPage, example={"entries": [_DEDUCT_ENTRY, _ENTRY], "next_before": None},
            errors=[404])
    async def history(
        user_id: UserIdPath,
        run: Run,
        limit: Annotated[
            int, Query(gt=0, le=MAX_HISTORY_PAGE, description="Entries per page (at most 1000).")
        ] = 50,
        before: Annotated[
            int | None, Query(gt=0, description="Only entries with a smaller id.")
        ] = None,
        kind: Annotated[list[EntryKind] | None, Query(description="Only these kinds.")] = None,
    ) -> JSONResponse:
        entries = await run.read(HISTORY, user_id, limit=limit, before=before, kinds=kind)
        next_before = entries[-1].id if entries and len(entries) == limit else None
        return _json(HistoryPage(entries=entries, next_before=next_before))

    @served(EXPIRING, tags=["credits"], summary="Lots that expire soon, soonest first",
            example=[_LOT], errors=[404])
    async def expiring(
        user_id: UserIdPath,
        run: Run,
        within_days: Annotated[
            int, Query(ge=0, le=MAX_WITHIN_DAYS, description="Horizon in days (0 to 3660).")
        ] = 7,
    ) -> JSONResponse:
        return _json(await run.read(EXPIRING, user_id, within_days))

    # -------------------------------------------------------------- reservations

    @served(RESERVE, tags=["reservations"],
            summary="Hold credits before the work (always waits for the reservation)",
            example=_RESERVATION, errors=[402, 404, 409])
    async def reserve_credits(
        body: Annotated[ReserveCredits, _body_example("Hold 20 credits for 5 minutes", {
            "user_id": "alice", "amount": 20, "ttl_seconds": 300,
            "idempotency_key": "chat-123:reserve",
        })],
        run: Run, wait: Wait, idempotency_key: KeyHeader = None,
    ) -> JSONResponse:
        return await run.write(RESERVE, _fields(body, idempotency_key), wait)

    @served(COMMIT, tags=["reservations"],
            summary="Charge a reservation (the amount held, or the actual amount given)",
            example=_COMMIT_ENTRY, errors=[402, 404, 409], queues=True)
    async def commit_reservation(
        reservation_id: ReservationIdPath,
        run: Run,
        wait: Wait,
        body: Annotated[CommitBody | None, _body_example("Charge the 12 credits used", {
            "amount": 12, "idempotency_key": "chat-123:commit",
        })] = None,
        idempotency_key: KeyHeader = None,
    ) -> JSONResponse:
        fields = _fields(body or CommitBody(), idempotency_key)
        return await run.write(COMMIT, {"reservation_id": reservation_id, **fields}, wait)

    @served(RELEASE, tags=["reservations"], summary="Release a reservation without charging",
            example=_RELEASE_ENTRY, errors=[404, 409], queues=True)
    async def release_reservation(
        reservation_id: ReservationIdPath,
        run: Run,
        wait: Wait,
        body: Annotated[ReleaseBody | None, _body_example("Release the hold", {
            "idempotency_key": "chat-123:release",
        })] = None,
        idempotency_key: KeyHeader = None,
    ) -> JSONResponse:
        fields = _fields(body or ReleaseBody(), idempotency_key)
        return await run.write(RELEASE, {"reservation_id": reservation_id, **fields}, wait)

    @served(RESERVATION, tags=["reservations"], summary="A reservation and its status",
            example=_RESERVATION, errors=[404])
    async def reservation(reservation_id: ReservationIdPath, run: Run) -> JSONResponse:
        return _json(await run.read(RESERVATION, reservation_id))

    # -------------------------------------------------------------- plans

    @served(CREATE_PLAN, tags=["plans"], summary="Create a plan", example=_PLAN,
            errors=[409], queues=True)
    async def create_plan(
        body: Annotated[CreatePlan, _body_example("1,000 credits a month for 19.90 USD", {
            "name": "pro", "credit_limit": 1000, "price": "19.90", "currency": "USD",
            "billing_period": "monthly",
        })],
        run: Run, wait: Wait, idempotency_key: KeyHeader = None,
    ) -> JSONResponse:
        return await run.write(CREATE_PLAN, _fields(body, idempotency_key), wait)

    @served(LIST_PLANS, tags=["plans"], summary="List plans", example=[_PLAN])
    async def list_plans(
        run: Run,
        include_inactive: Annotated[bool, Query(description="Also deactivated plans.")] = False,
    ) -> JSONResponse:
        return _json(await run.read(LIST_PLANS, include_inactive=include_inactive))

    @served(GET_PLAN, tags=["plans"], summary="A plan, by id or by name",
            example=_PLAN, errors=[404])
    async def get_plan(plan: PlanPath, run: Run) -> JSONResponse:
        return _json(await run.read(GET_PLAN, plan))

    @served(UPDATE_PLAN, tags=["plans"], summary="Change a plan (id or name)",
            example={**_PLAN, "credit_limit": 1200}, errors=[404, 409], queues=True)
    async def update_plan(
        plan: PlanPath,
        body: Annotated[
            PlanChanges, _body_example("Raise the monthly grant", {"credit_limit": 1200})
        ],
        run: Run,
        wait: Wait,
    ) -> JSONResponse:
        return await run.write(UPDATE_PLAN, {"plan": plan, **body.model_dump(exclude_none=True)}, wait)

    @served(DELETE_PLAN, tags=["plans"],
            summary="Delete an unused plan (one in use is deactivated: 409 plan_in_use)",
            example={"deleted": "pro"}, errors=[404, 409], queues=True)
    async def delete_plan(plan: PlanPath, run: Run, wait: Wait) -> JSONResponse:
        return await run.write(DELETE_PLAN, {"plan": plan}, wait)

    # -------------------------------------------------------------- subscriptions

    @served(ASSIGN_PLAN, tags=["subscriptions"], summary="Put a user on a plan",
            example=_SUBSCRIPTION, errors=[404, 409], queues=True)
    async def assign_plan(
        user_id: UserIdPath,
        body: Annotated[AssignBody, _body_example("Start the pro plan now", {"plan": "pro"})],
        run: Run, wait: Wait, idempotency_key: KeyHeader = None,
    ) -> JSONResponse:
        return await run.write(ASSIGN_PLAN, {"user_id": user_id, **_fields(body, idempotency_key)}, wait)

    @served(CHANGE_PLAN, tags=["subscriptions"],
            summary="Move a user to another plan (upgrade now, downgrade at period end)",
            example={**_SUBSCRIPTION, "pending_plan_id": 2}, errors=[404, 409],
            queues=True)
    async def change_plan(
        user_id: UserIdPath,
        body: Annotated[ChangeBody, _body_example("Downgrade to basic", {"plan": "basic"})],
        run: Run, wait: Wait, idempotency_key: KeyHeader = None,
    ) -> JSONResponse:
        return await run.write(CHANGE_PLAN, {"user_id": user_id, **_fields(body, idempotency_key)}, wait)

    @served(REMOVE_PLAN, tags=["subscriptions"],
            summary="End a user's subscription (at the end of the period by default)",
            example={**_SUBSCRIPTION, "cancel_at_period_end": True},
            errors=[404, 409], queues=True)
    async def remove_plan(
        user_id: UserIdPath,
        run: Run,
        wait: Wait,
        at_period_end: Annotated[bool, Query(description="false: end it now.")] = True,
        idempotency_key: KeyHeader = None,
    ) -> JSONResponse:
        fields = {"user_id": user_id, "at_period_end": at_period_end, "idempotency_key": idempotency_key}
        return await run.write(REMOVE_PLAN, fields, wait)

    @served(GET_SUBSCRIPTION, tags=["subscriptions"], summary="A user's active subscription",
            example=_SUBSCRIPTION, errors=[404])
    async def get_subscription(user_id: UserIdPath, run: Run) -> JSONResponse:
        return _json(await run.read(GET_SUBSCRIPTION, user_id))

    # -------------------------------------------------------------- the registry's routes

    for operation in ROUTED:
        assert operation.route is not None
        if operation not in handlers:
            raise LookupError(f"the registry routes {operation.task} but the gateway has no handler")
        handler, options = handlers.pop(operation)
        router.add_api_route(
            operation.route.path.removeprefix(router.prefix), handler,
            methods=[operation.route.method], name=handler.__name__, **options,
        )
    if handlers:
        raise LookupError(f"handlers for operations the registry gives no route: {sorted(o.task for o in handlers)}")

    if client is not None:
        @router.get(
            "/tasks/{task_id}", tags=["credits"], summary="The outcome of a queued operation",
            responses=_responses(None, _ENTRY, queued=True, errors=[402, 404, 409]),
        )
        async def task_outcome(task_id: uuid.UUID) -> JSONResponse:
            assert client is not None
            finished, result = await run_in_threadpool(
                _task_outcome, client.sync.app.AsyncResult(str(task_id))
            )
            if not finished:
                return _json(TaskAccepted(task_id=str(task_id)), 202)
            return _json(result)

    return router


ROUTED: tuple[Operation, ...] = tuple(operation for operation in OPERATIONS if operation.route)
"""The operations the gateway serves, in registry order (a test checks each is served)."""

router = build_router()
"""The in-process router: `app.include_router(router)` serves `/credits` on the engine of
`get_credit_service()` (override it to use your own)."""


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
