"""Where a `/credits` route's operation runs: through the workers, or in this process.

Both backends take the same operation and fields and answer the same way, so the routes
are written once. The worker backend queues writes (202 with a task id, or the result for a
caller that waits) and reads from the engine; the engine backend runs every operation at
once. Reads run in the thread pool (or are awaited on an async engine), so the event loop
never blocks.
"""

from __future__ import annotations

import uuid
import weakref
from typing import Any, Protocol

from celery.result import AsyncResult
from fastapi.concurrency import run_in_threadpool
from pydantic_core import to_jsonable_python
from starlette.responses import JSONResponse

from creditworker.client.aio import AsyncCreditClient, AsyncTaskHandle
from creditworker.client.handle import DEFAULT_TIMEOUT, unwrap
from creditworker.contract.errors import ServiceUnavailable
from creditworker.contract.operations import CREATE_PLAN, RESERVE, Operation
from creditworker.engine import SubscriptionService
from creditworker.engine.handlers import BuiltServices, engine_method
from creditworker.http.api.bodies import TaskAccepted
from creditworker.http.metering.meters import call_engine


class Backend(Protocol):
    """Where a route's operation runs: through the workers, or in this process."""

    async def write(
        self, operation: Operation, fields: dict[str, Any], wait: float | None
    ) -> JSONResponse: ...

    async def read(self, operation: Operation, *args: Any, **kwargs: Any) -> Any: ...


def json_answer(value: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(to_jsonable_python(value), status_code=status)


def status_of(operation: Operation) -> int:
    """201 for what creates a resource the caller names next (a hold, a plan), else 200."""
    return 201 if operation in (RESERVE, CREATE_PLAN) else 200


async def engine_call(
    services: BuiltServices, operation: Operation, *args: Any, **kwargs: Any
) -> Any:
    """The engine method the registry names, called (and awaited on the async twin)."""
    return await call_engine(engine_method(services, operation), *args, **kwargs)


async def _answer(
    handle: AsyncTaskHandle[Any], wait: float | None, status: int = 200
) -> JSONResponse:
    """202 with the task id, or the result once the worker answered."""
    if wait is None:
        return json_answer(TaskAccepted(task_id=handle.task_id), 202)
    return json_answer(await handle.get(wait), status)


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


class WorkerBackend:
    """Writes are tasks (202, or the result for a caller that waits); reads use the engine."""

    def __init__(self, client: AsyncCreditClient, reads: Any, subscriptions: Any) -> None:
        self.client = client
        self.services = BuiltServices(reads, subscriptions)

    async def write(
        self, operation: Operation, fields: dict[str, Any], wait: float | None
    ) -> JSONResponse:
        if operation is RESERVE:  # the caller needs the hold's id: always waits
            reservation = await self.client.reserve_credits(
                **fields, timeout=wait or DEFAULT_TIMEOUT
            )
            return json_answer(reservation, 201)
        assert operation.producer is not None
        handle = await getattr(self.client, operation.producer)(**fields)
        return await _answer(handle, wait, status_of(operation))

    async def read(self, operation: Operation, *args: Any, **kwargs: Any) -> Any:
        return await engine_call(self.services, operation, *args, **kwargs)

    async def outcome(self, task_id: uuid.UUID) -> JSONResponse:
        """A queued write's result: 202 while pending, then what waiting would have given."""
        finished, result = await run_in_threadpool(
            _task_outcome, self.client.sync.app.AsyncResult(str(task_id))
        )
        if not finished:
            return json_answer(TaskAccepted(task_id=str(task_id)), 202)
        return json_answer(result)


class EngineBackend:
    """In process: every operation is one call of the engine, answered with its result."""

    def __init__(self, credits: Any) -> None:
        self.services = BuiltServices(credits, subscriptions_for(credits))

    async def write(
        self, operation: Operation, fields: dict[str, Any], wait: float | None
    ) -> JSONResponse:
        result = await engine_call(self.services, operation, **fields)
        return json_answer(result, status_of(operation))

    async def read(self, operation: Operation, *args: Any, **kwargs: Any) -> Any:
        return await engine_call(self.services, operation, *args, **kwargs)


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
