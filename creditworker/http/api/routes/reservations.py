"""Hold credits before the work, then commit the actual amount or release the hold."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from starlette.responses import JSONResponse

from creditworker.contract.credits import ReserveCredits
from creditworker.contract.operations import COMMIT, RELEASE, RESERVATION, RESERVE
from creditworker.http.api import examples
from creditworker.http.api.backends import json_answer
from creditworker.http.api.bodies import (
    CommitBody,
    KeyHeader,
    ReleaseBody,
    ReservationIdPath,
    fields,
)
from creditworker.http.api.deps import Run, Wait
from creditworker.http.api.examples import body_example
from creditworker.http.api.routes import served

router = APIRouter(tags=["reservations"])


@served(router, RESERVE,
        summary="Hold credits before the work (always waits for the reservation)",
        example=examples.RESERVATION, errors=[402, 404, 409])
async def reserve_credits(
    body: Annotated[ReserveCredits, body_example("Hold 20 credits for 5 minutes", {
        "user_id": "alice", "amount": 20, "ttl_seconds": 300,
        "idempotency_key": "chat-123:reserve",
    })],
    run: Run, wait: Wait, idempotency_key: KeyHeader = None,
) -> JSONResponse:
    return await run.write(RESERVE, fields(body, idempotency_key), wait)


@served(router, COMMIT,
        summary="Charge a reservation (the amount held, or the actual amount given)",
        example=examples.COMMIT_ENTRY, errors=[402, 404, 409])
async def commit_reservation(
    reservation_id: ReservationIdPath,
    run: Run,
    wait: Wait,
    body: Annotated[CommitBody | None, body_example("Charge the 12 credits used", {
        "amount": 12, "idempotency_key": "chat-123:commit",
    })] = None,
    idempotency_key: KeyHeader = None,
) -> JSONResponse:
    given = fields(body or CommitBody(), idempotency_key)
    return await run.write(COMMIT, {"reservation_id": reservation_id, **given}, wait)


@served(router, RELEASE, summary="Release a reservation without charging",
        example=examples.RELEASE_ENTRY, errors=[404, 409])
async def release_reservation(
    reservation_id: ReservationIdPath,
    run: Run,
    wait: Wait,
    body: Annotated[ReleaseBody | None, body_example("Release the hold", {
        "idempotency_key": "chat-123:release",
    })] = None,
    idempotency_key: KeyHeader = None,
) -> JSONResponse:
    given = fields(body or ReleaseBody(), idempotency_key)
    return await run.write(RELEASE, {"reservation_id": reservation_id, **given}, wait)


@served(router, RESERVATION, summary="A reservation and its status",
        example=examples.RESERVATION, errors=[404])
async def reservation(reservation_id: ReservationIdPath, run: Run) -> JSONResponse:
    return json_answer(await run.read(RESERVATION, reservation_id))
