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
import time
from collections.abc import Collection
from typing import Any

from kombu.utils.url import maybe_sanitize_url

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


class _BrokerRetries(logging.Filter):
    """One line per broker outage instead of one per retry, saying what to check.

    A worker or beat whose broker refuses connections retries it, and Celery logs each try
    ("consumer: Cannot connect to ...: ... Trying again in 8.00 seconds... (4/100)", "beat:
    Connection error: ... Trying again in 2.0 seconds...") with nothing about what to do.
    The first try of an outage becomes one line naming the broker (password hidden) and the
    setting; later tries are dropped, but for a reminder every REMIND_SECONDS. A try more
    than NEW_OUTAGE_SECONDS after the previous one starts a new outage (Celery's retries come
    at most 10 s apart while it keeps trying)."""

    REMIND_SECONDS = 300.0
    NEW_OUTAGE_SECONDS = 60.0
    PREFIXES = ("consumer: Cannot connect to ", "beat: Connection error: ")

    def __init__(self, broker_url: str) -> None:
        super().__init__()
        self.broker = maybe_sanitize_url(broker_url)
        self.first_at: float | None = None
        self.last_at = 0.0
        self.reminded_at = 0.0
        self.tries = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.PREFIXES):
            return True
        now = time.monotonic()
        if self.first_at is None or now - self.last_at > self.NEW_OUTAGE_SECONDS:
            self.first_at = self.reminded_at = now
            self.tries = 0
        self.last_at = now
        self.tries += 1
        if self.tries == 1:
            reason = self._reason(record)
            record.msg = (f"cannot reach the broker {self.broker}{reason}: start it, or point "
                          "CREDITWORKER_BROKER_URL at it (retrying until it answers)")
        elif now - self.reminded_at >= self.REMIND_SECONDS:
            self.reminded_at = now
            record.msg = (f"still cannot reach the broker {self.broker} after {self.tries} tries "
                          f"in {now - self.first_at:.0f} s (retrying)")
        else:
            return False
        record.args = ()
        return True

    @staticmethod
    def _reason(record: logging.LogRecord) -> str:
        """The transport's error, as Celery passed it: the consumer's second argument, beat's
        first."""
        args = record.args if isinstance(record.args, tuple) else ()
        error = args[1] if str(record.msg).startswith("consumer") and len(args) > 1 else (
            args[0] if args else None)
        return f" ({str(error).rstrip('.')})" if error is not None else ""


def install(*, embedded_broker: bool = False, broker_url: str | None = None) -> None:
    """Put the filters on Celery's loggers (in the worker and beat; idempotent)."""
    if broker_url is not None:
        for name in ("celery.worker.consumer.consumer", "celery.beat"):
            logger = logging.getLogger(name)
            if not any(isinstance(existing, _BrokerRetries) for existing in logger.filters):
                logger.addFilter(_BrokerRetries(broker_url))
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
