"""Find an account; an account's balance, lots, holds, plan, chart and ledger; its ledger and
usage as CSV."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter
from fastapi.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from creditworker.contract.credits import EntryKind, UsagePeriod, write_usage_csv
from creditworker.contract.errors import UnknownSubscription, UnknownUser, ValidationFailed
from creditworker.engine.results import decimal_text
from creditworker.http.console import queries
from creditworker.http.console.chart import SERIES, daily_chart, every_day
from creditworker.http.console.deps import Console, ConsoleDep
from creditworker.http.console.forms import day, ledger_filter, search, user
from creditworker.http.console.pages import DONE, Refused

router = APIRouter()

MAX_CHART_DAYS = 366
CSV_COLUMNS = ["id", "created_at", "kind", "amount", "held", "balance_after", "reserved_after",
               "lot_id", "reservation_id", "description", "idempotency_key"]


@router.get("/")
async def accounts(request: Request, console: ConsoleDep, q: str = "") -> Response:
    prefix = search(q)
    if prefix:
        found = await run_in_threadpool(queries.search_accounts, console.engine, prefix)
    else:
        found = await run_in_threadpool(queries.recent_accounts, console.engine)
    return console.pages.render(request, "accounts.html", q=prefix, accounts=found)


@router.get("/account")
async def account(
    request: Request, console: ConsoleDep, user_id: str, since: str = "", until: str = "",
    before: int | None = None, after: int | None = None, days: int = 30, done: str = "",
) -> Response:
    wanted = ledger_filter(request, user_id, since, until)
    days = min(max(days, 1), MAX_CHART_DAYS)
    return await run_in_threadpool(
        _account_page, console, request, user_id, wanted, before, after, days, done
    )


def _account_page(
    console: Console, request: Request, user_id: str, wanted: queries.LedgerFilter,
    before: int | None, after: int | None, days: int, done: str,
) -> Response:
    """The page, read and rendered in a worker thread (the reads block)."""
    context = _account_context(console, request, user_id, wanted, before, after, days)
    return console.pages.render(request, "account.html", done=DONE.get(done), **context)


def _account_context(
    console: Console, request: Request, user_id: str, wanted: queries.LedgerFilter,
    before: int | None, after: int | None, days: int,
) -> dict[str, Any]:
    """What the account page shows; an unknown user gets the page with no balance."""
    credits, subscriptions = console.credits, console.subscriptions
    try:
        info = credits.get_user_credits_info(user_id)
    except UnknownUser:
        info = None
    except ValidationFailed as exc:
        raise Refused(422, exc.message) from None
    context: dict[str, Any] = {
        "user_id": user_id, "info": info,
        "kinds": [kind.value for kind in EntryKind], "filter": wanted,
        "since": request.query_params.get("since", ""),
        "until": request.query_params.get("until", ""),
        "plans": subscriptions.list_plans(), "days": days,
    }
    if info is None:
        return context
    now = datetime.now(UTC)
    first_day, end_day = now.date() - timedelta(days=days - 1), now.date() + timedelta(days=1)
    totals = every_day(_usage(console, user_id, first_day, end_day), first_day, now.date())
    context.update(
        _holdings(console, user_id, now),
        threshold=queries.account_threshold(console.engine, user_id),
        type_thresholds=queries.type_thresholds(console.engine, user_id),
        default_threshold=credits.low_credit_threshold,
        subscription=_subscription(console, user_id),
        topup_rules=queries.topup_rules(console.engine, user_id),
        topups=queries.recent_topups(console.engine, user_id),
        all_plans={plan.id: plan for plan in subscriptions.list_plans(include_inactive=True)},
        page=queries.ledger_page(console.engine, wanted, before=before, after=after),
        chart=daily_chart(totals), series=SERIES,
        sums={name: sum(getattr(day, name) for day in totals) for name, _ in SERIES},
        usage_query=urlencode([("user_id", user_id), ("start", first_day.isoformat()),
                               ("end", end_day.isoformat())]),
        ledger_query=urlencode(
            [("user_id", user_id)] + [("kind", kind) for kind in wanted.kinds]
            + [("since", context["since"]), ("until", context["until"])]
        ),
    )
    return context


def _holdings(console: Console, user_id: str, now: datetime) -> dict[str, Any]:
    """The account's live lots (which expire soon) and active holds (how long they last)."""
    horizon = now + timedelta(days=console.credits.expiring_soon_days)
    lots = queries.live_lots(console.engine, user_id)
    for lot in lots:
        lot["expiring_soon"] = lot["expires_at"] is not None and lot["expires_at"] <= horizon
        lot["pending"] = lot["effective_at"] is not None and lot["effective_at"] > now
        lot["cost_basis"] = (None if lot["cost_basis_amount"] is None
                             else f"{decimal_text(lot['cost_basis_amount'])} {lot['cost_basis_currency']}")
    holds = queries.active_holds(console.engine, user_id)
    for hold in holds:
        hold["ttl"] = _ttl(hold["expires_at"], now)
    return {"lots": lots, "holds": holds}


