"""What reports need to say differently per SQL dialect: the start of a period."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func
from sqlalchemy.sql.elements import ColumnElement

from creditworker.contract.credits import Granularity

_TRUNCATED = {Granularity.DAY: "day", Granularity.MONTH: "month"}
_STRFTIME = {Granularity.DAY: "%Y-%m-%d", Granularity.MONTH: "%Y-%m-01"}


def period_start(column: Any, granularity: Granularity, dialect: str) -> ColumnElement[str]:
    """The first day of the period holding `column` (a UTC timestamp) as `YYYY-MM-DD` text,
    the same on every dialect (stored timestamps are naive UTC, so no zone is applied)."""
    if dialect == "postgresql":
        return func.to_char(func.date_trunc(_TRUNCATED[granularity], column), "YYYY-MM-DD")
    if dialect in ("mysql", "mariadb"):
        return func.date_format(column, _STRFTIME[granularity])
    if dialect == "sqlite":
        return func.strftime(_STRFTIME[granularity], column)
    raise NotImplementedError(f"no usage report on {dialect}")
