"""Webhook endpoints, their deliveries and the attempts log, in SQL.

Deliveries are queued by the outbox relay, in the transaction that marks the events
published (`fan_out`, handed to `outbox.publish_pending` as `also`): an event committed is
queued for every endpoint that wants it, once. Senders take due deliveries with
`FOR UPDATE SKIP LOCKED` and a lease (`claim_due`): two senders never hold one delivery at
once, and one that dies gives it back when the lease runs out. Secrets arrive here sealed
(or not) by the caller; this module stores strings and knows nothing of HTTP or signing.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, bindparam, delete, func, insert, select, update
from sqlalchemy.engine import Connection, Engine

from creditworker.contract.webhooks import (
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    topic_matches,
)
from creditworker.storage.tables import (
    Account,
    OutboxEvent,
    WebhookAttemptRow,
    WebhookDeliveryRow,
    WebhookEndpointRow,
)
from creditworker.storage.transaction import run_transaction

endpoints_table = cast(Table, WebhookEndpointRow.__table__)
deliveries_table = cast(Table, WebhookDeliveryRow.__table__)
attempts_table = cast(Table, WebhookAttemptRow.__table__)
accounts_table = cast(Table, Account.__table__)
outbox_table = cast(Table, OutboxEvent.__table__)

MAX_STORED_RESPONSE = 1024
"""Characters of a receiver's answer kept in the log."""


# ---------------------------------------------------------------- endpoints


def endpoint_model(row: Any, at: datetime | None = None) -> WebhookEndpoint:
    rotating = row.previous_secret_expires_at if row.previous_secret is not None else None
    if rotating is not None and at is not None and rotating <= at:
        rotating = None
    return WebhookEndpoint(
        id=row.id, url=row.url, description=row.description, events=list(row.event_patterns),
        enabled=bool(row.enabled), disabled_reason=row.disabled_reason, disabled_at=row.disabled_at,
        last_success_at=row.last_success_at, rotating_until=rotating,
        created_at=row.created_at, updated_at=row.updated_at)


def create_endpoint(engine: Engine, *, url: str, event_patterns: list[str], description: str | None,
                    sealed_secret: str, at: datetime) -> Any:
    """Insert an endpoint; returns its row."""
    def work(connection: Connection) -> Any:
        endpoint_id = connection.execute(insert(endpoints_table).values(
            url=url, description=description, event_patterns=event_patterns, secret=sealed_secret,
            enabled=True, created_at=at, updated_at=at)).inserted_primary_key[0]
        return connection.execute(select(endpoints_table).where(endpoints_table.c.id == endpoint_id)).one()
    return run_transaction(engine, work)


def endpoint_row(engine: Engine, endpoint_id: int) -> Any | None:
    with engine.connect() as connection:
        return connection.execute(select(endpoints_table).where(endpoints_table.c.id == endpoint_id)).first()


