"""What the console's routes work with, made once by `create_console` from its settings and
handed to each route as `ConsoleDep`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from celery import Celery
from fastapi import Depends
from sqlalchemy.engine import Engine
from starlette.requests import Request

from creditworker.engine import CreditService, SubscriptionService
from creditworker.http.console.access import ConsoleAccess
from creditworker.http.console.pages import Pages
from creditworker.http.console.probes import AuditResult
from creditworker.records.dead_letters import DeadLetterStore


@dataclass(frozen=True)
class Console:
    """The engine's services and stores, the broker's app and how pages are rendered."""

    credits: CreditService
    subscriptions: SubscriptionService
    dead_letters: DeadLetterStore
    access: ConsoleAccess
    celery_app: Celery
    broker: str
    """The broker URL to show, with any password masked."""
    last_audit: AuditResult
    pages: Pages

    @property
    def engine(self) -> Engine:
        return self.credits.engine


def console_of(request: Request) -> Console:
    """The console of the app serving `request` (its middleware and handlers use it too)."""
    console: Console = request.app.state.console
    return console


async def _console(request: Request) -> Console:
    return console_of(request)


ConsoleDep = Annotated[Console, Depends(_console)]
