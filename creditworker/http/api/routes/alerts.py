"""Balance alerts: an account's low-credit threshold in each credit type."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from starlette.responses import JSONResponse

from creditworker.contract.operations import SET_LOW_THRESHOLD
from creditworker.http.api import examples
from creditworker.http.api.bodies import KeyHeader, ThresholdBody, UserIdPath, fields
from creditworker.http.api.deps import Run, Wait
from creditworker.http.api.examples import body_example
from creditworker.http.api.routes import served

router = APIRouter(tags=["alerts"])


@served(router, SET_LOW_THRESHOLD,
        summary="Set a user's low-credit threshold in a credit type (credits, or percent of the last grant)",
        example=examples.THRESHOLD, errors=[404, 409])
async def set_low_credit_threshold(
    user_id: UserIdPath,
    body: Annotated[ThresholdBody, body_example("10% of the last grant of tokens",
                                                {"percent": 10, "credit_type": "tokens"})],
    run: Run, wait: Wait, idempotency_key: KeyHeader = None,
) -> JSONResponse:
    return await run.write(SET_LOW_THRESHOLD, {"user_id": user_id, **fields(body, idempotency_key)}, wait)
