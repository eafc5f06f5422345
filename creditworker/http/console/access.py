"""Who may use the console: the gateway's API keys, as a bearer header or a session cookie.

The login form takes one of the keys in CREDITWORKER_API_KEYS and sets a session cookie
signed with that key (HMAC-SHA256), so no other secret is needed, sessions survive a
restart and work across gateway replicas, and removing a key from the configuration ends
its sessions. With no key configured the console follows the gateway's rule: open on the
embedded broker only (a single laptop), closed on a shared one.

A session cookie names a random session id, signed with the rest: logging out revokes that
id in this process, so the cookie stops working at once even if someone kept a copy (a
revocation lives in memory until the session would have expired; with several gateway
replicas behind one address, the one that served the logout knows of it). Failed logins are
throttled per client address and for all clients together (`LoginThrottle`).

Every form carries a CSRF token equal to a random cookie (double submit; the cookie is
HttpOnly and SameSite=Strict, so another site can neither read nor send it), and a
request whose Origin header names another host is refused as well.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
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
        self.throttle = LoginThrottle()
        self._revoked: dict[str, int] = {}
        """Session ids logged out, with when the session would have expired anyway."""
        self._revoked_lock = threading.Lock()

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
        session_id = secrets.token_urlsafe(16)
        signature = _signature(matched, identity, expires, session_id)
        return f"{identity}.{expires}.{session_id}.{signature}"

    def logout(self, cookie: str | None) -> None:
        """Revoke the session of `cookie` (if it is a valid one) in this process."""
        parts = self._valid_session(cookie)
        if parts is None:
            return
        _identity, expires, session_id = parts
        now = time.time()
        with self._revoked_lock:
            self._revoked = {sid: until for sid, until in self._revoked.items() if until >= now}
            self._revoked[session_id] = expires

    def _session(self, cookie: str | None) -> Operator | None:
        parts = self._valid_session(cookie)
        if parts is None or parts[2] in self._revoked:
            return None
        return Operator(key_id=parts[0], via="session")

    def _valid_session(self, cookie: str | None) -> tuple[str, int, str] | None:
        """(key id, expiry, session id) of a cookie this server signed and that has not
        expired; None for any other."""
        if not cookie or cookie.count(".") != 3:
            return None
        identity, expires_text, session_id, signature = cookie.split(".")
        key = self.keys_by_id.get(identity)
        if key is None or not expires_text.isdigit() or int(expires_text) < time.time():
            return None
        if not hmac.compare_digest(signature, _signature(key, identity, int(expires_text), session_id)):
            return None
        return identity, int(expires_text), session_id


def _signature(key: bytes, identity: str, expires: int, session_id: str) -> str:
    message = f"creditworker-console-session|{identity}|{expires}|{session_id}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


FREE_FAILURES = 5
"""Failed logins a client may make within FAILURE_WINDOW_SECONDS before it must wait."""
FAILURE_WINDOW_SECONDS = 300.0
LONGEST_WAIT_SECONDS = 60.0
FAILED_LOGIN_DELAY_SECONDS = 0.5
"""Every failed login is answered this much later: guessing from one connection is slow."""
ALL_CLIENTS_FREE_FAILURES = 100
"""Failed logins from all clients together within the window before each further failure is
answered later still (a guesser spread over many addresses), up to LONGEST_WAIT_SECONDS.
It only slows failures: a right key is never refused for what other clients did."""
TRACKED_CLIENTS = 10_000


@dataclass
class LoginThrottle:
    """Failed console logins, per client address and for all clients together.

    A client with more than FREE_FAILURES failures in the window waits 1, 2, 4 ... seconds
    (at most LONGEST_WAIT_SECONDS) before its next attempt is even checked: during the wait
    every attempt, a right key included, is answered 429 with the time left. Only that
    address waits; a success clears it. Failures from all clients together only make the
    failed answers slower, so nobody can lock others out."""

    failures: dict[str, deque[float]] = field(default_factory=dict)
    everyone: deque[float] = field(default_factory=deque)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_seconds(self, client: str, now: float | None = None) -> float:
        """How long `client` must wait before its next attempt is checked (0: at once)."""
        now = time.monotonic() if now is None else now
        with self.lock:
            recent = self._recent(self.failures.get(client), now)
            extra = len(recent) - FREE_FAILURES
            if extra < 0:
                return 0.0
            allowed_at = recent[-1] + min(2.0 ** extra, LONGEST_WAIT_SECONDS)
            return max(0.0, allowed_at - now)

    def failed(self, client: str, now: float | None = None) -> float:
        """Record a failure of `client`; how long its answer should be delayed."""
        now = time.monotonic() if now is None else now
        with self.lock:
            if client not in self.failures and len(self.failures) >= TRACKED_CLIENTS:
                self.failures.pop(next(iter(self.failures)))  # the oldest tracked client
            recent = self.failures.setdefault(client, deque())
            recent.append(now)
            self._recent(recent, now)
            self.everyone.append(now)
            crowd = len(self._recent(self.everyone, now)) - ALL_CLIENTS_FREE_FAILURES
        if crowd <= 0:
            return FAILED_LOGIN_DELAY_SECONDS
        return min(FAILED_LOGIN_DELAY_SECONDS * 2.0 ** min(crowd, 10), LONGEST_WAIT_SECONDS)

    def succeeded(self, client: str) -> None:
        with self.lock:
            self.failures.pop(client, None)

    @staticmethod
    def _recent(times: deque[float] | None, now: float) -> deque[float]:
        if times is None:
            return deque()
        while times and now - times[0] > FAILURE_WINDOW_SECONDS:
            times.popleft()
        return times


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
