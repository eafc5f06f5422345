"""The system page's probes: workers, queues and the audit, each bounded in time.

A broker that does not answer must not hang the page: every probe runs in a thread with a
short connection timeout, and the page waits for it at most `PROBE_SECONDS`.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from sqlalchemy.engine import Engine

from creditworker.records.audit import AuditReport, audit

PROBE_SECONDS = 3.0


@dataclass(frozen=True)
class Probe:
    """What a probe found, or why it found nothing."""

    ok: bool
    value: Any = None
    problem: str | None = None


async def bounded(work: Any, *args: Any) -> Probe:
    """Run `work(*args)` in a thread; a probe slower than PROBE_SECONDS reports a timeout
    (the thread finishes on its own: its own socket timeouts end it)."""
    try:
        value = await asyncio.wait_for(asyncio.to_thread(work, *args), PROBE_SECONDS)
    except TimeoutError:
        return Probe(False, problem=f"no answer within {PROBE_SECONDS:g} s")
    except Exception as exc:  # noqa: BLE001 - a probe reports any failure on the page
        return Probe(False, problem=f"{type(exc).__name__}: {exc}"[:300])
    return Probe(True, value)


def ping_workers(app: Celery) -> dict[str, str]:
    """Each worker that answered a ping, and its answer."""
    replies = app.control.ping(timeout=1.0) or []
    answers: dict[str, str] = {}
    for reply in replies:
        for worker_name, answer in reply.items():
            answers[worker_name] = (
                answer.get("ok", str(answer)) if isinstance(answer, dict) else str(answer)
            )
    return answers


@dataclass
class AuditResult:
    """The last audit this process ran (kept in memory: the audit is cheap to run again)."""

    report: AuditReport | None = None
    finished_at: datetime | None = None
    seconds: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, engine: Engine, *, allow_negative: bool) -> None:
        with self.lock:  # one audit at a time, however often the button is pressed
            started = datetime.now(UTC)
            report = audit(engine, allow_negative=allow_negative)
            self.report, self.finished_at = report, datetime.now(UTC)
            self.seconds = (self.finished_at - started).total_seconds()
