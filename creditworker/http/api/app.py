"""The gateway as a standalone app: the `/credits` API through the workers, and the console.

The settings are read here, once, and handed to what needs them. The API key is checked,
then the body's size, before FastAPI reads a body (see auth.py and body_limit.py).
"""

from __future__ import annotations

from fastapi import FastAPI, Request, Response
from starlette.exceptions import HTTPException

from creditworker import __version__
from creditworker.client.aio import AsyncCreditClient
from creditworker.engine import CreditService, SubscriptionService
from creditworker.http.api.examples import TAGS
from creditworker.http.api.routing import build_router, build_webhooks_router
from creditworker.http.auth import ApiKeyCheck, ApiKeyGuard, api_key_auth, configured_api_keys
from creditworker.http.body_limit import BodyLimit
from creditworker.http.console.app import create_console
from creditworker.http.metrics import metrics_router
from creditworker.http.responses import error_response, http_error_response
from creditworker.notifications.webhooks.service import WebhookOptions, WebhookService
from creditworker.settings import Settings, get_settings
from creditworker.worker.app import make_celery


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
    auth = api_key_auth(api_keys, broker_url=settings.broker_url)
    router = build_router(AsyncCreditClient(settings), reads, SubscriptionService(reads), auth)
    app.include_router(router)
    app.include_router(metrics_router(reads.engine, make_celery(settings), auth,
                                      expiring_days=settings.expiring_soon_days))
    app.include_router(build_webhooks_router(auth))
    app.state.webhooks = WebhookService(reads.engine, WebhookOptions.from_settings(settings))
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
