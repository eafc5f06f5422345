"""`GET /metrics` on the gateway: Prometheus text for the state of the database and the broker
(outbox lag, dead letters, expiring credits, queue depth) and this process's own metrics.

The operations' counters live in the workers (their own endpoint, CREDITWORKER_METRICS_PORT):
writes through the gateway are queued to them. The route takes the gateway's API key like
the rest of the API (Prometheus sends it as `authorization: {credentials: ...}`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response
from sqlalchemy.engine import Engine

from creditworker.http.auth import AuthDependency
from creditworker.metrics.exposition import registry
from creditworker.metrics.state import StateCollector


def metrics_router(engine: Engine, celery_app: Any, auth: AuthDependency, *, expiring_days: int) -> APIRouter:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    collected = registry(StateCollector(engine, celery_app=celery_app, expiring_days=expiring_days))
    router = APIRouter(dependencies=[Depends(auth)])

    @router.get("/metrics", include_in_schema=False)
    def metrics() -> Response:  # sync: FastAPI runs it in its thread pool, off the event loop
        return Response(generate_latest(collected), media_type=CONTENT_TYPE_LATEST)

    return router
