"""Reads over the ledger on SQLite, PostgreSQL and MariaDB: a balance at any moment equals the
ledger replayed up to that moment, and a usage report's totals equal the entries it covers."""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from creditworker import CreditService
from creditworker.contract.errors import CreditError, UnknownUser, ValidationFailed
from creditworker.engine.reports import USAGE_COLUMNS
from creditworker.storage.tables import Entry

T0 = datetime(2030, 1, 1, tzinfo=UTC)

STEP = st.tuples(
    st.sampled_from(["add", "add_expiring", "deduct", "reserve", "commit", "release", "expire"]),
    st.integers(min_value=1, max_value=60),  # an amount
    st.integers(min_value=0, max_value=7200),  # seconds after the previous step (0: same moment)
)


def entries_of(engine: Engine, user: str) -> list[Entry]:
    with Session(engine) as session:
        return list(session.scalars(select(Entry).where(Entry.user_id == user).order_by(Entry.id)))


def replay(entries: list[Entry], holds: dict[str, datetime], at: datetime) -> tuple[int, int]:
    """(balance, reserved) at `at` in plain Python: the sum of the entries up to `at`; each hold
    counted from its reserve entry until the first entry that takes it off hold or its expiry."""
    balance = sum(entry.amount for entry in entries if entry.created_at <= at)
    reserved = 0
    for hold_id, expires_at in holds.items():
        own = [entry for entry in entries if entry.reservation_id == hold_id]
        start = next(entry.created_at for entry in own if entry.held > 0)
        ends = [entry.created_at for entry in own if entry.held < 0] + [expires_at]
        if start <= at < min(ends):
            reserved += next(entry.held for entry in own if entry.held > 0)
    return balance, reserved


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(STEP, min_size=1, max_size=14))
def test_the_balance_at_any_moment_is_the_ledger_replayed_to_it(
    service: CreditService, engine: Engine, steps: list[tuple[str, int, int]]
) -> None:
    user = f"u-{uuid.uuid4().hex}"  # each example its own account: no wipe between examples
    now = T0
    holds: dict[str, datetime] = {}
    open_holds: list[str] = []
    service.add_credits(user, 50, now=now)
    for action, amount, seconds in steps:
        now += timedelta(seconds=seconds)
        try:
            if action == "add":
                service.add_credits(user, amount, now=now)
            elif action == "add_expiring":
                service.add_credits(user, amount, expires_at=now + timedelta(seconds=amount * 60), now=now)
            elif action == "deduct":
                service.deduct_credits(user, amount, now=now)
            elif action == "reserve":
                hold = service.reserve_credits(user, amount, ttl_seconds=amount * 60, now=now)
                holds[hold.id] = hold.expires_at
                open_holds.append(hold.id)
            elif action in ("commit", "release") and open_holds:
                hold_id = open_holds.pop(0)
                if action == "commit":
                    service.commit_reservation(hold_id, now=now)
                else:
                    service.release_reservation(hold_id, now=now)
            elif action == "expire":
                service.expire_credits(now=now)
        except CreditError:
            pass  # refused: nothing written, and the replay reads only what was written
    entries = entries_of(engine, user)
    moments = {T0 - timedelta(seconds=1), now + timedelta(days=1)}
    for entry in entries:
        moments |= {entry.created_at, entry.created_at - timedelta(microseconds=1)}
    moments |= set(holds.values())
    for at in sorted(moments):
        info = service.get_user_credits_info(user, at=at)
        assert (info.total, info.reserved) == replay(entries, holds, at), at
        assert info.available == info.total - info.reserved and info.at == at


def test_without_at_the_answer_is_todays(service: CreditService) -> None:
    service.add_credits("ann", 100)
    service.deduct_credits("ann", 30)
    info = service.get_user_credits_info("ann")
    assert (info.total, info.available, info.at) == (70, 70, None)


def test_a_hold_past_its_expiry_no_longer_counts_at_that_moment(service: CreditService) -> None:
    service.add_credits("ann", 100, now=T0)
    hold = service.reserve_credits("ann", 40, ttl_seconds=60, now=T0)
    during = service.get_user_credits_info("ann", at=T0 + timedelta(seconds=59))
    after = service.get_user_credits_info("ann", at=hold.expires_at)
    assert (during.reserved, during.available) == (40, 60)
    assert (after.reserved, after.available) == (0, 100)


def test_a_grant_not_effective_yet_at_that_moment_is_pending_then(service: CreditService) -> None:
    service.add_credits("ann", 100, now=T0)
    later = service.add_credits("ann", 50, effective_at=T0 + timedelta(days=2), now=T0)
    voided = service.add_credits("ann", 30, effective_at=T0 + timedelta(days=2), now=T0)
    service.void_lot(voided.lot_id, amount=10, reason="correction", now=T0 + timedelta(hours=1))
    before_void = service.get_user_credits_info("ann", at=T0 + timedelta(minutes=30))
    after_void = service.get_user_credits_info("ann", at=T0 + timedelta(hours=2))
    effective = service.get_user_credits_info("ann", at=T0 + timedelta(days=3))
    assert (before_void.total, before_void.pending, before_void.available) == (180, 80, 100)
    assert (after_void.total, after_void.pending, after_void.available) == (170, 70, 100)
    assert (effective.total, effective.pending, effective.available) == (170, 0, 170)
    assert later.lot_id != voided.lot_id
    service.add_credits("ann", 8, credit_type="images", now=T0)
    service.add_credits("ann", 5, credit_type="images", effective_at=T0 + timedelta(days=1), now=T0)
    images = service.get_user_credits_info("ann", at=T0 + timedelta(hours=2), credit_type="images")
    assert (images.total, images.pending, images.available) == (13, 5, 8)


