"""Signed webhook endpoints and their delivery log: `/credits/webhooks` (docs/webhooks.md).

Not operations of the registry: they configure where events go and read the log, in this
process, on the database (no worker round trip). The gateway puts its `WebhookService` on
the app's state; a host app that includes the router without one gets the service the
CREDITWORKER_* settings describe.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request

from creditworker.contract.webhooks import (
    CreateWebhookEndpoint,
    UpdateWebhookEndpoint,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEndpointWithSecret,
)
from creditworker.http.api.examples import body_example, responses
from creditworker.notifications.webhooks.service import WebhookOptions, WebhookService

router = APIRouter(tags=["webhooks"])

ENDPOINT = {
    "id": 1, "url": "https://billing.example.com/hooks", "description": "billing", "events": ["credits.*"],
    "enabled": True, "disabled_reason": None, "disabled_at": None, "last_success_at": None,
    "rotating_until": None, "created_at": "2026-12-05T08:00:00Z", "updated_at": "2026-12-05T08:00:00Z",
}
WITH_SECRET = {**ENDPOINT, "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}
DELIVERY = {
    "id": 7, "endpoint_id": 1, "event_id": "5f0c3a52-7c1e-4a4e-9d43-1f1c0c7d9b11", "event_type": "credits.low",
    "status": "succeeded", "attempts": 1, "next_attempt_at": None, "last_response_status": 204,
    "created_at": "2026-12-05T08:01:00Z", "updated_at": "2026-12-05T08:01:01Z", "payload": None, "log": None,
}


def _answers(example: Any, status: int = 200, errors: tuple[int, ...] = ()) -> dict[int | str, dict[str, Any]]:
    return responses(None, example, status=status, errors=errors)


@functools.cache
def configured_webhook_service() -> WebhookService:
    from creditworker.settings import get_settings
    from creditworker.storage.database import make_engine

    settings = get_settings()
    return WebhookService(make_engine(settings.database_url), WebhookOptions.from_settings(settings))


def webhook_service(request: Request) -> WebhookService:
    service: WebhookService | None = getattr(request.app.state, "webhooks", None)
    return service if service is not None else configured_webhook_service()


Webhooks = Annotated[WebhookService, Depends(webhook_service)]
EndpointId = Annotated[int, Path(ge=1, le=2**63 - 1, description="The endpoint's id.")]
DeliveryId = Annotated[int, Path(ge=1, le=2**63 - 1, description="The delivery's id.")]


@router.get("/webhooks/deliveries/{delivery_id}", summary="One delivery: its body and every attempt",
            responses=_answers(DELIVERY, errors=(404,)))
def get_delivery(delivery_id: DeliveryId, webhooks: Webhooks) -> WebhookDelivery:
    return webhooks.delivery(delivery_id)


@router.post("/webhooks/deliveries/{delivery_id}/replay", status_code=202,
             summary="Send a delivery again (same webhook-id, fresh retry schedule)",
             responses=_answers({**DELIVERY, "status": "pending"}, 202, (404,)))
def replay_delivery(delivery_id: DeliveryId, webhooks: Webhooks) -> WebhookDelivery:
    return webhooks.replay(delivery_id)


@router.post("/webhooks", status_code=201,
             summary="Register an endpoint (the answer shows its signing secret, once)",
             responses=_answers(WITH_SECRET, 201))
def create_endpoint(
    body: Annotated[CreateWebhookEndpoint, body_example("Low, depleted and recovered balances", {
        "url": "https://billing.example.com/hooks", "events": ["credits.*"], "description": "billing"})],
    webhooks: Webhooks,
) -> WebhookEndpointWithSecret:
    return webhooks.register(body)


@router.get("/webhooks", summary="List endpoints", responses=_answers([ENDPOINT]))
def list_endpoints(webhooks: Webhooks) -> list[WebhookEndpoint]:
    return webhooks.endpoints()


@router.get("/webhooks/{endpoint_id}", summary="One endpoint", responses=_answers(ENDPOINT, errors=(404,)))
def get_endpoint(endpoint_id: EndpointId, webhooks: Webhooks) -> WebhookEndpoint:
    return webhooks.endpoint(endpoint_id)


@router.patch("/webhooks/{endpoint_id}", summary="Change an endpoint (given fields only; enabled=false disables)",
              responses=_answers(ENDPOINT, errors=(404,)))
def update_endpoint(
    endpoint_id: EndpointId,
    body: Annotated[UpdateWebhookEndpoint, body_example("Turn an endpoint off", {"enabled": False})],
    webhooks: Webhooks,
) -> WebhookEndpoint:
    return webhooks.update(endpoint_id, body)


@router.delete("/webhooks/{endpoint_id}", summary="Remove an endpoint with its deliveries and log",
               responses=_answers({"removed": 1}, errors=(404,)))
def remove_endpoint(endpoint_id: EndpointId, webhooks: Webhooks) -> dict[str, Any]:
    webhooks.remove(endpoint_id)
    return {"removed": endpoint_id}


@router.post("/webhooks/{endpoint_id}/rotate-secret",
             summary="A new signing secret; the old one also signs for the grace period",
             responses=_answers({**WITH_SECRET, "rotating_until": "2026-12-06T08:00:00Z"}, errors=(404,)))
def rotate_secret(endpoint_id: EndpointId, webhooks: Webhooks) -> WebhookEndpointWithSecret:
    return webhooks.rotate_secret(endpoint_id)


@router.get("/webhooks/{endpoint_id}/deliveries", summary="An endpoint's deliveries, newest first",
            responses=_answers([DELIVERY], errors=(404,)))
def list_deliveries(
    endpoint_id: EndpointId, webhooks: Webhooks,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before_id: Annotated[int | None, Query(ge=1, le=2**63 - 1, description="Only older ones.")] = None,
) -> list[WebhookDelivery]:
    return webhooks.deliveries(endpoint_id, limit=limit, before_id=before_id)
