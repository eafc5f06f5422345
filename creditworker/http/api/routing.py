"""The `/credits` router: the resource routers under one prefix, in one of two modes.

Through the workers (`client=`), writes are queued (202 with a task id unless the caller
asks to wait: `?wait=true`, or `Prefer: wait=N` for up to N seconds; a reservation always
waits, since the caller needs its id) and reads come from the engine. In process, every
operation is one engine call answered with its result. The routes are the same functions
either way; the mode picks the backend they run on, what the OpenAPI document says a write
answers, and whether `GET /credits/tasks/{task_id}` exists.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException

from creditworker.client.aio import AsyncCreditClient
from creditworker.contract.errors import CreditError, ServiceUnavailable
from creditworker.contract.operations import OPERATIONS, RESERVE, Operation
from creditworker.http.api.backends import EngineBackend, WorkerBackend, subscriptions_for
from creditworker.http.api.deps import (
    configured_credit_service,
    no_auth,
    serve_in_process,
    serving_on,
)
from creditworker.http.api.examples import ROUTER_ERRORS, queued
from creditworker.http.api.routes import (
    PREFIX,
    alerts,
    corrections,
    credits,
    plans,
    reservations,
    subscriptions,
    tasks,
    webhooks,
)
from creditworker.http.auth import AuthDependency
from creditworker.http.responses import (
    credit_error_response,
    http_error_response,
    validation_error_response,
)
from creditworker.storage.database import is_transient


class EnvelopeRoute(APIRoute):
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


ROUTED: tuple[Operation, ...] = tuple(operation for operation in OPERATIONS if operation.route)
"""The operations the gateway serves, in registry order (a test checks each is served)."""

RESOURCES = (credits.router, reservations.router, corrections.router, plans.router, subscriptions.router,
             alerts.router)


def _registry_routes() -> list[tuple[Operation, APIRoute]]:
    """Each routed operation with its route, in registry order (the order routes match)."""
    by_place = {(method, route.path): route for resource in RESOURCES
                for route in resource.routes if isinstance(route, APIRoute)
                for method in route.methods}
    ordered = []
    for operation in ROUTED:
        assert operation.route is not None
        place = (operation.route.method, operation.route.path.removeprefix(PREFIX))
        if place not in by_place:
            raise LookupError(f"the registry routes {operation.task} but the gateway has no route")
        ordered.append((operation, by_place.pop(place)))
    if by_place:
        raise LookupError(f"routes the registry does not give: {sorted(by_place)}")
    return ordered


REGISTRY_ROUTES = _registry_routes()


def _add(router: APIRouter, route: APIRoute, **changes: Any) -> None:
    """`route` of a resource router on `router`, with `changes` to what it documents."""
    options: dict[str, Any] = {
        "tags": route.tags, "summary": route.summary, "status_code": route.status_code,
        "responses": route.responses, **changes,
    }
    router.add_api_route(
        route.path, route.endpoint, methods=sorted(route.methods), name=route.name, **options
    )


def _binding(
    client: AsyncCreditClient | None, reads: Any, subscriptions: Any, credit_service: Any
) -> Callable[..., Any]:
    """The router dependency that puts the mode's backend on each request."""
    if client is not None:
        reads = reads if reads is not None else configured_credit_service()
        return serving_on(WorkerBackend(client, reads, subscriptions or subscriptions_for(reads)))
    if credit_service is not None:
        return serving_on(EngineBackend(credit_service))
    return serve_in_process


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
    and reads come from `reads` (an engine; by default the one the settings describe).
    Without it, every operation runs in this process on `credit_service` (`CreditService`
    or `AsyncCreditService`), or, when none is given, on `get_credit_service()`'s, and
    answers 200 or 201 with its result. `auth` is any FastAPI dependency that raises to
    refuse; none by default.
    """
    router = APIRouter(
        prefix=PREFIX,
        route_class=EnvelopeRoute,
        dependencies=[Depends(auth or no_auth),
                      Depends(_binding(client, reads, subscriptions, credit_service))],
        responses=dict(ROUTER_ERRORS),
    )
    through_workers = client is not None
    for operation, route in REGISTRY_ROUTES:
        if through_workers and operation.keyed and operation is not RESERVE:
            _add(router, route, status_code=202,
                 responses=queued(route.responses, route.status_code or 200))
        else:
            _add(router, route)
    if through_workers:
        for route in tasks.router.routes:
            assert isinstance(route, APIRoute)
            _add(router, route)
    return router


def build_webhooks_router(auth: AuthDependency | None = None) -> APIRouter:
    """`/credits/webhooks`: configuration and the delivery log, not operations of the
    registry, so a router of their own (the gateway includes it; routes/webhooks.py)."""
    router = APIRouter(prefix=PREFIX, route_class=EnvelopeRoute, dependencies=[Depends(auth or no_auth)],
                       responses=dict(ROUTER_ERRORS))
    for route in webhooks.router.routes:
        assert isinstance(route, APIRoute)
        _add(router, route)
    return router


router = build_router()
"""The in-process router: `app.include_router(router)` serves `/credits` on the engine of
`get_credit_service()` (override it to use your own)."""
