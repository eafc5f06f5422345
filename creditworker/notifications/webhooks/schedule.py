"""The retry schedule: when a failed delivery is tried again.

The delays after each failed attempt follow Standard Webhooks' suggestion (the one Svix
publishes): 5 seconds, 5 minutes, 30 minutes, 2 hours, 5 hours, 10 hours, 10 hours; eight
attempts over about 27 hours. Each delay is stretched or shrunk by up to `JITTER` at
random, so that the retries of many deliveries that failed together (a receiver's outage)
do not all arrive in the same second when it comes back.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import datetime, timedelta

RETRY_DELAYS_SECONDS: tuple[float, ...] = (5, 5 * 60, 30 * 60, 2 * 3600, 5 * 3600, 10 * 3600, 10 * 3600)
JITTER = 0.2


def next_attempt_at(delays: Sequence[float], failed_attempts: int, at: datetime,
                    *, rng: random.Random | None = None) -> datetime | None:
    """When to try again after the `failed_attempts`-th failure in a row; None when the
    schedule has run out."""
    if failed_attempts > len(delays):
        return None
    delay = delays[failed_attempts - 1]
    factor = 1 + (rng or random).uniform(-JITTER, JITTER)
    return at + timedelta(seconds=delay * factor)


def schedule_span(delays: Sequence[float]) -> timedelta:
    """From the first attempt to the last, without jitter."""
    return timedelta(seconds=sum(delays))
