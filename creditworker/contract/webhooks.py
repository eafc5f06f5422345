"""Webhook endpoints and deliveries as the edges show them, and the event patterns they use.

Patterns read as on the topic exchange: words split by `.`, `*` stands for one word and `#`
for any number of words (`credits.*`, `#`). A pattern must match at least one event type
creditworker publishes, so a typo is refused instead of silently receiving nothing.
Pydantic only, like the rest of the contract.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from creditworker.contract.errors import UnknownEventPattern
from creditworker.contract.events import ROUTING_KEYS

MAX_URL_LENGTH = 2000
MAX_DESCRIPTION_LENGTH = 500
MAX_PATTERNS = 50
ALL_EVENTS = "#"


def topic_matches(pattern: str, routing_key: str) -> bool:
    """Whether `routing_key` matches the topic `pattern` (`*` one word, `#` zero or more)."""
    return _match(pattern.split("."), routing_key.split("."))


def _match(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[skip:]) for skip in range(len(words) + 1))
    if not words:
        return False
    return (head == "*" or head == words[0]) and _match(rest, words[1:])


def checked_patterns(patterns: list[str] | None) -> list[str]:
    """The patterns without blanks and repeats, each matching a published event type;
    none given means every event (`#`). Raises `UnknownEventPattern` naming the bad one."""
    cleaned: list[str] = []
    for pattern in patterns or [ALL_EVENTS]:
        pattern = pattern.strip()
        if pattern and pattern not in cleaned:
            cleaned.append(pattern)
    if not cleaned:
        raise UnknownEventPattern("give at least one event pattern, e.g. credits.* or #")
    if len(cleaned) > MAX_PATTERNS:
        raise UnknownEventPattern(f"at most {MAX_PATTERNS} event patterns per endpoint")
    for pattern in cleaned:
        if not any(topic_matches(pattern, key) for key in ROUTING_KEYS):
            raise UnknownEventPattern(
                f"event pattern {pattern!r} matches no event type; the types are {', '.join(ROUTING_KEYS)}"
                " (`*` stands for one word, `#` for any number)",
                pattern=pattern, event_types=list(ROUTING_KEYS))
    return cleaned


class CreateWebhookEndpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=MAX_URL_LENGTH)
    events: list[str] | None = Field(default=None, max_length=MAX_PATTERNS)
    """Event patterns; none: every event."""
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION_LENGTH)


class UpdateWebhookEndpoint(BaseModel):
    """The fields given change; the others stay."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, max_length=MAX_URL_LENGTH)
    events: list[str] | None = Field(default=None, max_length=MAX_PATTERNS)
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION_LENGTH)
    enabled: bool | None = None


class WebhookEndpoint(BaseModel):
    id: int
    url: str
    description: str | None
    events: list[str]
    enabled: bool
    disabled_reason: str | None
    disabled_at: datetime | None
    last_success_at: datetime | None
    rotating_until: datetime | None
    """While a rotated-out secret still signs (its grace period), when that ends."""
    created_at: datetime
    updated_at: datetime


class WebhookEndpointWithSecret(WebhookEndpoint):
    """What registering or rotating answers, the only time the secret is shown."""

    secret: str


class WebhookAttempt(BaseModel):
    id: int
    attempt: int
    outcome: str
    response_status: int | None
    response_body: str | None
    error: str | None
    duration_ms: int
    attempted_at: datetime


class WebhookDelivery(BaseModel):
    id: int
    endpoint_id: int
    event_id: str
    event_type: str
    status: str
    """`pending` (queued or waiting for a retry), `succeeded` or `failed` (schedule ran out,
    or the endpoint answered 410)."""
    attempts: int
    next_attempt_at: datetime | None
    last_response_status: int | None
    created_at: datetime
    updated_at: datetime
    payload: dict[str, Any] | None = None
    log: list[WebhookAttempt] | None = None
