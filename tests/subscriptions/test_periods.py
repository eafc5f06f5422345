"""Period arithmetic in UTC: month ends, leap years, years, and the proration."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from creditworker.contract.periods import (
    BillingPeriod,
    add_months,
    period_index_at,
    period_start,
    prorate,
)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def test_monthly_from_31_january_follows_month_ends_and_returns_to_the_31st() -> None:
    anchor = utc(2031, 1, 31, 9, 30)
    starts = [period_start(anchor, "monthly", n) for n in range(4)]
    assert starts == [
        utc(2031, 1, 31, 9, 30), utc(2031, 2, 28, 9, 30), utc(2031, 3, 31, 9, 30), utc(2031, 4, 30, 9, 30)
    ]


def test_monthly_in_a_leap_year_gives_29_february() -> None:
    assert period_start(utc(2032, 1, 31), "monthly", 1) == utc(2032, 2, 29)


def test_yearly_from_29_february_renews_on_28_february_and_again_on_29_in_leap_years() -> None:
    anchor = utc(2032, 2, 29)
    assert [period_start(anchor, "yearly", n) for n in range(5)] == [
        utc(2032, 2, 29), utc(2033, 2, 28), utc(2034, 2, 28), utc(2035, 2, 28), utc(2036, 2, 29)
    ]


def test_daily_periods_are_24_hours_and_cross_year_ends() -> None:
    anchor = utc(2031, 12, 31, 23, 0)
    assert period_start(anchor, "daily", 1) == utc(2032, 1, 1, 23, 0)
    assert period_index_at(anchor, "daily", utc(2032, 1, 1, 22, 59)) == 0
    assert period_index_at(anchor, "daily", utc(2032, 1, 1, 23, 0)) == 1


def test_december_rolls_into_the_next_year() -> None:
    assert add_months(utc(2031, 12, 15), 1) == utc(2032, 1, 15)
    assert add_months(utc(2031, 11, 30), 3) == utc(2032, 2, 29)


def test_period_index_at_the_boundaries() -> None:
    anchor = utc(2031, 1, 31)
    assert period_index_at(anchor, "monthly", utc(2031, 1, 1)) == 0  # before the anchor
    assert period_index_at(anchor, "monthly", utc(2031, 2, 27, 23, 59)) == 0
    assert period_index_at(anchor, "monthly", utc(2031, 2, 28)) == 1
    assert period_index_at(anchor, "monthly", utc(2031, 3, 30)) == 1
    assert period_index_at(anchor, "monthly", utc(2031, 3, 31)) == 2
    assert period_index_at(anchor, "yearly", utc(2040, 6, 1)) == 9


def test_unknown_period_is_refused() -> None:
    with pytest.raises(ValueError):
        period_start(utc(2031, 1, 1), "weekly", 1)
    assert BillingPeriod("yearly") is BillingPeriod.YEARLY


anchors = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


@given(anchor=anchors, period=st.sampled_from(list(BillingPeriod)), offset=st.integers(0, 10**10))
def test_the_period_containing_a_time_contains_it(anchor: datetime, period: BillingPeriod, offset: int) -> None:
    when = anchor + timedelta(seconds=offset)
    n = period_index_at(anchor, period, when)
    assert period_start(anchor, period, n) <= when < period_start(anchor, period, n + 1)


@given(anchor=anchors, period=st.sampled_from(list(BillingPeriod)), n=st.integers(0, 600))
def test_periods_are_strictly_increasing_and_anchored(anchor: datetime, period: BillingPeriod, n: int) -> None:
    assert period_start(anchor, period, n) < period_start(anchor, period, n + 1)
    if period is BillingPeriod.MONTHLY:
        assert period_start(anchor, period, n).day == min(anchor.day, period_start(anchor, period, n).day)


def test_prorate_grants_the_share_left_rounded_down() -> None:
    start, end = utc(2031, 4, 1), utc(2031, 5, 1)  # 30 days
    assert prorate(300, start, end, utc(2031, 4, 16)) == 150
    assert prorate(100, start, end, utc(2031, 4, 11)) == 66  # 20/30 of 100 = 66.67
    assert prorate(100, start, end, start) == 100
    assert prorate(100, start, end, utc(2031, 3, 1)) == 100  # before the period: all of it
    assert prorate(100, start, end, end) == 0
    assert prorate(100, start, end, utc(2031, 6, 1)) == 0


@given(amount=st.integers(1, 10**12), fraction=st.floats(0, 1))
def test_prorate_never_exceeds_the_amount(amount: int, fraction: float) -> None:
    start, end = utc(2031, 2, 1), utc(2031, 3, 1)
    at = start + (end - start) * fraction
    assert 0 <= prorate(amount, start, end, at) <= amount
