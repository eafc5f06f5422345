"""The webhooks service: what the CLI, the gateway, the console and the worker call.

Every check happens before anything is stored: a refused URL or pattern leaves no row.
`deliver_due` is the sender the Celery task runs: it takes due deliveries with a lease,
posts them concurrently (one slow receiver holds one thread for at most the timeout,
never the others), and writes every outcome in one transaction.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.engine import Engine

from creditworker.contract.errors import (
    InvalidWebhookUrl,
    UnknownWebhookDelivery,
    UnknownWebhookEndpoint,
    ValidationFailed,
    WebhookSecretUnreadable,
)
from creditworker.contract.events import WebhookEndpointDisabled
from creditworker.contract.webhooks import (
    CreateWebhookEndpoint,
    UpdateWebhookEndpoint,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEndpointWithSecret,
    checked_patterns,
)
from creditworker.notifications.webhooks import addresses, sending, signing
from creditworker.notifications.webhooks.schedule import RETRY_DELAYS_SECONDS, next_attempt_at
from creditworker.notifications.webhooks.sealing import SecretBox
from creditworker.records import webhooks as store
from creditworker.records.outbox import event_row


@dataclass
class WebhookOptions:
    """What the settings say about webhooks (read at the edge, passed down)."""

    secret_key: str | None = None
    allow_private: bool = False
    timeout_seconds: float = 5.0
    retry_delays_seconds: Sequence[float] = RETRY_DELAYS_SECONDS
    rotation_grace_seconds: float = 24 * 3600
    log_retention_days: float = 30
    batch_size: int = 100
    concurrency: int = 16
    lease_seconds: float = 0
    """How long a sender holds what it took; 0: long enough for a whole batch of posts that
    all run into their timeouts (`lease`)."""

    @property
    def lease(self) -> float:
        if self.lease_seconds:
            return self.lease_seconds
        rounds = -(-self.batch_size // self.concurrency)
        return max(60.0, 3 * self.timeout_seconds * rounds + 30)

    @classmethod
    def from_settings(cls, settings: Any) -> WebhookOptions:
        return cls(
            secret_key=settings.webhooks_secret_key.get_secret_value() if settings.webhooks_secret_key else None,
            allow_private=settings.webhooks_allow_private, timeout_seconds=settings.webhooks_timeout_seconds,
            retry_delays_seconds=tuple(settings.webhooks_retry_delays_seconds),
            rotation_grace_seconds=settings.webhooks_rotation_grace_seconds,
            log_retention_days=settings.webhooks_log_retention_days,
            batch_size=settings.webhooks_batch_size, concurrency=settings.webhooks_concurrency)


@dataclass(frozen=True)
class DeliveryRound:
    """What one `deliver_due` did."""

    sent: int = 0
    succeeded: int = 0
    failed: int = 0
    disabled_endpoints: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"sent": self.sent, "succeeded": self.succeeded, "failed": self.failed,
                "disabled_endpoints": self.disabled_endpoints}


def _now() -> datetime:
    return datetime.now(UTC)


class WebhookService:
    def __init__(self, engine: Engine, options: WebhookOptions | None = None) -> None:
        self.engine = engine
        self.options = options or WebhookOptions()
        self.box = SecretBox(self.options.secret_key)

    # ------------------------------------------------------------ endpoints

    def register(self, request: CreateWebhookEndpoint) -> WebhookEndpointWithSecret:
        """Check, then store an endpoint with a fresh secret; the answer shows the secret once."""
        patterns = checked_patterns(request.events)
        url = addresses.checked_url(request.url, allow_private=self.options.allow_private)
        secret = signing.new_secret()
        at = _now()
        row = store.create_endpoint(self.engine, url=url, event_patterns=patterns,
                                    description=_description(request.description),
                                    sealed_secret=self.box.seal(secret), at=at)
        return WebhookEndpointWithSecret(**store.endpoint_model(row, at).model_dump(), secret=secret)

    def endpoints(self) -> list[WebhookEndpoint]:
        at = _now()
        return [store.endpoint_model(row, at) for row in store.endpoint_rows(self.engine)]

    def endpoint(self, endpoint_id: int) -> WebhookEndpoint:
        return store.endpoint_model(self._row(endpoint_id), _now())

    def update(self, endpoint_id: int, request: UpdateWebhookEndpoint) -> WebhookEndpoint:
        """Change the given fields; enabling clears why it was disabled."""
        changes: dict[str, Any] = {}
        if request.events is not None:
            changes["event_patterns"] = checked_patterns(request.events)
        if request.url is not None:
            changes["url"] = addresses.checked_url(request.url, allow_private=self.options.allow_private)
        if "description" in request.model_fields_set:
            changes["description"] = _description(request.description)
        if request.enabled is not None:
            changes.update({"enabled": True, "disabled_reason": None, "disabled_at": None} if request.enabled
                           else {"enabled": False, "disabled_reason": "disabled by an operator", "disabled_at": _now()})
        self._row(endpoint_id)
        at = _now()
        row = store.update_endpoint(self.engine, endpoint_id, changes, at) if changes else self._row(endpoint_id)
        if row is None:
            raise UnknownWebhookEndpoint(f"no webhook endpoint {endpoint_id}", endpoint_id=endpoint_id)
        return store.endpoint_model(row, at)

    def disable(self, endpoint_id: int) -> WebhookEndpoint:
        return self.update(endpoint_id, UpdateWebhookEndpoint(enabled=False))

    def rotate_secret(self, endpoint_id: int) -> WebhookEndpointWithSecret:
        """A new secret signs from now on; the old one signs too for the grace period, so
        receivers can switch without missing an event."""
        row = self._row(endpoint_id)
        secret = signing.new_secret()
        at = _now()
        updated = store.update_endpoint(self.engine, endpoint_id, {
            "secret": self.box.seal(secret), "previous_secret": row.secret,
            "previous_secret_expires_at": at + timedelta(seconds=self.options.rotation_grace_seconds)}, at)
        if updated is None:
            raise UnknownWebhookEndpoint(f"no webhook endpoint {endpoint_id}", endpoint_id=endpoint_id)
        return WebhookEndpointWithSecret(**store.endpoint_model(updated, at).model_dump(), secret=secret)

    def remove(self, endpoint_id: int) -> None:
        if not store.remove_endpoint(self.engine, endpoint_id):
            raise UnknownWebhookEndpoint(f"no webhook endpoint {endpoint_id}", endpoint_id=endpoint_id)

    def _row(self, endpoint_id: int) -> Any:
        row = store.endpoint_row(self.engine, endpoint_id)
        if row is None:
            raise UnknownWebhookEndpoint(f"no webhook endpoint {endpoint_id}", endpoint_id=endpoint_id)
        return row

    # ------------------------------------------------------------ the log

    def deliveries(self, endpoint_id: int, *, limit: int = 100, before_id: int | None = None) -> list[WebhookDelivery]:
        self._row(endpoint_id)
        if not 1 <= limit <= 1000:
            raise ValidationFailed("limit must be between 1 and 1000", limit=limit)
        return [store.delivery_model(row) for row in
                store.deliveries_of(self.engine, endpoint_id, limit=limit, before_id=before_id)]

    def delivery(self, delivery_id: int) -> WebhookDelivery:
        found = store.delivery_row(self.engine, delivery_id)
        if found is None:
            raise UnknownWebhookDelivery(f"no webhook delivery {delivery_id}", delivery_id=delivery_id)
        row, attempts = found
        return store.delivery_model(row, with_payload=True, log=attempts)

    def replay(self, delivery_id: int) -> WebhookDelivery:
        """Send a delivery again (same `webhook-id`, same body, a fresh retry schedule)."""
        row = store.replay(self.engine, delivery_id, _now())
        if row is None:
            raise UnknownWebhookDelivery(f"no webhook delivery {delivery_id}", delivery_id=delivery_id)
        return store.delivery_model(row)

    def purge(self) -> int:
        """Forget the log older than the retention setting."""
        return store.purge(self.engine, _now() - timedelta(days=self.options.log_retention_days))

    # ------------------------------------------------------------ sending

    def deliver_due(self, *, max_rounds: int = 1000) -> DeliveryRound:
        """Send what is due, batch after batch, until nothing is due (or `max_rounds`)."""
        total = DeliveryRound()
        with sending.client(self.options.timeout_seconds, allow_private=self.options.allow_private) as http, \
                ThreadPoolExecutor(max_workers=self.options.concurrency) as pool:
            for _round in range(max_rounds):
                done = self._deliver_batch(http, pool)
                total = DeliveryRound(total.sent + done.sent, total.succeeded + done.succeeded,
                                      total.failed + done.failed, total.disabled_endpoints + done.disabled_endpoints)
                if done.sent < self.options.batch_size:
                    break
        return total

    def _deliver_batch(self, http: Any, pool: ThreadPoolExecutor) -> DeliveryRound:
        options = self.options
        claimed = store.claim_due(self.engine, _now(), limit=options.batch_size,
                                  lease=timedelta(seconds=options.lease))
        if not claimed:
            return DeliveryRound()
        refused_hosts = self._refused_hosts(claimed)
        outcomes = list(pool.map(lambda delivery: self._attempt(http, delivery, refused_hosts), claimed))
        disabled = store.record_outcomes(self.engine, outcomes, _now(), _disabled_event)
        succeeded = sum(outcome.outcome == "succeeded" for outcome in outcomes)
        return DeliveryRound(len(outcomes), succeeded, len(outcomes) - succeeded, disabled)

    def _refused_hosts(self, claimed: list[store.Claimed]) -> dict[str, str]:
        """Hosts that no longer pass the address check, with why (once per host and batch)."""
        if self.options.allow_private:
            return {}
        refused: dict[str, str] = {}
        for url in {delivery.url for delivery in claimed}:
            parts = urlsplit(url)
            try:
                addresses.check_host(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
            except InvalidWebhookUrl as exc:
                refused[url] = exc.message
        return refused

    def _attempt(self, http: Any, delivery: store.Claimed, refused: dict[str, str]) -> store.Outcome:
        at = _now()
        if delivery.url in refused:
            return self._decide(delivery, sending.Response(None, None, refused[delivery.url], 0), at)
        try:
            secrets_in_use = [self.box.open(delivery.secret)]
            if delivery.previous_secret and delivery.previous_secret_expires_at and \
                    delivery.previous_secret_expires_at > at:
                secrets_in_use.append(self.box.open(delivery.previous_secret))
        except WebhookSecretUnreadable as exc:
            return self._decide(delivery, sending.Response(None, None, exc.message, 0), at)
        body = json.dumps(delivery.payload, separators=(",", ":")).encode()
        headers = signing.headers(secrets_in_use, delivery.event_id, int(at.timestamp()), body)
        response = sending.post(http, delivery.url, body, headers, deadline_seconds=self.options.timeout_seconds)
        return self._decide(delivery, response, _now())

    def _decide(self, delivery: store.Claimed, response: sending.Response, at: datetime) -> store.Outcome:
        status = response.status
        retry_at = None
        if status is not None and 200 <= status < 300:
            outcome = "succeeded"
        elif status == 410:
            outcome = "gone"
        else:
            retry_at = next_attempt_at(self.options.retry_delays_seconds, delivery.run_attempts + 1, at)
            outcome = "failed" if retry_at is not None else "exhausted"
        return store.Outcome(delivery, outcome, status, response.body, response.error, response.duration_ms, retry_at)


def _description(description: str | None) -> str | None:
    """Stripped; None when blank. Control characters other than newlines and tabs are refused
    (PostgreSQL cannot store a NUL, and a log line should read as one)."""
    description = (description or "").strip()
    if any(ord(character) < 0x20 and character not in "\n\t" for character in description):
        raise ValidationFailed("a description may not contain control characters")
    try:
        description.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationFailed("a description must be valid Unicode text (no lone surrogates)") from None
    return description or None


def _disabled_event(endpoint_id: int, url: str, reason: str) -> dict[str, Any]:
    return event_row(WebhookEndpointDisabled(event_id=str(uuid.uuid4()), occurred_at=_now(),
                                             endpoint_id=endpoint_id, url=url, reason=reason))
