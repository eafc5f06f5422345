"""Bearer API keys for the gateway: `Authorization: Bearer KEY`, keys from CREDITWORKER_API_KEYS.

With no key configured the gateway is open only on the embedded default broker
(`filesystem://`), which is a single laptop; pointed at a shared broker it refuses every
request until keys are set, so a deployment cannot be left open by forgetting them.

One check (`ApiKeyCheck`) reads only the Authorization header, so it serves two places: the
gateway app runs it as ASGI middleware (`ApiKeyGuard`), before any body is read, since
FastAPI reads and parses a body before it runs a route's dependencies; the router runs it
again as its dependency, so the router is never open wherever it is mounted, and its OpenAPI
document names the scheme.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from creditworker.http.responses import refusal_before_body
from creditworker.settings import Settings, broker_kind

API_KEYS_VARIABLE = "CREDITWORKER_API_KEYS"

_bearer = HTTPBearer(auto_error=False, description="An API key from CREDITWORKER_API_KEYS.")

AuthDependency = Callable[..., Awaitable[None]]

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def configured_api_keys(settings: Settings) -> list[str]:
    """The comma-separated keys in CREDITWORKER_API_KEYS (blank entries ignored)."""
    return [key.strip() for key in settings.api_keys.split(",") if key.strip()]


class ApiKeyCheck:
    """Which Authorization headers may use the gateway: a Bearer one of `api_keys`."""

    def __init__(self, api_keys: Sequence[str], *, broker_url: str) -> None:
        self.keys = [key.encode("utf-8") for key in api_keys]
        self.open_without_keys = not self.keys and broker_kind(broker_url) == "filesystem"

    def refusal(self, authorization: str | None) -> str | None:
        """Why a request with this Authorization header is refused; None lets it through."""
        if self.open_without_keys:
            return None
        if not self.keys:
            return (
                f"no API keys are configured: set {API_KEYS_VARIABLE} (comma-separated) "
                "to use the gateway with a shared broker"
            )
        scheme, credentials = get_authorization_scheme_param(authorization)
        if scheme.lower() != "bearer" or not credentials:
            return "send 'Authorization: Bearer <API key>'"
        # Starlette reads header bytes as latin-1; back to the bytes the client sent.
        given = credentials.encode("latin-1")
        # Compare with every key, so the time taken says nothing about which one is close.
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(given, key)
        return None if matched else "the API key is not valid"


def api_key_auth(api_keys: Sequence[str], *, broker_url: str) -> AuthDependency:
    """A dependency that lets a request through only with one of `api_keys`."""
    check = ApiKeyCheck(api_keys, broker_url=broker_url)

    async def require_api_key(
        request: Request,
        _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    ) -> None:
        refusal = check.refusal(request.headers.get("authorization"))
        if refusal is not None:
            raise HTTPException(401, refusal, headers=_CHALLENGE)

    return require_api_key


class ApiKeyGuard:
    """Refuse requests under `path_prefix` without a valid key before the app sees them."""

    def __init__(self, app: ASGIApp, *, check: ApiKeyCheck, path_prefix: str) -> None:
        self.app = app
        self.check = check
        self.path_prefix = path_prefix.rstrip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._guarded(_route_path(scope)):
            refusal = self.check.refusal(Headers(scope=scope).get("authorization"))
            if refusal is not None:
                response = refusal_before_body(
                    scope, 401, "unauthorized", refusal, headers=_CHALLENGE
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _guarded(self, path: str) -> bool:
        return path == self.path_prefix or path.startswith(self.path_prefix + "/")


def _route_path(scope: Scope) -> str:
    """The path the app routes on: behind a proxy's prefix (`root_path`), without it."""
    path, root_path = scope["path"], scope.get("root_path", "")
    return path[len(root_path):] if root_path and path.startswith(root_path) else path
