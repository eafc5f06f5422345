"""Bearer API keys for the gateway: `Authorization: Bearer KEY`, keys from CREDITWORKER_API_KEYS.

With no key configured the gateway is open only on the embedded default broker
(`filesystem://`), which is a single laptop; pointed at a shared broker it refuses every
request until keys are set, so a deployment cannot be left open by forgetting them.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated

from fastapi import Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from creditworker.settings import Settings
from creditworker.worker.app import broker_kind

API_KEYS_VARIABLE = "CREDITWORKER_API_KEYS"

_bearer = HTTPBearer(auto_error=False, description="An API key from CREDITWORKER_API_KEYS.")

AuthDependency = Callable[..., Awaitable[None]]


def configured_api_keys(settings: Settings) -> list[str]:
    """The comma-separated keys in CREDITWORKER_API_KEYS (blank entries ignored)."""
    return [key.strip() for key in settings.api_keys.split(",") if key.strip()]


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


def api_key_auth(api_keys: Sequence[str], *, broker_url: str) -> AuthDependency:
    """A dependency that lets a request through only with one of `api_keys`."""
    keys = [key.encode("utf-8") for key in api_keys]
    open_without_keys = not keys and broker_kind(broker_url) == "filesystem"

    async def require_api_key(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    ) -> None:
        if open_without_keys:
            return
        if not keys:
            raise _unauthorized(
                f"no API keys are configured: set {API_KEYS_VARIABLE} (comma-separated) "
                "to use the gateway with a shared broker"
            )
        if credentials is None:
            raise _unauthorized("send 'Authorization: Bearer <API key>'")
        given = credentials.credentials.encode("utf-8")
        # Compare with every key, so the time taken says nothing about which one is close.
        matched = False
        for key in keys:
            matched |= hmac.compare_digest(given, key)
        if not matched:
            raise _unauthorized("the API key is not valid")

    return require_api_key