def test_a_naive_moment_is_utc(service: CreditService) -> None:
    service.add_credits("ann", 100, now=T0)
    service.deduct_credits("ann", 10, now=T0 + timedelta(hours=1))
    naive = service.get_user_credits_info("ann", at=(T0 + timedelta(minutes=30)).replace(tzinfo=None))
    assert (naive.total, naive.at) == (100, T0 + timedelta(minutes=30))


@pytest.mark.parametrize("at", [datetime(1969, 12, 31, 23, 59, tzinfo=UTC), "yesterday"])
def test_a_moment_before_the_epoch_or_not_a_moment_is_refused(service: CreditService, at: Any) -> None:
    service.add_credits("ann", 100)
    with pytest.raises(ValidationFailed, match="at"):
        service.get_user_credits_info("ann", at=at)


def test_an_unknown_user_has_no_balance_at_any_moment(service: CreditService) -> None:
    with pytest.raises(UnknownUser):
        service.get_user_credits_info("nobody", at=T0)
    with pytest.raises(UnknownUser):
        service.get_usage("nobody", start=T0, end=T0 + timedelta(days=1))


# ---------------------------------------------------------------- usage


def _history(service: CreditService, user: str) -> None:
    """Entries over three months, some on the same day, some at a period's edges."""
    service.add_credits(user, 500, now=T0)
    service.deduct_credits(user, 20, now=T0 + timedelta(hours=3))
    service.add_credits(user, 40, expires_at=T0 + timedelta(days=2), now=T0 + timedelta(days=1))
    hold = service.reserve_credits(user, 30, now=T0 + timedelta(days=1, hours=1))
    service.commit_reservation(hold.id, 25, now=T0 + timedelta(days=1, hours=1, minutes=1))
    service.expire_credits(now=T0 + timedelta(days=3))
    service.deduct_credits(user, 7, now=datetime(2030, 1, 31, 23, 59, 59, 999999, tzinfo=UTC))
    service.deduct_credits(user, 9, now=datetime(2030, 2, 1, tzinfo=UTC))
    service.add_credits(user, 11, now=datetime(2030, 3, 15, 12, tzinfo=UTC))


def _expected(entries: list[Entry], start: datetime, end: datetime, month: bool) -> dict[date, dict[str, int]]:
    by_period: dict[date, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for entry in entries:
        if start <= entry.created_at < end:
            day = entry.created_at.date()
            by_period[day.replace(day=1) if month else day][entry.kind] += entry.amount
    return {period: dict(kinds) for period, kinds in by_period.items()}


@pytest.mark.parametrize("granularity", ["day", "month"])
@pytest.mark.parametrize(("start", "end"), [
    (T0, datetime(2030, 4, 1, tzinfo=UTC)),
    (T0 + timedelta(hours=1), datetime(2030, 2, 1, tzinfo=UTC)),  # a deduct at the end: left out
])
def test_a_reports_totals_are_the_sums_of_the_entries_in_its_window(
    service: CreditService, engine: Engine, granularity: str, start: datetime, end: datetime
) -> None:
    _history(service, "ann")
    _history(service, "bob")
    entries = entries_of(engine, "ann")
    for user, covered in (("ann", entries), (None, entries + entries_of(engine, "bob"))):
        report = service.get_usage(user, start=start, end=end, granularity=granularity)
        expected = _expected(covered, start, end, granularity == "month")
        assert {period.period: period.by_kind for period in report} == expected
        assert [period.period for period in report] == sorted(expected)
        for period in report:
            for column in ("granted", "consumed", "expired", "voided", "refunded"):
                kinds = [kind for kind, named in USAGE_COLUMNS.items() if named == column]
                assert getattr(period, column) == sum(abs(period.by_kind.get(k, 0)) for k in kinds)
    whole = service.get_usage("ann", start=T0, end=datetime(2030, 4, 1, tzinfo=UTC), granularity="month")
    assert [(p.period.month, p.granted, p.consumed, p.expired) for p in whole] == [
        (1, 540, 52, 15), (2, 0, 9, 0), (3, 11, 0, 0)]


@pytest.mark.parametrize(("arguments", "problem"), [
    ({"start": T0 + timedelta(days=1), "end": T0}, "start must not be after end"),
    ({"start": T0, "end": T0 + timedelta(days=1), "granularity": "week"}, "granularity"),
    ({"start": datetime(1960, 1, 1, tzinfo=UTC), "end": T0}, "1970"),
])
def test_a_bad_report_request_is_refused_clearly(
    service: CreditService, arguments: dict[str, Any], problem: str
) -> None:
    service.add_credits("ann", 10)
    with pytest.raises(ValidationFailed) as refused:
        service.get_usage("ann", **arguments)
    assert problem in str(refused.value.to_dict())
