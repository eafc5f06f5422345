"""Billing-period arithmetic in UTC, anchored to the day a subscription started.

Period n always starts at `anchor + n periods`, computed from the anchor and never from the
previous period, so a monthly plan started on 31 January renews on 28 (or 29) February and
then on 31 March, not on the 28th forever. A yearly plan started on 29 February renews on
28 February in common years and on 29 February in leap years.
"""

from __future__ import annotations

import calendar
from datetime import datetime, timedelta
from enum import StrEnum


class BillingPeriod(StrEnum):
    DAILY = "daily"
    MONTHLY = "monthly"
    YEARLY = "yearly"


def add_months(anchor: datetime, months: int) -> datetime:
    """`anchor` moved by whole months, the day clamped to the end of a shorter month."""
    month_index = anchor.month - 1 + months
    year, month = anchor.year + month_index // 12, month_index % 12 + 1
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


def period_start(anchor: datetime, period: BillingPeriod | str, n: int) -> datetime:
    """The start of period `n` (period 0 starts at the anchor)."""
    period = BillingPeriod(period)
    if period is BillingPeriod.DAILY:
        return anchor + timedelta(days=n)
    return add_months(anchor, n * (12 if period is BillingPeriod.YEARLY else 1))


def period_index_at(anchor: datetime, period: BillingPeriod | str, when: datetime) -> int:
    """The period that contains `when` (0 for any time before the second period)."""
    period = BillingPeriod(period)
    if when < anchor:
        return 0
    if period is BillingPeriod.DAILY:
        return (when - anchor) // timedelta(days=1)
    step = 12 if period is BillingPeriod.YEARLY else 1
    months = (when.year - anchor.year) * 12 + when.month - anchor.month
    n = max(0, months // step)
    while period_start(anchor, period, n) > when:
        n -= 1
    while period_start(anchor, period, n + 1) <= when:
        n += 1
    return n


def prorate(amount: int, start: datetime, end: datetime, at: datetime) -> int:
    """The share of `amount` for what is left of [start, end) at `at`, rounded down.

    Computed in whole microseconds with integer arithmetic, so it is exact and never
    grants more than `amount`.
    """
    if at >= end:
        return 0
    at = max(at, start)
    total = (end - start) // timedelta(microseconds=1)
    left = (end - at) // timedelta(microseconds=1)
    return amount * left // total
