"""The `/credits` routes, one module per resource, each a module-level `APIRouter`.

A route is registered with `served`: its path, method and result model come from the
operation registry, so a route module only says what the request carries and which
operation it runs. `routing.build_router` puts them under `/credits` in registry order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from fastapi import APIRouter

from creditworker.contract.operations import Operation
from creditworker.http.api.backends import status_of
from creditworker.http.api.examples import responses

PREFIX = "/credits"

Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


def served(
    router: APIRouter, operation: Operation, *, summary: str, example: Any, model: Any = None,
    errors: Sequence[int] = (),
) -> Callable[[Endpoint], Endpoint]:
    """Registers the route of `operation` on a resource's router: path, method and result
    model from the registry (`model` only where the answer wraps the result: a history
    page), documented as answered at once (`build_router` adds the 202 of a queued write)."""
    assert operation.route is not None, f"the registry gives {operation.task} no route"
    route = operation.route
    status = status_of(operation)
    documented = responses(
        operation.result if model is None else model, example, status=status, errors=errors
    )

    def register(endpoint: Endpoint) -> Endpoint:
        router.add_api_route(
            route.path.removeprefix(PREFIX), endpoint, methods=[route.method],
            name=endpoint.__name__, status_code=status, summary=summary, responses=documented,
        )
        return endpoint

    return register
