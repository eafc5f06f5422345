"""The system's health: workers, queues, the outbox, events, dead letters and the audit."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from creditworker.contract.credits import OveragePolicy
from creditworker.http.console import queries
from creditworker.http.console.deps import ConsoleDep
from creditworker.http.console.forms import posted_form
from creditworker.http.console.pages import DONE, redirect
from creditworker.http.console.probes import bounded, ping_workers
from creditworker.metrics.state import queue_depths

router = APIRouter(prefix="/system")


@router.get("")
async def system(request: Request, console: ConsoleDep, done: str = "") -> Response:
    # side by side: a broker that does not answer costs the page one probe's time, not two
    workers, depths = await asyncio.gather(bounded(ping_workers, console.celery_app),
                                           bounded(queue_depths, console.celery_app))
    outbox = await run_in_threadpool(queries.outbox_state, console.engine)
    events = await run_in_threadpool(queries.recent_events, console.engine)
    letters = await run_in_threadpool(lambda: console.dead_letters.newest(limit=20))
    letter_count = await run_in_threadpool(console.dead_letters.count)
    now = datetime.now(UTC)
    return console.pages.render(
        request, "system.html", workers=workers, depths=depths, outbox=outbox,
        lag=outbox.lag_seconds(now), events=events, letters=letters,
        letter_count=letter_count, audit=console.last_audit, done=DONE.get(done),
        broker=console.broker,
    )


@router.post("/audit")
async def run_audit(request: Request, console: ConsoleDep) -> Response:
    await posted_form(request)
    allow_negative = console.credits.overage_policy == OveragePolicy.ALLOW_NEGATIVE
    await run_in_threadpool(console.last_audit.run, console.engine, allow_negative=allow_negative)
    return redirect(request, "/system", done="audit")
