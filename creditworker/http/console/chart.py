"""The account page's chart, drawn on the server: one SVG, no script, no library.

Its figures are the engine's usage report (`CreditService.get_usage`, per UTC day), the same
numbers as the usage CSV and `creditworker usage`, so the chart and the export never disagree."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta

from creditworker.contract.credits import UsagePeriod

WIDTH, HEIGHT = 720, 240
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 12, 28

SERIES = (("granted", "Granted"), ("consumed", "Consumed"), ("expired", "Expired"), ("voided", "Voided"),
          ("refunded", "Refunded"))


@dataclass(frozen=True)
class Bar:
    series: str
    x: float
    y: float
    width: float
    height: float
    title: str


@dataclass(frozen=True)
class Tick:
    position: float
    label: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    bars: list[Bar]
    y_ticks: list[Tick]
    x_ticks: list[Tick]
    plot_left: int
    plot_right: int
    plot_bottom: int
    empty: bool


def _nice_ceiling(value: int) -> int:
    """The smallest of 1, 2, 5 × 10^n at or above `value`, so the axis reads in round steps."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= value:
                return step * factor
        step *= 10


def every_day(report: Sequence[UsagePeriod], first_day: date, last_day: date) -> list[UsagePeriod]:
    """A daily usage report with the days that had no entries filled in as zeros."""
    by_day = {period.period: period for period in report}
    return [by_day.get(day) or UsagePeriod(period=day)
            for day in (first_day + timedelta(days=offset) for offset in range((last_day - first_day).days + 1))]


def daily_chart(totals: Sequence[UsagePeriod]) -> Chart:
    """Grouped bars per day (every day of the range, see `every_day`), one per series."""
    top = max([max(getattr(day, series) for series, _label in SERIES) for day in totals] + [0])
    scale_top = _nice_ceiling(max(top, 1))
    plot_width = WIDTH - LEFT - RIGHT
    plot_height = HEIGHT - TOP - BOTTOM
    slot = plot_width / max(len(totals), 1)
    bar_width = max(slot / (len(SERIES) + 1), 1.0)
    bars: list[Bar] = []
    for index, day in enumerate(totals):
        for offset, (series, label) in enumerate(SERIES):
            amount = getattr(day, series)
            if amount <= 0:
                continue
            height = plot_height * amount / scale_top
            bars.append(Bar(
                series=series,
                x=round(LEFT + index * slot + (offset + 0.5) * bar_width, 2),
                y=round(TOP + plot_height - height, 2),
                width=round(bar_width, 2),
                height=round(height, 2),
                title=f"{day.period.isoformat()}: {label.lower()} {amount:,}",
            ))
    y_ticks = [
        Tick(round(TOP + plot_height - plot_height * fraction, 2), f"{int(scale_top * fraction):,}")
        for fraction in (0, 0.25, 0.5, 0.75, 1)
    ]
    every = max(len(totals) // 6, 1)
    x_ticks = [
        Tick(round(LEFT + (index + 0.5) * slot, 2), day.period.strftime("%d %b"))
        for index, day in enumerate(totals) if index % every == 0
    ]
    return Chart(WIDTH, HEIGHT, bars, y_ticks, x_ticks, LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM,
                 empty=top == 0)
