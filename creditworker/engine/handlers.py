"""One dispatch for the registry: from an operation and its request to the engine's answer.

Every edge that runs an operation (a Celery task, an HTTP route, a CLI command) builds the
request, calls `dispatch` (or `handler_for` where it awaits the async twin) and renders what
comes back. The table below says which engine method serves each operation; most are the
method the registry names, called with the fields the request was given (so the engine's
defaults apply, and an update changes only what was given). An operation that needs more
than that has its own handler in `SPECIAL`, never an `if` at the edges.

The operations whose registry entry names no engine method (the health check, the event
relay, beat's fan-out) need the edge's own machinery (a broker connection, the Celery
app); their adapters live at that edge (worker/tasks.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel

from creditworker.contract.operations import BATCH, OPERATIONS, Operation


class Services(Protocol):
    """The engine's two services, as an edge holds them (sync or async twins alike)."""

    @property
    def credits(self) -> Any: ...

    @property
    def subscriptions(self) -> Any: ...


@dataclass(frozen=True)
class BuiltServices:
    """Both services, built by the edge up front."""

    credits: Any
    subscriptions: Any


Call = Callable[..., Any]
Handler = Callable[[Services, BaseModel, str], tuple[Call, dict[str, Any]]]
"""(services, request, key) -> the engine method to call and its keyword arguments."""


def engine_method(services: Services, operation: Operation) -> Call:
    """The engine method the registry names for `operation` (`credits.x` or
    `subscriptions.x`): the one place that reads the name, for every edge."""
    if operation.engine is None:
        raise LookupError(f"{operation.task} is not served by the engine: its edge has an adapter")
    owner, method = operation.engine.split(".")
    return getattr(getattr(services, owner), method)  # type: ignore[no-any-return]


def _given_fields(operation: Operation) -> Handler:
    """The method the registry names, with the request's given fields (and the key)."""

    def handler(services: Services, request: BaseModel, key: str) -> tuple[Call, dict[str, Any]]:
        arguments = {name: getattr(request, name) for name in request.model_fields_set}
        if operation.keyed:
            arguments["idempotency_key"] = key
        return engine_method(services, operation), arguments

    return handler


def _apply_batch(services: Services, request: Any, key: str) -> tuple[Call, dict[str, Any]]:
    """Many operations in one transaction; item i without a key is keyed `<key>:<i>`."""
    keys = [f"{key}:{i}" for i in range(len(request.operations))]
    return services.credits.apply_batch, {"operations": request.operations, "default_keys": keys}


SPECIAL: dict[str, Handler] = {BATCH.task: _apply_batch}
"""The operations whose engine method takes more than the request's fields."""

HANDLERS: dict[str, Handler] = {
    operation.task: SPECIAL.get(operation.task) or _given_fields(operation)
    for operation in OPERATIONS
    if operation.engine is not None
}
"""Each operation the engine serves, by task name: its handler."""


def handler_for(
    services: Services, operation: Operation, request: BaseModel, key: str
) -> tuple[Call, dict[str, Any]]:
    """The engine method that serves `operation` and its arguments, for an edge that calls
    it its own way (awaited on the async twin, or metered); `wrap` it what comes back."""
    handler = HANDLERS.get(operation.task)
    if handler is None:
        raise LookupError(f"{operation.task} is not served by the engine: its edge has an adapter")
    return handler(services, request, key)


def wrap(operation: Operation, answer: Any) -> Any:
    """The engine's answer as the operation's result (`{"expired": 3}` for a plain count)."""
    return {operation.wrap: answer} if operation.wrap else answer


def dispatch(services: Services, operation: Operation, request: BaseModel, key: str) -> Any:
    """Run `operation` on the engine: the one dispatch of the registry."""
    method, arguments = handler_for(services, operation, request, key)
    return wrap(operation, method(**arguments))
