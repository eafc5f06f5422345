"""The operator console as an app to mount at `/console` in the gateway.

Reads come from the engine's public reads plus `queries` (paged, on indexes); every change
goes through the engine's services (see `routes/`). `create_console` is the console's edge:
it reads the settings it is given once and puts what the routes need on `app.state`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from kombu.utils.url import maybe_sanitize_url
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

from creditworker.client.sync import fail_fast
from creditworker.contract.errors import CreditError
from creditworker.engine import CreditService, SubscriptionService
from creditworker.http.auth import configured_api_keys
from creditworker.http.console.access import ConsoleAccess
from creditworker.http.console.deps import Console, console_of
from creditworker.http.console.pages import HERE, Pages, Refused, redirect
from creditworker.http.console.probes import AuditResult
from creditworker.http.console.routes import (
    accounts,
    actions,
    corrections,
    login,
    plans,
    system,
    topups,
    webhooks,
)
from creditworker.http.responses import STATUS_BY_CODE
from creditworker.metrics.state import CONNECT_SECONDS
from creditworker.notifications.webhooks.service import WebhookOptions, WebhookService
from creditworker.records.dead_letters import DeadLetterStore
from creditworker.settings import Settings
from creditworker.worker.app import make_celery

PUBLIC_PATHS = ("/login", "/static/")


def create_console(settings: Settings, credits: CreditService) -> FastAPI:
    """The console as an app to mount at `/console` in the gateway."""
    access = ConsoleAccess(configured_api_keys(settings), broker_url=settings.broker_url)
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    celery_app = make_celery(settings)
    fail_fast(celery_app, min(settings.broker_connect_timeout_seconds, CONNECT_SECONDS))
    app.state.console = Console(
        credits=credits,
        subscriptions=SubscriptionService(credits),
        dead_letters=DeadLetterStore(credits.engine),
        access=access,
        celery_app=celery_app,
        broker=maybe_sanitize_url(settings.broker_url),
        last_audit=AuditResult(),
        pages=Pages(open_console=access.open),
    )
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.middleware("http")(_require_key)
    app.add_exception_handler(Refused, _refused)
    app.add_exception_handler(CreditError, _engine_refused)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(DBAPIError, _database_down)
    app.state.webhooks = WebhookService(credits.engine, WebhookOptions.from_settings(settings))
    for area in (login, accounts, actions, corrections, topups, plans, system, webhooks):
        app.include_router(area.router)
    return app


async def _require_key(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """Every page but the login's needs an operator: a browser is sent to log in, any
    other client gets 401."""
    access = console_of(request).access
    path = request.scope["path"][len(request.scope.get("root_path", "")):] or "/"
    if path.startswith(PUBLIC_PATHS):
        request.state.operator = access.operator(request)
        return await call_next(request)
    operator = access.operator(request)
    if operator is None:
        if request.method in ("GET", "HEAD") and "authorization" not in request.headers:
            wanted = path + (f"?{request.url.query}" if request.url.query else "")
            return redirect(request, "/login", next=wanted)
        return Response(
            "log in at /console/login, or send 'Authorization: Bearer <API key>'\n",
            status_code=401, headers={"WWW-Authenticate": "Bearer"},
            media_type="text/plain",
        )
    request.state.operator = operator
    return await call_next(request)


async def _refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Refused)
    return console_of(request).pages.render(request, "error.html", exc.status, message=exc.message)


async def _engine_refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, CreditError)
    status = STATUS_BY_CODE.get(exc.code, 400)
    return console_of(request).pages.render(
        request, "error.html", status, message=exc.message, code=exc.code
    )


async def _database_down(request: Request, exc: Exception) -> Response:
    """A database that does not answer is a 503 page that says so (the API's answer too),
    not a bare 500."""
    assert isinstance(exc, DBAPIError)
    console = console_of(request)
    where = console.engine.url.render_as_string(hide_password=True)
    detail = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
    response = console.pages.render(
        request, "error.html", 503, code="service_unavailable",
        message=f"The database {where} does not answer ({detail}). Check that it runs; "
                "this page works again as soon as it does.",
    )
    response.headers["Retry-After"] = "5"
    return response


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return console_of(request).pages.render(
        request, "error.html", exc.status_code, message=str(exc.detail)
    )