def endpoint_rows(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        return list(connection.execute(select(endpoints_table).order_by(endpoints_table.c.id)).all())


def update_endpoint(engine: Engine, endpoint_id: int, changes: dict[str, Any], at: datetime) -> Any | None:
    """Apply `changes` (column: value) to an endpoint; its row after, or None if unknown."""
    def work(connection: Connection) -> Any | None:
        result = connection.execute(update(endpoints_table).where(endpoints_table.c.id == endpoint_id)
                                    .values(**changes, updated_at=at))
        if result.rowcount == 0:
            return None
        return connection.execute(select(endpoints_table).where(endpoints_table.c.id == endpoint_id)).one()
    return run_transaction(engine, work)


def remove_endpoint(engine: Engine, endpoint_id: int) -> bool:
    """Delete an endpoint with its deliveries and their log; whether it existed."""
    def work(connection: Connection) -> bool:
        connection.execute(delete(attempts_table).where(attempts_table.c.endpoint_id == endpoint_id))
        connection.execute(delete(deliveries_table).where(deliveries_table.c.endpoint_id == endpoint_id))
        return connection.execute(delete(endpoints_table).where(endpoints_table.c.id == endpoint_id)).rowcount > 0
    return run_transaction(engine, work)


# ---------------------------------------------------------------- queueing


def fan_out(connection: Connection, events: Sequence[Any], at: datetime) -> int:
    """Queue a delivery of each event (`routing_key`, `payload`, `event_id`) for every enabled
    endpoint whose patterns match it; returns how many were queued.

    The body is built now, in Standard Webhooks' shape (`type`, `timestamp`, `data`).
    Deliveries may arrive out of order, so each carries the account's whole balance: the
    event's own snapshot (written with the change), or for an event written without one,
    the account as this transaction reads it.
    """
    endpoints = connection.execute(
        select(endpoints_table.c.id, endpoints_table.c.event_patterns).where(endpoints_table.c.enabled.is_(True))
    ).all()
    if not endpoints:
        return 0
    wanted = [(event, [endpoint.id for endpoint in endpoints
                       if any(topic_matches(pattern, event.routing_key) for pattern in endpoint.event_patterns)])
              for event in events]
    wanted = [(event, ids) for event, ids in wanted if ids]
    if not wanted:
        return 0
    snapshots = _snapshots(connection, {str(event.payload["user_id"]) for event, _ids in wanted
                                        if event.payload.get("user_id") and not event.payload.get("account")})
    rows = []
    for event, endpoint_ids in wanted:
        data = dict(event.payload)
        user_id = data.get("user_id")
        if user_id and not data.get("account"):
            data["account"] = snapshots.get(str(user_id))
        body = {"type": event.routing_key, "timestamp": data.get("occurred_at"), "data": data}
        rows.extend({"endpoint_id": endpoint_id, "event_id": event.event_id, "event_type": event.routing_key,
                     "payload": body, "status": "pending", "attempts": 0, "run_attempts": 0,
                     "run_started_at": at, "next_attempt_at": at, "created_at": at, "updated_at": at}
                    for endpoint_id in endpoint_ids)
    connection.execute(insert(deliveries_table), rows)
    return len(rows)


def _snapshots(connection: Connection, user_ids: set[str]) -> dict[str, dict[str, Any]]:
    if not user_ids:
        return {}
    found = connection.execute(
        select(accounts_table.c.user_id, accounts_table.c.balance, accounts_table.c.reserved)
        .where(accounts_table.c.user_id.in_(sorted(user_ids)))
    ).all()
    return {row.user_id: {"balance": row.balance, "reserved": row.reserved,
                          "available": row.balance - row.reserved, "credit_type": "credits"}
            for row in found}


# ---------------------------------------------------------------- sending


@dataclass(frozen=True, slots=True)
class Claimed:
    """A delivery a sender holds until its lease ends."""

    delivery_id: int
    endpoint_id: int
    url: str
    secret: str
    previous_secret: str | None
    previous_secret_expires_at: datetime | None
    event_id: str
    payload: dict[str, Any]
    attempts: int
    run_attempts: int
    run_started_at: datetime
    claim_token: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt came to, decided by the sender (`notifications.webhooks.delivery`)."""

    claimed: Claimed
    outcome: str
    """`succeeded`, `failed` (retry at `next_attempt_at`), `exhausted` or `gone`."""
    response_status: int | None
    response_body: str | None
    error: str | None
    duration_ms: int
    next_attempt_at: datetime | None = None


def claim_due(engine: Engine, at: datetime, *, limit: int, lease: timedelta) -> list[Claimed]:
    """Take up to `limit` due deliveries of enabled endpoints, oldest due first, moving
    each one's next attempt past the lease so that no other sender takes it meanwhile."""
    token = secrets.token_hex(16)

    def work(connection: Connection) -> list[Claimed]:
        due = connection.execute(
            select(deliveries_table.c.id).join(endpoints_table, endpoints_table.c.id == deliveries_table.c.endpoint_id)
            .where(deliveries_table.c.status == "pending", deliveries_table.c.next_attempt_at <= at,
                   endpoints_table.c.enabled.is_(True))
            .order_by(deliveries_table.c.next_attempt_at, deliveries_table.c.id)
            .limit(limit).with_for_update(skip_locked=True, of=deliveries_table)
        ).scalars().all()
        if not due:
            return []
        connection.execute(update(deliveries_table).where(deliveries_table.c.id.in_(due))
                           .values(next_attempt_at=at + lease, claim_token=token))
        rows = connection.execute(
            select(deliveries_table, endpoints_table.c.url, endpoints_table.c.secret,
                   endpoints_table.c.previous_secret, endpoints_table.c.previous_secret_expires_at)
            .join(endpoints_table, endpoints_table.c.id == deliveries_table.c.endpoint_id)
            .where(deliveries_table.c.id.in_(due)).order_by(deliveries_table.c.id)
        ).all()
        return [Claimed(row.id, row.endpoint_id, row.url, row.secret, row.previous_secret,
                        row.previous_secret_expires_at, row.event_id, row.payload, row.attempts,
                        row.run_attempts, row.run_started_at, token) for row in rows]
    return run_transaction(engine, work)


def record_outcomes(
    engine: Engine, outcomes: Sequence[Outcome], at: datetime,
    disabled_event: Callable[[int, str, str], dict[str, Any]],
) -> list[int]:
    """Write what each attempt came to, in one transaction; returns the endpoints this
    disabled. `disabled_event(endpoint_id, url, reason)` gives the outbox row announcing it.

    An outcome whose claim was lost (its lease ran out and another sender took the delivery)
    is logged but changes nothing else; one whose endpoint was removed meanwhile is dropped. A 410 disables its endpoint at once; a delivery whose
    schedule ran out disables it when nothing succeeded there since that delivery was queued.
    """
    def work(connection: Connection) -> list[int]:
        still_claimed = {tuple(row) for row in connection.execute(
            select(deliveries_table.c.id, deliveries_table.c.claim_token)
            .where(deliveries_table.c.id.in_(sorted({outcome.claimed.delivery_id for outcome in outcomes})))
            .with_for_update())}
        held = [outcome for outcome in outcomes
                if (outcome.claimed.delivery_id, outcome.claimed.claim_token) in still_claimed]
        existing = {delivery_id for delivery_id, _token in still_claimed}  # not removed meanwhile
        if held:
            connection.execute(
                update(deliveries_table).where(deliveries_table.c.id == bindparam("b_id"))
                .values(status=bindparam("b_status"), attempts=deliveries_table.c.attempts + 1,
                        run_attempts=bindparam("b_run_attempts"), next_attempt_at=bindparam("b_next"),
                        claim_token=None, last_response_status=bindparam("b_code"), updated_at=at),
                [{"b_id": outcome.claimed.delivery_id, "b_status": _STATUS[outcome.outcome],
                  "b_run_attempts": outcome.claimed.run_attempts + 1,
                  "b_next": outcome.next_attempt_at if outcome.outcome == "failed" else None,
                  "b_code": outcome.response_status} for outcome in held])
        logged = [outcome for outcome in outcomes if outcome.claimed.delivery_id in existing]
        if logged:
            connection.execute(insert(attempts_table), [
                {"delivery_id": outcome.claimed.delivery_id, "endpoint_id": outcome.claimed.endpoint_id,
                 "attempt": outcome.claimed.attempts + 1, "outcome": outcome.outcome,
                 "response_status": outcome.response_status,
                 "response_body": (outcome.response_body or None) and outcome.response_body[:MAX_STORED_RESPONSE],
                 "error": outcome.error, "duration_ms": outcome.duration_ms, "attempted_at": at}
                for outcome in logged])
        succeeded_endpoints = {outcome.claimed.endpoint_id for outcome in held if outcome.outcome == "succeeded"}
        to_disable: dict[int, str] = {outcome.claimed.endpoint_id: "the endpoint answered 410 Gone"
                                      for outcome in held if outcome.outcome == "gone"}
        exhausted = [outcome for outcome in held if outcome.outcome == "exhausted"
                     and outcome.claimed.endpoint_id not in succeeded_endpoints]
        if exhausted:
            last_success = dict(connection.execute(
                select(endpoints_table.c.id, endpoints_table.c.last_success_at)
                .where(endpoints_table.c.id.in_(sorted({o.claimed.endpoint_id for o in exhausted})))).all())
            for outcome in exhausted:
                succeeded_at = last_success.get(outcome.claimed.endpoint_id)
                if succeeded_at is None or succeeded_at < outcome.claimed.run_started_at:
                    to_disable.setdefault(outcome.claimed.endpoint_id,
                                          "every attempt failed for the whole retry schedule")
        if succeeded_endpoints:
            connection.execute(update(endpoints_table).where(endpoints_table.c.id.in_(sorted(succeeded_endpoints)))
                               .values(last_success_at=at))
        disabled = []
        for endpoint_id, reason in sorted(to_disable.items()):
            url = _disable(connection, endpoint_id, reason, at)
            if url is not None:
                connection.execute(insert(outbox_table).values(disabled_event(endpoint_id, url, reason)))
                disabled.append(endpoint_id)
        return disabled
    return run_transaction(engine, work)


_STATUS = {"succeeded": "succeeded", "failed": "pending", "exhausted": "failed", "gone": "failed"}


def _disable(connection: Connection, endpoint_id: int, reason: str, at: datetime) -> str | None:
    """Turn an enabled endpoint off; its URL, or None if it was off already."""
    url = connection.scalar(select(endpoints_table.c.url).where(
        endpoints_table.c.id == endpoint_id, endpoints_table.c.enabled.is_(True)).with_for_update())
    if url is not None:
        connection.execute(update(endpoints_table).where(endpoints_table.c.id == endpoint_id)
                           .values(enabled=False, disabled_reason=reason, disabled_at=at, updated_at=at))
    return url


# ---------------------------------------------------------------- the log


def delivery_model(row: Any, *, with_payload: bool = False, log: list[Any] | None = None) -> WebhookDelivery:
    return WebhookDelivery(
        id=row.id, endpoint_id=row.endpoint_id, event_id=row.event_id, event_type=row.event_type,
        status=row.status, attempts=row.attempts, next_attempt_at=row.next_attempt_at,
        last_response_status=row.last_response_status, created_at=row.created_at, updated_at=row.updated_at,
        payload=row.payload if with_payload else None,
        log=None if log is None else [attempt_model(attempt) for attempt in log])


def attempt_model(row: Any) -> WebhookAttempt:
    return WebhookAttempt(id=row.id, attempt=row.attempt, outcome=row.outcome, response_status=row.response_status,
                          response_body=row.response_body, error=row.error, duration_ms=row.duration_ms,
                          attempted_at=row.attempted_at)


def deliveries_of(engine: Engine, endpoint_id: int, *, limit: int = 100, before_id: int | None = None) -> list[Any]:
    """An endpoint's deliveries, newest first."""
    query = select(deliveries_table).where(deliveries_table.c.endpoint_id == endpoint_id)
    if before_id is not None:
        query = query.where(deliveries_table.c.id < before_id)
    with engine.connect() as connection:
        return list(connection.execute(query.order_by(deliveries_table.c.id.desc()).limit(limit)).all())


def delivery_row(engine: Engine, delivery_id: int) -> tuple[Any, list[Any]] | None:
    """A delivery and its attempts, oldest first; None if unknown."""
    with engine.connect() as connection:
        row = connection.execute(select(deliveries_table).where(deliveries_table.c.id == delivery_id)).first()
        if row is None:
            return None
        attempts = connection.execute(select(attempts_table).where(attempts_table.c.delivery_id == delivery_id)
                                      .order_by(attempts_table.c.id)).all()
        return row, list(attempts)


def replay(engine: Engine, delivery_id: int, at: datetime) -> Any | None:
    """Queue a delivery again now, with a fresh retry schedule (same event id, same body);
    its row after, or None if unknown. An endpoint that is disabled gets it once re-enabled."""
    def work(connection: Connection) -> Any | None:
        changed = connection.execute(
            update(deliveries_table).where(deliveries_table.c.id == delivery_id)
            .values(status="pending", run_attempts=0, run_started_at=at, next_attempt_at=at, claim_token=None,
                    updated_at=at)).rowcount
        if not changed:
            return None
        return connection.execute(select(deliveries_table).where(deliveries_table.c.id == delivery_id)).one()
    return run_transaction(engine, work)


def purge(engine: Engine, before: datetime) -> int:
    """Forget attempts older than `before` and finished deliveries last changed before it;
    returns how many deliveries went. Pending ones stay, however old."""
    def work(connection: Connection) -> int:
        connection.execute(delete(attempts_table).where(attempts_table.c.attempted_at < before))
        old = select(deliveries_table.c.id).where(deliveries_table.c.status != "pending",
                                                  deliveries_table.c.updated_at < before)
        connection.execute(delete(attempts_table).where(attempts_table.c.delivery_id.in_(old)))
        return connection.execute(delete(deliveries_table).where(
            deliveries_table.c.status != "pending", deliveries_table.c.updated_at < before)).rowcount
    return run_transaction(engine, work)


def pending_deliveries(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(select(func.count()).select_from(deliveries_table)
                                     .where(deliveries_table.c.status == "pending")) or 0)
