"""An idle system logs nothing: periodic tasks that found no work leave no log line.

Beat sends the relay every 5 s and the sweeps every 30 to 60 s; each run used to print
three INFO lines (beat's "Sending due task", the worker's "received" and "succeeded"), about
38 a minute from an idle `creditworker up`. These filters drop those lines at the loggers
that write them, unless DEBUG is on: a periodic run is logged when it did something (its
result counts more than zero) or failed (Celery logs failures on another path).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection
from typing import Any

from creditworker.contract.operations import OPERATIONS

PERIODIC_TASKS = frozenset(op.task for op in OPERATIONS if op.periodic is not None)
PERIODIC_ENTRIES = frozenset(op.periodic.entry for op in OPERATIONS if op.periodic is not None)
_COUNT = re.compile(r"(?<![\w.])\d+(?![\w.])")


def did_nothing(return_value: str) -> bool:
    """A result (as Celery logs it) that succeeded and counts nothing: every number in it
    is 0. A refusal (`'ok': False`) is never idle."""
    return "'ok': True" in return_value and all(number == "0" for number in _COUNT.findall(return_value))


class _QuietPeriodic(logging.Filter):
    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self.logger = logger

    def filter(self, record: logging.LogRecord) -> bool:
        if self.logger.isEnabledFor(logging.DEBUG):
            return True
        return not self.idle(record)

    def idle(self, record: logging.LogRecord) -> bool:
        raise NotImplementedError


class _QuietWorker(_QuietPeriodic):
    """The worker's "received" and "succeeded" lines of a periodic task that did nothing."""

    def idle(self, record: logging.LogRecord) -> bool:
        context: Any = record.args
        if not isinstance(context, dict) or context.get("name") not in PERIODIC_TASKS:
            return False
        if "return_value" not in context:  # "received": whether it does anything is not known yet
            return True
        return did_nothing(str(context["return_value"]))


class _QuietBeat(_QuietPeriodic):
    """Beat's "Sending due task" line of each periodic entry."""

    def __init__(self, logger: logging.Logger, entries: Collection[str]) -> None:
        super().__init__(logger)
        self.entries = entries

    def idle(self, record: logging.LogRecord) -> bool:
        args = record.args
        return (isinstance(args, tuple) and bool(args) and args[0] in self.entries
                and str(record.msg).startswith("Scheduler: Sending due task"))


class _NoHostNeeded(logging.Filter):
    """kombu's "No hostname was supplied" when a connection to the embedded broker (folders,
    `filesystem://`, which has no host) is copied for a side channel (the events Flower turns
    on, the remote control): the guarded transport offers no default host, but a copy made
    through the stock transport still says it, and it means nothing there."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No hostname was supplied")


def install(*, embedded_broker: bool = False) -> None:
    """Put the filters on Celery's loggers (in the worker and beat; idempotent)."""
    if embedded_broker:
        connection_logger = logging.getLogger("kombu.connection")
        if not any(isinstance(existing, _NoHostNeeded) for existing in connection_logger.filters):
            connection_logger.addFilter(_NoHostNeeded())
    for name, quiet in (("celery.worker.strategy", _QuietWorker),
                        ("celery.app.trace", _QuietWorker)):
        logger = logging.getLogger(name)
        if not any(isinstance(existing, quiet) for existing in logger.filters):
            logger.addFilter(quiet(logger))
    beat = logging.getLogger("celery.beat")
    if not any(isinstance(existing, _QuietBeat) for existing in beat.filters):
        beat.addFilter(_QuietBeat(beat, PERIODIC_ENTRIES))
