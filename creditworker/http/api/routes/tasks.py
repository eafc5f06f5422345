"""The outcome of a queued write: served only through the workers (`build_router(client=)`)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter
from starlette.responses import JSONResponse

from creditworker.http.api import examples
from creditworker.http.api.backends import WorkerBackend
from creditworker.http.api.deps import Run
from creditworker.http.api.examples import queued, responses

router = APIRouter(tags=["credits"])


@router.get(
    "/tasks/{task_id}", summary="The outcome of a queued operation",
    responses=queued(responses(None, examples.ENTRY, errors=[402, 404, 409]), 200),
)
async def task_outcome(task_id: uuid.UUID, run: Run) -> JSONResponse:
    assert isinstance(run, WorkerBackend), "only the worker mode serves tasks"
    return await run.outcome(task_id)
