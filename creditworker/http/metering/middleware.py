"""Reserve-then-deduct metering for any ASGI app (FastAPI, Starlette): charge what each
request actually used.

Before the request, the middleware reserves the caller's estimate (so a user who cannot
pay is refused with 402 before any work); after it, it reads the real usage from the JSON
response and commits exactly that, or releases the hold when the response is an error,
not JSON, or names no usage.

Two ways to reach the engine, one behaviour (`meters.py`): `credit_service=` an engine in
this process (`CreditService`, whose calls run in the thread pool, or `AsyncCreditService`,
awaited), a few milliseconds a request; or `client=AsyncCreditClient()`, through the broker
and the workers.

Request ids (X-Request-ID, or a fresh one) are scoped per user: the idempotency keys are
`mw:{digest of (user id, request id)}:{step}`, so one user cannot collide with another's
ids. Each request id runs the endpoint at most once per user: a reuse, whether the first
request was charged, failed or is still running, is refused with 409
(`idempotency_conflict`) before the endpoint runs, so no response is ever served without
its charge. A client that retries a failed request sends a new id. (The reserve carries a
fresh attempt id in its metadata; the same key with other metadata is the engine's
idempotency conflict, which is what tells a reuse from a first use, in both modes.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from creditworker.contract import DEFAULT_RESERVATION_TTL_SECONDS, MAX_AMOUNT, ReservationStatus
from creditworker.errors import (
    CreditError,
    IdempotencyConflict,
    InsufficientCredits,
    ReservationNotActive,
    UnknownUser,
    ValidationFailed,
)
from creditworker.http.metering.meters import Meter, meter_for
from creditworker.http.responses import credit_error_response, error_response
from producers.client import DEFAULT_TIMEOUT

logger = logging.getLogger(__name__)

DEDUCTED_HEADER = "X-Credits-Deducted"


@dataclass(frozen=True)
class _Attempt:
    """One metered request: who pays, what was held, and the keys that make it idempotent."""

    user_id: str
    request_id: str
    reservation_id: str
    description: str

    def key(self, step: str) -> str:
        return idempotency_key(self.user_id, self.request_id, step)


def idempotency_key(user_id: str, request_id: str, step: str) -> str:
    """`mw:{digest}:{step}`, the digest of (user id, request id): per user, of bounded length
    whatever the header holds, and never the same for two different pairs."""
    digest = hashlib.sha256(f"{len(user_id)}:{user_id}:{request_id}".encode()).hexdigest()[:40]
    return f"mw:{digest}:{step}"


class CreditDeductionMiddleware:
    """Charge each request under `path_prefix` the usage its JSON response reports.

    Give exactly one of `credit_service` (an engine in this process, sync or async) and
    `client` (an `AsyncCreditClient`: through the workers). `path_prefix` matches whole
    path segments (`/api` meters `/api` and `/api/x`, not `/apix`); `skip_paths` too.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        credit_service: Any = None,
        client: Any = None,
        path_prefix: str = "/",
        user_id_header: str = "X-User-ID",
        user_id_from: Callable[[Request], str | None] | None = None,
        estimated_tokens_header: str = "X-Estimated-Tokens",
        default_estimated_tokens: int = 1,
        response_usage_key: str = "usage.total_tokens",
        skip_paths: Sequence[str] = (),
        request_id_header: str = "X-Request-ID",
        reservation_ttl_seconds: int = DEFAULT_RESERVATION_TTL_SECONDS,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.app = app
        self.meter: Meter = meter_for(credit_service=credit_service, client=client, timeout=timeout)
        self.path_prefix = path_prefix.rstrip("/")
        self.user_id_from = user_id_from or (lambda request: request.headers.get(user_id_header))
        self.estimated_tokens_header = estimated_tokens_header
        self.default_estimated_tokens = default_estimated_tokens
        self.usage_path = response_usage_key.split(".")
        self.skip_paths = [path.rstrip("/") for path in skip_paths]
        self.request_id_header = request_id_header
        self.reservation_ttl_seconds = reservation_ttl_seconds
        self.timeout = timeout

    def _metered(self, path: str) -> bool:
        return _under(path, self.path_prefix) and not any(
            _under(path, skip) for skip in self.skip_paths
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._metered(scope["path"]):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        user_id = self.user_id_from(request)
        if not user_id:
            response = error_response(
                401, "unauthorized", "this route is metered: the request names no user"
            )
            await response(scope, receive, send)
            return
        try:
            attempt = await self._reserve(request, user_id)
        except CreditError as exc:
            refusal = exc if not isinstance(exc, UnknownUser) else InsufficientCredits(
                exc.message, **exc.details
            )  # a user with no account has no credits: payment required, not "not found"
            await credit_error_response(refusal)(scope, receive, send)
            return
        await self._run_metered(attempt, scope, receive, send)

    async def _reserve(self, request: Request, user_id: str) -> _Attempt:
        raw_estimate = request.headers.get(self.estimated_tokens_header)
        try:
            estimate = self.default_estimated_tokens if raw_estimate is None else int(raw_estimate)
        except ValueError:
            raise ValidationFailed(
                f"{self.estimated_tokens_header} must be a whole number", value=raw_estimate
            ) from None
        request_id = request.headers.get(self.request_id_header) or uuid.uuid4().hex
        description = f"{request.method} {request.url.path}"
        try:
            reservation = await self.meter.reserve(
                user_id, estimate, ttl_seconds=self.reservation_ttl_seconds, description=description,
                metadata={"request_id": request_id, "attempt": uuid.uuid4().hex},
                idempotency_key=idempotency_key(user_id, request_id, "reserve"),
            )
        except IdempotencyConflict:
            raise IdempotencyConflict(
                f"request id {request_id!r} was already used by an earlier request of this user; "
                f"send a new {self.request_id_header} to run the request again",
                request_id=request_id,
            ) from None
        return _Attempt(user_id, request_id, reservation.id, description)

    async def _run_metered(
        self, attempt: _Attempt, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Run the app, holding a JSON success back until its usage is charged."""
        start: Message | None = None
        body = bytearray()
        passing_through = False

        async def hold_back(message: Message) -> None:
            nonlocal start, passing_through
            if passing_through:
                await send(message)
            elif message["type"] == "http.response.start":
                start = message
                if not (200 <= message["status"] < 300 and _is_json(message)):
                    passing_through = True  # errors and non-JSON stream on, uncharged
                    await self._release(attempt)
                    await send(message)
            elif message["type"] == "http.response.body":
                body.extend(message.get("body", b""))

        try:
            await self.app(scope, receive, hold_back)
        except BaseException:
            if not passing_through:
                await self._release(attempt)
            raise
        if passing_through or start is None:
            return
        try:
            deducted = await self._settle(attempt, self._usage(bytes(body)))
        except CreditError as exc:
            await credit_error_response(exc)(scope, receive, send)
            return
        deducted_header = (DEDUCTED_HEADER.lower().encode(), str(deducted).encode())
        headers = [*start.get("headers", []), deducted_header]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": bytes(body), "more_body": False})

    def _usage(self, body: bytes) -> int | None:
        """The usage the response reports at `response_usage_key`; None if it names none."""
        try:
            value: Any = json.loads(body)
        except ValueError:
            return None
        for part in self.usage_path:
            if not isinstance(value, dict) or part not in value:
                return None
            value = value[part]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_AMOUNT:
            return None
        return value

    async def _settle(self, attempt: _Attempt, usage: int | None) -> int:
        """Charge `usage` against the hold; returns what was charged.

        Raises `InsufficientCredits` (after releasing the hold) when the usage beyond the
        estimate cannot be paid, and `ServiceUnavailable` when the engine does not answer:
        the response is then withheld.
        """
        if not usage:
            await self._release(attempt)
            return 0
        try:
            entry = await self.meter.commit(attempt.reservation_id, usage, idempotency_key=attempt.key("commit"))
            return -entry.amount
        except InsufficientCredits:
            await self._release(attempt)
            raise
        except ReservationNotActive as exc:
            if exc.details.get("status") == ReservationStatus.COMMITTED.value:
                raise  # cannot happen: this attempt alone commits its hold
        # The hold outlived its TTL while the app ran: the usage is deducted directly.
        entry = await self.meter.deduct(
            attempt.user_id, usage, description=attempt.description,
            metadata={"request_id": attempt.request_id}, idempotency_key=attempt.key("deduct"),
        )
        return -entry.amount

    async def _release(self, attempt: _Attempt) -> None:
        """Free the hold; if that fails the hold still ends when its TTL runs out."""
        try:
            await self.meter.release(attempt.reservation_id, idempotency_key=attempt.key("release"))
        except ReservationNotActive:
            pass  # it outlived its TTL
        except CreditError as exc:
            logger.warning("could not release reservation %s: %s", attempt.reservation_id, exc)


def _under(path: str, prefix: str) -> bool:
    """`path` is `prefix` or below it, segment by segment (`prefix` without its final `/`)."""
    return not prefix or path == prefix or path.startswith(prefix + "/")


def _is_json(start: Message) -> bool:
    for name, value in start.get("headers", []):
        if name.lower() == b"content-type":
            media_type = value.decode("latin-1").split(";")[0].strip().lower()
            return media_type == "application/json" or media_type.endswith("+json")
    return False
