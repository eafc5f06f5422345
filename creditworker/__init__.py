"""creditworker: credit and subscription management as idempotent Celery tasks over SQL.

Names are imported lazily, so ``import creditworker.contract.credits`` (what producers need)
does not pull in SQLAlchemy, and ``celery -A creditworker`` finds the Celery app.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AsyncCreditService": "creditworker.engine.async_service",
    "AsyncSubscriptionService": "creditworker.engine.async_service",
    "CreditService": "creditworker.engine.service",
    "Settings": "creditworker.settings",
    "SubscriptionService": "creditworker.engine.subscriptions",
    "get_settings": "creditworker.settings",
    "app": "creditworker.worker.app",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'creditworker' has no attribute {name!r}")
    try:
        return getattr(import_module(module), name)
    except ImportError as exc:
        if module != "creditworker.engine.async_service":
            raise
        # SQLAlchemy's own message names its extra, which installs no driver (aiosqlite, asyncpg)
        raise ImportError(f"{name} needs greenlet, aiosqlite and asyncpg: "
                          "pip install 'creditworker[asyncio]'") from exc
