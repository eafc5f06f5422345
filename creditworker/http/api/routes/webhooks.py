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
from creditworker.notifications.webhooks.service import WebhookOptions, WebhookService

router = APIRouter(tags=["webhooks"])


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


@router.get("/webhooks/deliveries/{delivery_id}", summary="One delivery: its body and every attempt")
def get_delivery(delivery_id: DeliveryId, webhooks: Webhooks) -> WebhookDelivery:
    return webhooks.delivery(delivery_id)


@router.post("/webhooks/deliveries/{delivery_id}/replay", status_code=202,
             summary="Send a delivery again (same webhook-id, fresh retry schedule)")
def replay_delivery(delivery_id: DeliveryId, webhooks: Webhooks) -> WebhookDelivery:
    return webhooks.replay(delivery_id)


@router.post("/webhooks", status_code=201,
             summary="Register an endpoint (the answer shows its signing secret, once)")
def create_endpoint(body: CreateWebhookEndpoint, webhooks: Webhooks) -> WebhookEndpointWithSecret:
    return webhooks.register(body)


@router.get("/webhooks", summary="List endpoints")
def list_endpoints(webhooks: Webhooks) -> list[WebhookEndpoint]:
    return webhooks.endpoints()


@router.get("/webhooks/{endpoint_id}", summary="One endpoint")
def get_endpoint(endpoint_id: EndpointId, webhooks: Webhooks) -> WebhookEndpoint:
    return webhooks.endpoint(endpoint_id)


@router.patch("/webhooks/{endpoint_id}", summary="Change an endpoint (given fields only; enabled=false disables)")
def update_endpoint(endpoint_id: EndpointId, body: UpdateWebhookEndpoint, webhooks: Webhooks) -> WebhookEndpoint:
    return webhooks.update(endpoint_id, body)


@router.delete("/webhooks/{endpoint_id}", summary="Remove an endpoint with its deliveries and log")
def remove_endpoint(endpoint_id: EndpointId, webhooks: Webhooks) -> dict[str, Any]:
    webhooks.remove(endpoint_id)
    return {"removed": endpoint_id}


@router.post("/webhooks/{endpoint_id}/rotate-secret",
             summary="A new signing secret; the old one also signs for the grace period")
def rotate_secret(endpoint_id: EndpointId, webhooks: Webhooks) -> WebhookEndpointWithSecret:
    return webhooks.rotate_secret(endpoint_id)


@router.get("/webhooks/{endpoint_id}/deliveries", summary="An endpoint's deliveries, newest first")
def list_deliveries(
    endpoint_id: EndpointId, webhooks: Webhooks,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before_id: Annotated[int | None, Query(ge=1, le=2**63 - 1, description="Only older ones.")] = None,
) -> list[WebhookDelivery]:
    return webhooks.deliveries(endpoint_id, limit=limit, before_id=before_id)
