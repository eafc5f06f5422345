"""Who may use the console: the gateway's API keys, as a bearer header or a session cookie.

The login form takes one of the keys in CREDITWORKER_API_KEYS and sets a session cookie
signed with that key (HMAC-SHA256), so no other secret is needed, sessions survive a
restart and work across gateway replicas, and removing a key from the configuration ends
its sessions. With no key configured the console follows the gateway's rule: open on the
embedded broker only (a single laptop), closed on a shared one.

Every form carries a CSRF token equal to a random cookie (double submit; the cookie is
HttpOnly and SameSite=Strict, so another site can neither read nor send it), and a
request whose Origin header names another host is refused as well.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi.security.utils import get_authorization_scheme_param
from starlette.requests import Request
from starlette.responses import Response

from creditworker.http.auth import API_KEYS_VARIABLE, ApiKeyCheck

SESSION_COOKIE = "cw_console_session"
CSRF_COOKIE = "cw_console_csrf"
CSRF_FIELD = "csrf_token"
SESSION_SECONDS = 12 * 3600


@dataclass(frozen=True)
class Operator:
    """Who is acting: `key_id` names the API key (a hash prefix, never the key)."""

    key_id: str
    via: str
    """`session`, `bearer` or `open` (no keys, embedded broker)."""


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:16]


class ConsoleAccess:
    """Checks keys and sessions, and issues session and CSRF cookies."""

    def __init__(self, api_keys: Sequence[str], *, broker_url: str) -> None:
        self.check = ApiKeyCheck(api_keys, broker_url=broker_url)
        self.keys_by_id = {key_id(key): key for key in self.check.keys}

    @property
    def open(self) -> bool:
        return self.check.open_without_keys

    def closed_reason(self) -> str | None:
        """Why nobody can log in (no keys on a shared broker); None when a key can."""
        if self.check.keys or self.open:
            return None
        return f"no API keys are configured: set {API_KEYS_VARIABLE} to use the console"

    def operator(self, request: Request) -> Operator | None:
        """The operator behind a request, or None (log in first)."""
        if self.open:
            return Operator(key_id="open", via="open")
        authorization = request.headers.get("authorization")
        if authorization:
            if self.check.refusal(authorization) is None:
                _, credentials = get_authorization_scheme_param(authorization)
                return Operator(key_id=key_id(credentials.encode("latin-1")), via="bearer")
            return None
        return self._session(request.cookies.get(SESSION_COOKIE))

    def login(self, given_key: str) -> str | None:
        """A session cookie value for a valid key; None for any other."""
        given = given_key.strip().encode("utf-8")
        matched: bytes | None = None
        for key in self.check.keys:  # compare with every key: the time says nothing
            if hmac.compare_digest(given, key):
                matched = key
        if matched is None:
            return None
        expires = int(time.time()) + SESSION_SECONDS
        identity = key_id(matched)
        return f"{identity}.{expires}.{_signature(matched, identity, expires)}"

    def _session(self, cookie: str | None) -> Operator | None:
        if not cookie or cookie.count(".") != 2:
            return None
        identity, expires_text, signature = cookie.split(".")
        key = self.keys_by_id.get(identity)
        if key is None or not expires_text.isdigit() or int(expires_text) < time.time():
            return None
        if not hmac.compare_digest(signature, _signature(key, identity, int(expires_text))):
            return None
        return Operator(key_id=identity, via="session")


def _signature(key: bytes, identity: str, expires: int) -> str:
    message = f"creditworker-console-session|{identity}|{expires}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def cookie_path(request: Request) -> str:
    """The console's own path (behind a mount or a proxy prefix), so cookies stay in it."""
    return str(request.scope.get("root_path") or "") or "/"


def set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path=cookie_path(request), httponly=True,
        samesite="strict", secure=request.url.scheme == "https",
    )


def csrf_token(request: Request) -> tuple[str, bool]:
    """The request's CSRF token, and whether it is new (so the response must set it)."""
    existing = request.cookies.get(CSRF_COOKIE)
    if existing and 20 <= len(existing) <= 100:
        return existing, False
    return secrets.token_urlsafe(32), True


def csrf_refusal(request: Request, submitted: str | None) -> str | None:
    """Why a form post is refused as a possible forgery; None lets it through."""
    origin = request.headers.get("origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host", ""):
        return "the form was posted from another site"
    expected = request.cookies.get(CSRF_COOKIE)
    if not submitted or not expected:
        return "the form has no CSRF token: reload the page and try again"
    if not hmac.compare_digest(submitted.encode(), expected.encode()):
        return "the form's CSRF token is not this browser's: reload the page and try again"
    return None
