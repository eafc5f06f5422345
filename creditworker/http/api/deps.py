"""The dependencies the `/credits` routes declare: where their operation runs (the backend),
how long a caller waits, and the engine of the in-process router.

`build_router` binds one backend to its routes with a router dependency (`serving_on` or
`serve_in_process`) that puts it on the request; a route takes it as `Run`. So the routes are
module-level functions, and one router in each mode reuses them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Header, Query, Request

from creditworker.client.handle import DEFAULT_TIMEOUT
from creditworker.engine import CreditService
from creditworker.engine.service import embedded_tables
from creditworker.http.api.backends import Backend, EngineBackend
from creditworker.settings import get_settings

MAX_WAIT_SECONDS = 60.0
"""The longest `Prefer: wait=N` honoured; a longer wait is cut to this."""


def wait_seconds(
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


Wait = Annotated[float | None, Depends(wait_seconds)]


@functools.cache
def configured_credit_service() -> CreditService:
    """The engine the settings describe, made once. The in-process router has no edge of its
    own to read settings at (a host app includes it), so this dependency is that edge."""
    settings = get_settings()
    return CreditService.from_settings(
        settings, create_tables=embedded_tables(settings.database_url)
    )


def get_credit_service() -> Any:
    """The engine the in-process router uses: the one CREDITWORKER_* settings describe (an
    embedded SQLite file makes its tables). A host app that has its own engine object says
    so with FastAPI's override: `app.dependency_overrides[get_credit_service] = lambda: svc`."""
    return configured_credit_service()


async def current_backend(request: Request) -> Backend:
    """The backend the router's binding dependency put on this request."""
    backend: Backend = request.state.credit_backend
    return backend


Run = Annotated[Backend, Depends(current_backend)]


def serving_on(backend: Backend) -> Callable[[Request], Awaitable[None]]:
    """A router dependency that runs every route of the router on `backend`."""

    async def bind(request: Request) -> None:
        request.state.credit_backend = backend

    return bind


async def serve_in_process(
    request: Request, credits: Annotated[Any, Depends(get_credit_service)]
) -> None:
    """The in-process router's binding: the engine of `get_credit_service()` (or its override)."""
    request.state.credit_backend = EngineBackend(credits)


async def no_auth() -> None:
    return None
