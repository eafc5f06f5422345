"""Reserve-then-charge metering for any ASGI app (FastAPI, Starlette): charge what each
request actually used.

Before the request, the middleware reserves the caller's estimate (so a user who cannot
pay is refused with 402 before any work); after it, it charges the real usage against the
hold. The usage comes from, first to last: `request.state.credit_usage` (set by the
endpoint: credits as an int, or a usage object of token kinds), the JSON response (held back
until charged, then sent with `X-Credits-Deducted`), or the last event of a streamed response
that names one (`text/event-stream`, `application/x-ndjson`: chunks pass through as they
come, the charge is made before the stream's end goes out). A `rate_card` prices usage
objects per model and kind of token. No usable usage is `on_missing_usage`: release the
hold (default) or charge it.

Two ways to reach the engine, one behaviour (`meters.py`): `credit_service=` an engine in
this process (`CreditService`, whose calls run in the thread pool, or `AsyncCreditService`,
awaited); or `client=AsyncCreditClient()`, through the broker and the workers.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from creditworker.client.handle import DEFAULT_TIMEOUT
from creditworker.contract.credits import (
    DEFAULT_RESERVATION_TTL_SECONDS,
    MAX_AMOUNT,
    ReservationStatus,
)
from creditworker.contract.errors import (
    CreditError,
    IdempotencyConflict,
    InsufficientCredits,
    ReservationNotActive,
    UnknownUser,
    ValidationFailed,
)
from creditworker.http.metering.meters import Meter, meter_for
from creditworker.http.metering.rate_cards import RateCard, UnknownModel
from creditworker.http.metering.streams import EventReader, stream_media_type
from creditworker.http.metering.usage import UsageError, whole_credits
from creditworker.http.responses import credit_error_response, error_response

logger = logging.getLogger(__name__)

DEDUCTED_HEADER = "X-Credits-Deducted"
STATE_USAGE = "credit_usage"
"""`request.state.credit_usage`: what the endpoint reports it used (wins over the body)."""
MissingUsagePolicy = Literal["release", "estimate"]


@dataclass(frozen=True)
class _Attempt:
    """One metered request: who pays, what was held, and the keys that make it idempotent."""

    user_id: str
    request_id: str
    reservation_id: str
    description: str
    held: int
    request_model: str | None

    def key(self, step: str) -> str:
        return idempotency_key(self.user_id, self.request_id, step)


@dataclass
class _Report:
    """What the response said about its usage, as it went by."""

    response: str = "json"
    """How it answered: `json` (held back), `stream`, or `other` (passed through)."""
    usage: Any = None
    """The usage found in the body or the last event that had one (a number or a mapping)."""
    model: str | None = None
    endpoint_usage: Any = None
    """`request.state.credit_usage`, read when the response ends."""
    cut_short: bool = False


class _Unpriced(Exception):
    """The model of a finished response has no price: the request must not go free."""


def idempotency_key(user_id: str, request_id: str, step: str) -> str:
    """`mw:{digest}:{step}`, the digest of (user id, request id): per user, of bounded length
    whatever the header holds, and never the same for two different pairs."""
    digest = hashlib.sha256(f"{len(user_id)}:{user_id}:{request_id}".encode()).hexdigest()[:40]
    return f"mw:{digest}:{step}"


class CreditDeductionMiddleware:
    """Charge each request under `path_prefix` the usage it reports.

    Give exactly one of `credit_service` (an engine in this process, sync or async) and
    `client` (an `AsyncCreditClient`: through the workers). `path_prefix` and `skip_paths`
    match whole path segments of the path as the app routes it (below its `root_path`:
    mounted, or behind a proxy prefix). `rate_card` (a `RateCard`, a mapping, or a TOML/JSON
    file path) prices usage objects per model; it is checked when the app starts.
    `response_usage_key` is a dot path into the JSON response or event: default
    `usage.total_tokens` (one number), or `usage` (the usage object) with a rate card.
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
        response_usage_key: str | None = None,
        rate_card: RateCard | Mapping[str, Mapping[str, Any]] | str | Path | None = None,
        on_missing_usage: MissingUsagePolicy = "release",
        skip_paths: Sequence[str] = (),
        request_id_header: str = "X-Request-ID",
        reservation_ttl_seconds: int = DEFAULT_RESERVATION_TTL_SECONDS,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if on_missing_usage not in ("release", "estimate"):
            raise ValueError(f"on_missing_usage is 'release' or 'estimate', not {on_missing_usage!r}")
        self.app = app
        self.meter: Meter = meter_for(credit_service=credit_service, client=client, timeout=timeout)
        self.path_prefix = path_prefix.rstrip("/")
        self.user_id_from = user_id_from or (lambda request: request.headers.get(user_id_header))
        self.estimated_tokens_header = estimated_tokens_header
        self.default_estimated_tokens = default_estimated_tokens
        self.rate_card = rate_card if isinstance(rate_card, RateCard) or rate_card is None else RateCard(rate_card)
        usage_key = response_usage_key or ("usage" if self.rate_card else "usage.total_tokens")
        self.usage_path = usage_key.split(".")
        self.on_missing_usage = on_missing_usage
        self.skip_paths = [path.rstrip("/") for path in skip_paths]
        self.request_id_header = request_id_header
        self.reservation_ttl_seconds = reservation_ttl_seconds
        self.timeout = timeout

    def _metered(self, path: str) -> bool:
        return _under(path, self.path_prefix) and not any(
            _under(path, skip) for skip in self.skip_paths
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._metered(route_path(scope)):
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
        request_model = None
        if self.rate_card is not None:
            body, receive = await _read_body(receive)
            request_model = _model_of(_json(body))
        try:
            attempt = await self._reserve(request, user_id, request_model)
        except UnknownModel as exc:
            logger.error("metering: %s %s not served: %s", request.method, request.url.path, exc)
            await error_response(500, "unpriced_model", str(exc))(scope, receive, send)
            return
        except CreditError as exc:
            refusal = exc if not isinstance(exc, UnknownUser) else InsufficientCredits(
                exc.message, **exc.details
            )  # a user with no account has no credits: payment required, not "not found"
            await credit_error_response(refusal)(scope, receive, send)
            return
        await self._run_metered(attempt, scope, receive, send)

    async def _reserve(self, request: Request, user_id: str, request_model: str | None) -> _Attempt:
        raw_estimate = request.headers.get(self.estimated_tokens_header)
        try:
            tokens = self.default_estimated_tokens if raw_estimate is None else int(raw_estimate)
        except ValueError:
            tokens = 0
        if tokens <= 0:
            raise ValidationFailed(
                f"{self.estimated_tokens_header} must be a positive whole number", value=raw_estimate
            )
        estimate = tokens if self.rate_card is None else self.rate_card.estimate(request_model, tokens)
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
        return _Attempt(user_id, request_id, reservation.id, description, estimate, request_model)

    async def _run_metered(
        self, attempt: _Attempt, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Run the app: a JSON success is held back until charged; anything else passes
        through as it comes and is charged before its last message goes out."""
        state: dict[str, Any] = scope.setdefault("state", {})
        report = _Report()
        start: Message | None = None
        body = bytearray()
        reader: EventReader | None = None
        settled = False

        async def watch(message: Message) -> None:
            nonlocal start, reader, settled
            if message["type"] == "http.response.start":
                start = message
                media_type = _media_type(message)
                success = 200 <= message["status"] < 300
                if success and (media_type == "application/json" or media_type.endswith("+json")):
                    return  # held back until charged
                report.response = "other"
                if success and stream_media_type(media_type):
                    report.response = "stream"
                    reader = EventReader(media_type, [self.usage_path[0], "model"])
                await send(message)
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            chunk: bytes = message.get("body", b"")
            if report.response == "json":
                body.extend(chunk)
                return
            if message.get("more_body", False):
                await send(message)
                if reader is not None:
                    self._read_events(reader.feed(chunk), report)
                return
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if reader is not None:
                self._read_events(reader.feed(chunk) + reader.close(), report)
            settled = True
            report.endpoint_usage = state.get(STATE_USAGE)
            await self._settle_passed(attempt, report)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await self.app(scope, receive, watch)
        except BaseException:
            if not settled:
                report.cut_short = start is not None
                report.endpoint_usage = state.get(STATE_USAGE)
                with anyio.CancelScope(shield=True):
                    await self._settle_passed(attempt, report)
            raise
        if settled:
            return
        report.endpoint_usage = state.get(STATE_USAGE)
        if start is None or report.response != "json":
            report.cut_short = start is not None  # it ended without its last message
            await self._settle_passed(attempt, report)
            return
        report.usage, report.model = self._find(_json(bytes(body)))
        try:
            deducted = await self._settle(attempt, report)
        except _Unpriced as exc:
            logger.error("metering: %s for user %r (request id %r) withheld with 500: %s",
                         attempt.description, attempt.user_id, attempt.request_id, exc)
            await self._release(attempt)
            await error_response(500, "unpriced_model", str(exc))(scope, receive, send)
            return
        except CreditError as exc:
            await self._release(attempt)
            await credit_error_response(exc)(scope, receive, send)
            return
        deducted_header = (DEDUCTED_HEADER.lower().encode(), str(deducted).encode())
        headers = [*start.get("headers", []), deducted_header]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": bytes(body), "more_body": False})

    def _find(self, document: Any) -> tuple[Any, str | None]:
        """The usage at `response_usage_key` in a JSON document (None: it names none), and
        the model it names."""
        value = document
        for part in self.usage_path:
            if not isinstance(value, dict) or part not in value:
                return None, _model_of(document)
            value = value[part]
        return value, _model_of(document)

    def _read_events(self, events: list[Any], report: _Report) -> None:
        for event in events:
            usage, model = self._find(event)
            if usage is not None:
                report.usage = usage
            if model is not None:
                report.model = model

    def _credits(self, attempt: _Attempt, report: _Report) -> tuple[int | None, dict[str, Any]]:
        """What the report charges, in credits (None: no usable usage), and what the ledger
        entry's metadata says about it. Raises `_Unpriced` for a model the card cannot price."""
        metadata: dict[str, Any] = {"request_id": attempt.request_id, "response": report.response}
        if report.cut_short:
            metadata["cut_short"] = True
        usage, source = report.usage, "response"
        if report.endpoint_usage is not None:
            usage, source = report.endpoint_usage, "endpoint"
        if usage is None:
            return None, metadata
        metadata["usage_from"] = source
        try:
            if source == "endpoint" and not isinstance(usage, Mapping):
                return whole_credits(usage, what=f"request.state.{STATE_USAGE}"), metadata
            if self.rate_card is None:
                if isinstance(usage, Mapping):
                    kind = self.usage_path[-1]
                    if kind not in usage:
                        raise UsageError(f"the usage object names no {kind!r}")
                    usage = usage[kind]
                return whole_credits(usage), metadata
            if not isinstance(usage, Mapping):
                usage = {self.usage_path[-1]: usage}
            try:
                name, _rates = self.rate_card.rates_for(report.model, attempt.request_model)
                credits = self.rate_card.price(report.model, usage, attempt.request_model)
            except UnknownModel as exc:
                raise _Unpriced(str(exc)) from None
            metadata["model"] = name
            return credits, metadata
        except UsageError as exc:
            logger.warning("metering: %s for user %r (request id %r) has an unusable usage, "
                           "treated as none (on_missing_usage=%r): %s", attempt.description,
                           attempt.user_id, attempt.request_id, self.on_missing_usage, exc)
            return None, metadata

    async def _settle(self, attempt: _Attempt, report: _Report) -> int:
        """Charge the report's usage against the hold; returns what was charged.

        Raises, leaving the hold to the caller, `InsufficientCredits` when the usage beyond the
        estimate cannot be paid (or is above the most one charge may take), `_Unpriced` for a
        model without a price, and `ServiceUnavailable` when the engine does not answer.
        """
        credits, metadata = self._credits(attempt, report)
        if credits is None:
            if self.on_missing_usage == "release":
                await self._release(attempt)
                return 0
            credits, metadata["usage_from"] = attempt.held, "estimate"
        if credits == 0:
            await self._release(attempt)
            return 0
        if credits > MAX_AMOUNT:
            raise InsufficientCredits(
                f"usage of {credits} credits is above the most one charge may take ({MAX_AMOUNT})",
                user_id=attempt.user_id, requested=credits,
            )
        return await self._commit(attempt, credits, metadata)

    async def _settle_passed(self, attempt: _Attempt, report: _Report) -> int:
        """`_settle` for a response that already went out: a refusal cannot withhold it, so
        the hold itself is charged (an unpriced model, usage the user cannot pay), and an
        engine that does not answer leaves the hold to its TTL."""
        try:
            return await self._settle(attempt, report)
        except (_Unpriced, InsufficientCredits) as exc:
            logger.error("metering: %s for user %r (request id %r) was already sent; charging "
                         "its hold of %d instead: %s", attempt.description, attempt.user_id,
                         attempt.request_id, attempt.held, exc)
            metadata = {"request_id": attempt.request_id, "response": report.response,
                        "usage_from": "estimate", "refused": str(exc)[:200]}
            try:
                return await self._commit(attempt, attempt.held, metadata, step="commit-held")
            except CreditError as again:
                logger.error("metering: could not charge the hold of %s: %s", attempt.reservation_id, again)
                return 0
        except CreditError as exc:
            logger.error("metering: could not settle %s (the hold ends with its TTL): %s",
                         attempt.reservation_id, exc)
            return 0

    async def _commit(self, attempt: _Attempt, credits: int, metadata: dict[str, Any],
                      step: str = "commit") -> int:
        """Commit `credits` against the hold; a hold that outlived its TTL while the app ran
        is charged by a direct deduction instead."""
        try:
            entry = await self.meter.commit(attempt.reservation_id, credits, metadata=metadata,
                                            idempotency_key=attempt.key(step))
            return -entry.amount
        except ReservationNotActive as exc:
            if exc.details.get("status") == ReservationStatus.COMMITTED.value:
                raise  # cannot happen: this attempt alone commits its hold
        entry = await self.meter.deduct(
            attempt.user_id, credits, description=attempt.description,
            metadata=metadata, idempotency_key=attempt.key("deduct" if step == "commit" else f"deduct-{step}"),
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


def route_path(scope: Scope) -> str:
    """The path the app routes on: below its `root_path` (mounted, `--root-path`, or both)."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "").rstrip("/")
    if root_path and (path == root_path or path.startswith(root_path + "/")):
        return path[len(root_path):] or "/"
    return path


def _under(path: str, prefix: str) -> bool:
    """`path` is `prefix` or below it, segment by segment (`prefix` without its final `/`)."""
    return not prefix or path == prefix or path.startswith(prefix + "/")


def _media_type(start: Message) -> str:
    for name, value in start.get("headers", []):
        if name.lower() == b"content-type":
            return str(value.decode("latin-1").split(";")[0].strip().lower())
    return ""


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _model_of(document: Any) -> str | None:
    model = document.get("model") if isinstance(document, dict) else None
    return model if isinstance(model, str) else None


async def _read_body(receive: Receive) -> tuple[bytes, Receive]:
    """The whole request body (a rate card needs its model before the hold is priced), and
    a `receive` that hands it to the app as if unread."""
    chunks: list[bytes] = []
    pending: list[Message] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            pending.append(message)  # the client left: the app hears it after the body
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    pending.insert(0, {"type": "http.request", "body": body, "more_body": False})

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return body, replay
