"""The settings a Celery app was built from, for the worker modules below `worker/app.py`.

`make_celery(settings)` is where the worker reads its configuration; it leaves the
`Settings` on the app, and tasks, the retry policy, gathering and the message guard read
their values from the app they run under (`task.app`, `consumer.app`), never from the
environment.
"""

from __future__ import annotations

from typing import Any

from creditworker.settings import Settings

ATTRIBUTE = "creditworker_settings"


def settings_of(app: Any) -> Settings:
    """The settings `app` was built from (an app not built by `make_celery` has none)."""
    settings: Settings | None = getattr(app, ATTRIBUTE, None)
    if settings is None:
        raise RuntimeError(
            f"the Celery app {app.main!r} was not built by creditworker.worker.app.make_celery"
        )
    return settings
