"""The baseline of the single-operation benchmark: plain Celery, one no-op task.

Celery's default settings (no result backend, no task events, prefetch multiplier 4,
early acknowledgement) except the broker, which `PLAIN_CELERY_BROKER_URL` names, and the
queue name, so that it never shares a queue with creditworker. `bench/run.py` drains a
pre-filled queue of `plain.noop` messages with

    celery -A plain_celery worker --pool=prefork --concurrency=2 --loglevel=INFO

(this directory on PYTHONPATH): the same pool, size and log level as `creditworker up`, so
what separates the two rates is what creditworker does per message.
"""

from __future__ import annotations

import os

from celery import Celery

QUEUE = "plain_celery"

app = Celery("plain_celery", broker=os.environ.get("PLAIN_CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.task_default_queue = QUEUE


@app.task(name="plain.noop")
def noop() -> None:
    """Nothing: what is measured is Celery's own cost per message."""
