"""The console's pages and actions, one module per area, each a module-level `APIRouter`.

Every change goes through `CreditService` or `SubscriptionService` with an idempotency key
made from a token rendered into the form, so a form submitted twice (a double click, a
resent POST) acts once: the engine answers the second submit with the first result.
"""

from __future__ import annotations

import logging

from starlette.requests import Request

logger = logging.getLogger(__name__)
"""`creditworker.http.console.routes`: the actions' reasons the engine has no place for."""


def log_action(request: Request, action: str, target: str, reason: str) -> None:
    operator = request.state.operator
    logger.info("console %s on %r by key %s: %s", action, target, operator.key_id, reason)
