"""Webhook endpoints and their delivery log, with a replay button per delivery."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from creditworker.http.console.deps import ConsoleDep
from creditworker.http.console.forms import posted_form
from creditworker.http.console.pages import redirect
from creditworker.notifications.webhooks.service import WebhookService

router = APIRouter(prefix="/webhooks")

Id = Annotated[int, Path(ge=1, le=2**63 - 1)]


def _webhooks(request: Request) -> WebhookService:
    service: WebhookService = request.app.state.webhooks
    return service


@router.get("")
async def endpoints(request: Request, console: ConsoleDep) -> Response:
    listed = await run_in_threadpool(_webhooks(request).endpoints)
    return console.pages.render(request, "webhooks.html", endpoints=listed)


@router.get("/{endpoint_id}")
async def endpoint_log(request: Request, console: ConsoleDep, endpoint_id: Id, done: str = "") -> Response:
    webhooks = _webhooks(request)
    endpoint = await run_in_threadpool(webhooks.endpoint, endpoint_id)
    deliveries = await run_in_threadpool(lambda: webhooks.deliveries(endpoint_id, limit=200))
    return console.pages.render(request, "webhook_deliveries.html", endpoint=endpoint, deliveries=deliveries,
                                done="Replay queued: the sender posts it within seconds." if done == "replay" else None)


@router.get("/deliveries/{delivery_id}")
async def delivery(request: Request, console: ConsoleDep, delivery_id: Id) -> Response:
    shown = await run_in_threadpool(_webhooks(request).delivery, delivery_id)
    return console.pages.render(request, "webhook_delivery.html", delivery=shown)


@router.post("/deliveries/{delivery_id}/replay")
async def replay(request: Request, delivery_id: Id) -> Response:
    await posted_form(request)
    replayed = await run_in_threadpool(_webhooks(request).replay, delivery_id)
    return redirect(request, f"/webhooks/{replayed.endpoint_id}", done="replay")
