"""The operator console's pages and actions: each a short adapter over the engine.

Reads come from the engine's public reads plus `queries` (paged, on indexes); every change
goes through `CreditService` or `SubscriptionService` with an idempotency key made from a
token rendered into the form, so a form submitted twice (a double click, a resent POST)
acts once: the engine answers the second submit with the first result.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from kombu.utils.url import maybe_sanitize_url
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from creditworker.contract.credits import MAX_DESCRIPTION_LENGTH, EntryKind, OveragePolicy
from creditworker.contract.errors import (
    CreditError,
    UnknownSubscription,
    UnknownUser,
    ValidationFailed,
)
from creditworker.contract.periods import BillingPeriod
from creditworker.engine import CreditService, SubscriptionService
from creditworker.http.console import queries
from creditworker.http.console.access import (
    CSRF_COOKIE,
    CSRF_FIELD,
    SESSION_COOKIE,
    SESSION_SECONDS,
    ConsoleAccess,
    Operator,
    csrf_refusal,
    csrf_token,
    set_cookie,
)
from creditworker.http.console.chart import SERIES, daily_chart
from creditworker.http.console.system import AuditResult, bounded, ping_workers, queue_depths
from creditworker.http.responses import STATUS_BY_CODE
from creditworker.records.dead_letters import DeadLetterStore
from creditworker.settings import Settings
from creditworker.worker.app import make_celery

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
PUBLIC_PATHS = ("/login", "/static/")
FORM_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
MAX_CHART_DAYS = 366
DONE = {
    "grant": "Credits granted.", "adjust": "Balance adjusted.", "release": "Hold released.",
    "threshold": "Low-credit threshold set.", "plan": "Plan set.",
    "plan-created": "Plan created.", "plan-updated": "Plan updated.", "audit": "Audit finished.",
}


SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    # Scripts, styles and images from the console's own files only; never framed.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


class Refused(Exception):
    """A request the console answers with an error page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ------------------------------------------------------------------ form fields


def _text(fields: dict[str, str], name: str, *, required: bool = True) -> str:
    value = fields.get(name, "").strip()
    if required and not value:
        raise Refused(422, f"{name.replace('_', ' ')} is required")
    return value


def _optional_integer(fields: dict[str, str], name: str) -> int | None:
    value = _text(fields, name, required=False)
    if not value:
        return None
    try:
        return int(value.replace(",", "").replace("_", ""))
    except ValueError:
        raise Refused(422, f"{name.replace('_', ' ')} must be a whole number") from None


def _integer(fields: dict[str, str], name: str) -> int:
    value = _optional_integer(fields, name)
    if value is None:
        raise Refused(422, f"{name.replace('_', ' ')} is required")
    return value


def _reason(fields: dict[str, str]) -> str:
    reason = _text(fields, "reason")
    if len(reason) > MAX_DESCRIPTION_LENGTH:
        raise Refused(422, f"the reason is longer than {MAX_DESCRIPTION_LENGTH} characters")
    return reason


def _idempotency_key(fields: dict[str, str], action: str) -> str:
    """The action's key, from the token rendered into the form: one form, one operation."""
    token = fields.get("form_token", "")
    if not FORM_TOKEN.match(token):
        raise Refused(422, "the form has no valid form token: reload the page")
    return f"console:{action}:{token}"


def _day(value: str | None) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise Refused(422, f"{value!r} is not a date (YYYY-MM-DD)") from None