def _subscription(console: Console, user_id: str) -> Any:
    try:
        return console.subscriptions.get_user_subscription(user_id)
    except (UnknownSubscription, UnknownUser):
        return None


@router.get("/account/ledger.csv")
async def ledger_csv(
    request: Request, console: ConsoleDep, user_id: str, since: str = "", until: str = ""
) -> Response:
    wanted = ledger_filter(request, user_id, since, until)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", user_id)[:64] or "account"
    period = f"-{since or 'start'}-{until or 'now'}" if since or until else ""
    lines = _csv_lines(console, wanted)
    # The first chunk is read before the answer starts: a database that does not answer is
    # then a 503 page, not a connection reset halfway through a download.
    first = await run_in_threadpool(next, lines)
    return StreamingResponse(
        chain([first], iterate_in_threadpool(lines)), media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="ledger-{name}{period}.csv"'},
    )


@router.get("/account/usage.csv")
async def usage_csv(
    console: ConsoleDep, user_id: str, start: str = "", end: str = "", granularity: str = "day",
    credit_type: str = "",
) -> Response:
    """One account's usage per day (or month) of [start, end), whole UTC days (the last 30
    without them), every credit type or one: the rows `creditworker usage` writes."""
    user(user_id)
    try:
        end_day = day(end) or datetime.now(UTC).date() + timedelta(days=1)
        first_day = day(start) or end_day - timedelta(days=30)
    except OverflowError:
        raise Refused(422, "the dates are outside the calendar") from None
    report = await run_in_threadpool(_usage, console, user_id, first_day, end_day, granularity,
                                     credit_type or None)
    buffer = io.StringIO()
    write_usage_csv(report, buffer)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", user_id)[:64] or "account"
    return Response(buffer.getvalue(), media_type="text/csv; charset=utf-8", headers={
        "Content-Disposition": f'attachment; filename="usage-{name}-{first_day}-{end_day}.csv"'})


def _usage(console: Console, user_id: str, first_day: date, end_day: date, granularity: str = "day",
           credit_type: str | None = None) -> list[UsagePeriod]:
    """The engine's usage report for whole UTC days [first_day, end_day): the chart's figures
    and the usage CSV's rows; bad input is the engine's error, as a page."""
    try:
        return console.credits.get_usage(
            user_id, start=datetime.combine(first_day, datetime.min.time(), UTC),
            end=datetime.combine(end_day, datetime.min.time(), UTC), granularity=granularity,
            credit_type=credit_type)
    except UnknownUser:
        raise Refused(404, f"no account for user {user_id!r}") from None
    except ValidationFailed as exc:
        raise Refused(422, exc.message) from None


async def chain(first: list[str], rest: AsyncIterator[str]) -> AsyncIterator[str]:
    for chunk in first:
        yield chunk
    async for chunk in rest:
        yield chunk


def _csv_lines(console: Console, wanted: queries.LedgerFilter) -> Iterator[str]:
    """The CSV in chunks of 500 rows, so a large ledger streams."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for count, row in enumerate(queries.ledger_rows(console.engine, wanted), 1):
        row["created_at"] = row["created_at"].isoformat()
        writer.writerow([_csv_cell(row[column]) for column in CSV_COLUMNS])
        if count % 500 == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def _csv_cell(value: Any) -> Any:
    """A cell a spreadsheet shows as text, never runs as a formula (CSV injection)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return "" if value is None else value


def _ttl(expires_at: datetime, now: datetime) -> str:
    seconds = int((expires_at - now).total_seconds())
    if seconds <= 0:
        return "expired"
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h {minutes}m" if hours else f"{minutes}m {seconds}s"
