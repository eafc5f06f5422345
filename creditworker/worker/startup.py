"""A worker whose database URL can never work says so in one line and exits.

`celery -A creditworker worker` with a bare name, an unknown scheme, a driver that is not
installed or a PostgreSQL or MySQL database that does not exist used to start, report
ready, and then fail every task with a traceback. At `worker_init` (before the pool and the
consumer start) the URL is checked once: those failures print `error: ...` and end the
worker with status 2; a database that does not answer yet (it may be starting beside the
worker) is one warning line, and the worker runs on and retries its tasks as usual.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from celery.signals import worker_init

from creditworker.settings import Settings

logger = logging.getLogger(__name__)
NEVER_WORKS = ("does not exist on",)
"""What a `DatabaseNotReady` message says when only a person can fix it (create the database)."""


@worker_init.connect(weak=False)
def _check_at_worker_init(sender: Any = None, **_signal: Any) -> None:
    """Connected when the worker imports its tasks (tasks.py imports this module); the
    producers, which build the same app, never load the storage stack."""
    from creditworker.worker.configured import settings_of

    app = getattr(sender, "app", None)
    if app is not None and getattr(app, "main", None) == "creditworker":
        check_database(settings_of(app))
        check_payment_provider(settings_of(app))


def check_payment_provider(settings: Settings) -> None:
    """A payment provider that does not load is one warning line at start, not a stopped
    worker: every other operation works, and top-ups wait (requested) until it is fixed."""
    from creditworker.contract.errors import PaymentProviderError
    from creditworker.engine.payments import load_provider

    try:
        load_provider(settings.payment_provider)
    except PaymentProviderError as exc:
        logger.warning("auto top-ups wait until the payment provider loads: %s", exc.message)


def check_database(settings: Settings) -> None:
    problem, fatal = database_problem(settings.database_url)
    if problem is None:
        return
    if fatal:
        print(f"error: database_not_ready: {problem}", file=sys.stderr, flush=True)
        os._exit(2)  # inside Celery's signal dispatch, which would log and swallow SystemExit
    logger.warning("the database is not ready yet (tasks are retried): %s", problem)


def database_problem(url: str) -> tuple[str | None, bool]:
    """What is wrong with the database at `url` (None: nothing), and whether it can never
    work without a person's fix."""
    from sqlalchemy.exc import ArgumentError

    from creditworker.contract.errors import DatabaseNotReady
    from creditworker.storage.drivers import (
        MissingDriver,
        UnknownDatabaseKind,
        resolve_database_url,
    )
    from creditworker.storage.readiness import ready_engine

    try:
        parsed = resolve_database_url(url)
        if parsed.get_backend_name() == "sqlite":
            return None, False  # the worker makes its tables on first use
        ready_engine(url).dispose()
    except ArgumentError:
        return (f"{url!r} is not a database URL (CREDITWORKER_DATABASE_URL): write it as "
                "sqlite:///creditworker.db or postgresql://user:password@host:5432/name"), True
    except (MissingDriver, UnknownDatabaseKind) as exc:
        return str(exc), True
    except DatabaseNotReady as exc:
        return exc.message, any(marker in exc.message for marker in NEVER_WORKS)
    return None, False