def _moment(value: str) -> datetime | None:
    """A date or a datetime-local value from a form, read as UTC."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise Refused(422, f"{value!r} is not a date or time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment


def _kinds(values: list[str]) -> list[str]:
    known = {kind.value for kind in EntryKind}
    return [value for value in values if value in known]


def _ttl(expires_at: datetime, now: datetime) -> str:
    seconds = int((expires_at - now).total_seconds())
    if seconds <= 0:
        return "expired"
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h {minutes}m" if hours else f"{minutes}m {seconds}s"


# ------------------------------------------------------------------ the app


def create_console(settings: Settings, credits: CreditService) -> FastAPI:
    """The console as an app to mount at `/console` in the gateway."""
    engine = credits.engine
    subscriptions = SubscriptionService(credits)
    dead_letters = DeadLetterStore(engine)
    access = ConsoleAccess(
        [key.strip() for key in settings.api_keys.split(",") if key.strip()],
        broker_url=settings.broker_url,
    )
    celery_app = make_celery(settings)
    last_audit = AuditResult()
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["when"] = lambda moment: (
        moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if moment else ""
    )
    templates.env.filters["q"] = lambda value: quote(str(value), safe="")
    templates.env.filters["count"] = lambda value: f"{int(value):,}"

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    # -------------------------------------------------------------- rendering

    def render(
        request: Request, template: str, status: int = 200, **context: Any
    ) -> Response:
        token, new = csrf_token(request)
        response = templates.TemplateResponse(
            request, template,
            {"base": request.scope.get("root_path", ""), "csrf_field": CSRF_FIELD,
             "csrf": token, "operator": getattr(request.state, "operator", None),
             "open_console": access.open, "new_token": lambda: secrets.token_urlsafe(16),
             **context},
            status_code=status,
        )
        if new:
            set_cookie(request, response, CSRF_COOKIE, token, SESSION_SECONDS)
        response.headers.update(SECURITY_HEADERS)
        return response

    def redirect(request: Request, path: str, **params: Any) -> RedirectResponse:
        query = urlencode({name: value for name, value in params.items() if value is not None})
        target = f"{request.scope.get('root_path', '')}{path}" + (f"?{query}" if query else "")
        return RedirectResponse(target, status_code=303)

    async def posted_form(request: Request) -> dict[str, str]:
        """The urlencoded form, after the CSRF check (a bearer key needs none: a browser
        never adds one to a request another site makes)."""
        content_type = request.headers.get("content-type", "")
        body = await request.body()
        fields: dict[str, str] = {}
        if content_type.startswith("application/x-www-form-urlencoded"):
            fields = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        operator: Operator | None = getattr(request.state, "operator", None)
        if operator is None or operator.via != "bearer":
            refusal = csrf_refusal(request, fields.get(CSRF_FIELD))
            if refusal is not None:
                raise Refused(403, refusal)
        return fields

    def log_action(request: Request, action: str, target: str, reason: str) -> None:
        operator: Operator = request.state.operator
        logger.info("console %s on %r by key %s: %s", action, target, operator.key_id, reason)

    def metadata(request: Request, reason: str) -> dict[str, Any]:
        return {"console": {"reason": reason, "operator_key": request.state.operator.key_id}}

    # -------------------------------------------------------------- access

    @app.middleware("http")
    async def require_key(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        path = request.scope["path"][len(request.scope.get("root_path", "")):] or "/"
        if path.startswith(PUBLIC_PATHS):
            request.state.operator = access.operator(request)
            return await call_next(request)
        operator = access.operator(request)
        if operator is None:
            if request.method in ("GET", "HEAD") and "authorization" not in request.headers:
                wanted = path + (f"?{request.url.query}" if request.url.query else "")
                return redirect(request, "/login", next=wanted)
            return Response(
                "log in at /console/login, or send 'Authorization: Bearer <API key>'\n",
                status_code=401, headers={"WWW-Authenticate": "Bearer"},
                media_type="text/plain",
            )
        request.state.operator = operator
        return await call_next(request)

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Refused)
        return render(request, "error.html", exc.status, message=exc.message)

    @app.exception_handler(CreditError)
    async def engine_refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, CreditError)
        status = STATUS_BY_CODE.get(exc.code, 400)
        return render(request, "error.html", status, message=exc.message, code=exc.code)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return render(request, "error.html", exc.status_code, message=str(exc.detail))

    @app.get("/login")
    async def login_page(request: Request, next: str = "/") -> Response:
        if request.state.operator is not None:
            return redirect(request, _safe_next(next))
        return render(request, "login.html", next=_safe_next(next),
                      closed=access.closed_reason())

    @app.post("/login")
    async def login(request: Request) -> Response:
        fields = await posted_form(request)
        session = access.login(fields.get("api_key", ""))
        if session is None:
            return render(request, "login.html", 401, next=_safe_next(fields.get("next", "/")),
                          closed=access.closed_reason(), failed=True)
        response = redirect(request, _safe_next(fields.get("next", "/")))
        set_cookie(request, response, SESSION_COOKIE, session, SESSION_SECONDS)
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        await posted_form(request)
        response = redirect(request, "/login")
        response.delete_cookie(SESSION_COOKIE, path=request.scope.get("root_path") or "/")
        return response

    # -------------------------------------------------------------- accounts

    @app.get("/")
    async def accounts(request: Request, q: str = "") -> Response:
        prefix = q.strip()
        if prefix:
            found = await run_in_threadpool(queries.search_accounts, engine, prefix)
        else:
            found = await run_in_threadpool(queries.recent_accounts, engine)
        return render(request, "accounts.html", q=prefix, accounts=found)

    @app.get("/account")
    async def account(
        request: Request, user_id: str, since: str = "", until: str = "",
        before: int | None = None, after: int | None = None, days: int = 30, done: str = "",
    ) -> Response:
        kinds = _kinds(request.query_params.getlist("kind"))
        first, last = _day(since), _day(until)
        wanted = queries.LedgerFilter(
            user_id, kinds,
            datetime.combine(first, datetime.min.time(), UTC) if first else None,
            datetime.combine(last + timedelta(days=1), datetime.min.time(), UTC) if last else None,
        )
        days = min(max(days, 1), MAX_CHART_DAYS)
        return await run_in_threadpool(
            _account_page, request, user_id, wanted, before, after, days, done
        )

    def _account_page(
        request: Request, user_id: str, wanted: queries.LedgerFilter, before: int | None,
        after: int | None, days: int, done: str,
    ) -> Response:
        now = datetime.now(UTC)
        try:
            info = credits.get_user_credits_info(user_id)
        except UnknownUser:
            info = None
        except ValidationFailed as exc:
            raise Refused(422, exc.message) from None
        context: dict[str, Any] = {
            "user_id": user_id, "info": info, "done": DONE.get(done),
            "kinds": [kind.value for kind in EntryKind], "filter": wanted,
            "since": request.query_params.get("since", ""),
            "until": request.query_params.get("until", ""),
            "plans": subscriptions.list_plans(), "days": days,
        }
        if info is not None:
            horizon = now + timedelta(days=credits.expiring_soon_days)
            lots = queries.live_lots(engine, user_id)
            for lot in lots:
                lot["expiring_soon"] = lot["expires_at"] is not None and lot["expires_at"] <= horizon
            holds = queries.active_holds(engine, user_id)
            for hold in holds:
                hold["ttl"] = _ttl(hold["expires_at"], now)
            try:
                subscription = subscriptions.get_user_subscription(user_id)
            except (UnknownSubscription, UnknownUser):
                subscription = None
            all_plans = {plan.id: plan for plan in subscriptions.list_plans(include_inactive=True)}
            totals = queries.daily_totals(
                engine, user_id, now.date() - timedelta(days=days - 1), now.date()
            )
            context.update(
                threshold=queries.account_threshold(engine, user_id),
                default_threshold=credits.low_credit_threshold, lots=lots, holds=holds,
                subscription=subscription, all_plans=all_plans,
                page=queries.ledger_page(engine, wanted, before=before, after=after),
                chart=daily_chart(totals), series=SERIES,
                sums={name: sum(getattr(day, name) for day in totals) for name, _ in SERIES},
                ledger_query=urlencode(
                    [("user_id", user_id)] + [("kind", kind) for kind in wanted.kinds]
                    + [("since", context["since"]), ("until", context["until"])]
                ),
            )
        return render(request, "account.html", **context)

    @app.get("/account/ledger.csv")
    async def ledger_csv(
        request: Request, user_id: str, since: str = "", until: str = ""
    ) -> Response:
        kinds = _kinds(request.query_params.getlist("kind"))
        first, last = _day(since), _day(until)
        wanted = queries.LedgerFilter(
            user_id, kinds,
            datetime.combine(first, datetime.min.time(), UTC) if first else None,
            datetime.combine(last + timedelta(days=1), datetime.min.time(), UTC) if last else None,
        )

        def lines() -> Iterator[str]:
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            columns = ["id", "created_at", "kind", "amount", "held", "balance_after",
                       "reserved_after", "lot_id", "reservation_id", "description",
                       "idempotency_key"]
            writer.writerow(columns)
            for count, row in enumerate(queries.ledger_rows(engine, wanted), 1):
                row["created_at"] = row["created_at"].isoformat()
                writer.writerow([_csv_cell(row[column]) for column in columns])
                if count % 500 == 0:
                    yield buffer.getvalue()
                    buffer.seek(0)
                    buffer.truncate()
            yield buffer.getvalue()

        name = re.sub(r"[^A-Za-z0-9_.-]", "_", user_id)[:64] or "account"
        period = f"-{since or 'start'}-{until or 'now'}" if since or until else ""
        return StreamingResponse(
            lines(), media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="ledger-{name}{period}.csv"'},
        )

    # -------------------------------------------------------------- actions

    @app.post("/actions/grant")
    async def grant(request: Request) -> Response:
        fields = await posted_form(request)
        user_id, reason = _text(fields, "user_id"), _reason(fields)
        amount = _integer(fields, "amount")
        source = fields.get("source") or "purchase"
        if source not in ("purchase", "bonus", "adjustment"):
            raise Refused(422, f"unknown source {source!r}")
        await run_in_threadpool(
            credits.add_credits, user_id, amount,
            expires_at=_moment(fields.get("expires_at", "").strip()),
            priority=_optional_integer(fields, "priority"), source=source,
            description=reason, metadata=metadata(request, reason),
            idempotency_key=_idempotency_key(fields, "grant"),
        )
        log_action(request, f"grant {amount}", user_id, reason)
        return redirect(request, "/account", user_id=user_id, done="grant")

    @app.post("/actions/adjust")
    async def adjust(request: Request) -> Response:
        fields = await posted_form(request)
        user_id, reason = _text(fields, "user_id"), _reason(fields)
        delta = _integer(fields, "amount")
        key = _idempotency_key(fields, "adjust")
        if not delta:
            raise Refused(422, "the adjustment must not be zero")
        if delta > 0:
            await run_in_threadpool(
                credits.add_credits, user_id, delta, source="adjustment", description=reason,
                metadata=metadata(request, reason), idempotency_key=key,
            )
        else:
            await run_in_threadpool(
                credits.deduct_credits, user_id, -delta, description=reason,
                metadata=metadata(request, reason), idempotency_key=key,
            )
        log_action(request, f"adjust {delta:+}", user_id, reason)
        return redirect(request, "/account", user_id=user_id, done="adjust")

    @app.post("/actions/release")
    async def release(request: Request) -> Response:
        fields = await posted_form(request)
        user_id, reason = _text(fields, "user_id"), _reason(fields)
        reservation_id = _text(fields, "reservation_id")
        await run_in_threadpool(
            credits.release_reservation, reservation_id,
            idempotency_key=_idempotency_key(fields, "release"),
        )
        log_action(request, f"release {reservation_id}", user_id, reason)
        return redirect(request, "/account", user_id=user_id, done="release")

    @app.post("/actions/threshold")
    async def threshold(request: Request) -> Response:
        fields = await posted_form(request)
        user_id, reason = _text(fields, "user_id"), _reason(fields)
        value = _optional_integer(fields, "threshold")
        # Setting a value is idempotent by nature: a second submit sets the same value.
        await run_in_threadpool(credits.set_low_credit_threshold, user_id, value)
        log_action(request, f"threshold {value}", user_id, reason)
        return redirect(request, "/account", user_id=user_id, done="threshold")

    @app.post("/actions/plan")
    async def set_plan(request: Request) -> Response:
        fields = await posted_form(request)
        user_id, reason = _text(fields, "user_id"), _reason(fields)
        plan = _plan_ref(_text(fields, "plan"))
        key = _idempotency_key(fields, "plan")
        # Assign or change was decided when the form was drawn, so a second submit repeats
        # the same operation with the same key instead of turning into a change.
        if fields.get("operation") == "change":
            await run_in_threadpool(subscriptions.change_plan, user_id, plan, idempotency_key=key)
        else:
            await run_in_threadpool(subscriptions.assign_plan, user_id, plan, idempotency_key=key)
        log_action(request, f"plan {plan}", user_id, reason)
        return redirect(request, "/account", user_id=user_id, done="plan")

    # -------------------------------------------------------------- plans

    @app.get("/plans")
    async def plans_page(request: Request, done: str = "") -> Response:
        plans = await run_in_threadpool(subscriptions.list_plans, include_inactive=True)
        counts = await run_in_threadpool(queries.subscriber_counts, engine)
        return render(request, "plans.html", plans=plans, counts=counts, done=DONE.get(done),
                      periods=[period.value for period in BillingPeriod])

    @app.post("/plans")
    async def create_plan(request: Request) -> Response:
        fields = await posted_form(request)
        reason = _reason(fields)
        name = _text(fields, "name")
        await run_in_threadpool(
            subscriptions.create_plan, name, _integer(fields, "credit_limit"),
            price=_price(fields), currency=_text(fields, "currency").upper(),
            billing_period=_text(fields, "billing_period"),
            validity_days=_optional_integer(fields, "validity_days"),
            idempotency_key=_idempotency_key(fields, "create-plan"),
        )
        log_action(request, "create plan", name, reason)
        return redirect(request, "/plans", done="plan-created")

    @app.get("/plans/edit")
    async def edit_plan_page(request: Request, plan: str) -> Response:
        found = await run_in_threadpool(subscriptions.get_plan, _plan_ref(plan))
        return render(request, "plan_edit.html", plan=found)

    @app.post("/plans/edit")
    async def edit_plan(request: Request) -> Response:
        fields = await posted_form(request)
        reason = _reason(fields)
        plan = _plan_ref(_text(fields, "plan"))
        validity = _optional_integer(fields, "validity_days")
        # Setting values is idempotent by nature: a second submit sets the same values.
        changes: dict[str, Any] = {
            "name": _text(fields, "name"), "credit_limit": _integer(fields, "credit_limit"),
            "price": _price(fields), "currency": _text(fields, "currency").upper(),
            "active": fields.get("active") == "on",
        }
        if validity is not None:
            changes["validity_days"] = validity
        await run_in_threadpool(lambda: subscriptions.update_plan(plan, **changes))
        log_action(request, "update plan", str(plan), reason)
        return redirect(request, "/plans", done="plan-updated")

    # -------------------------------------------------------------- system

    @app.get("/system")
    async def system(request: Request, done: str = "") -> Response:
        workers = await bounded(ping_workers, celery_app)
        depths = await bounded(queue_depths, celery_app)
        outbox = await run_in_threadpool(queries.outbox_state, engine)
        events = await run_in_threadpool(queries.recent_events, engine)
        letters = await run_in_threadpool(lambda: dead_letters.newest(limit=20))
        letter_count = await run_in_threadpool(dead_letters.count)
        now = datetime.now(UTC)
        return render(
            request, "system.html", workers=workers, depths=depths, outbox=outbox,
            lag=outbox.lag_seconds(now), events=events, letters=letters,
            letter_count=letter_count, audit=last_audit, done=DONE.get(done),
            broker=maybe_sanitize_url(settings.broker_url),
        )

    @app.post("/system/audit")
    async def run_audit(request: Request) -> Response:
        await posted_form(request)
        allow_negative = credits.overage_policy == OveragePolicy.ALLOW_NEGATIVE
        await run_in_threadpool(last_audit.run, engine, allow_negative=allow_negative)
        return redirect(request, "/system", done="audit")

    return app


def _safe_next(target: str) -> str:
    """Only a path inside the console: never another site (`//host`, `https://...`)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _plan_ref(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _price(fields: dict[str, str]) -> Decimal:
    text = fields.get("price", "").strip() or "0"
    try:
        return Decimal(text)
    except InvalidOperation:
        raise Refused(422, f"price {text!r} is not a number") from None


def _csv_cell(value: Any) -> Any:
    """A cell a spreadsheet shows as text, never runs as a formula (CSV injection)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return "" if value is None else value
