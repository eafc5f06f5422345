"""Reading the console's forms: the posted fields after the CSRF check, and each field as
the engine wants it. A field that cannot be read is `Refused` with 422 and a message that
names it; nothing is applied."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl

from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request

from creditworker.contract.credits import MAX_DESCRIPTION_LENGTH, EntryKind, UserId
from creditworker.http.console import queries
from creditworker.http.console.access import CSRF_FIELD, Operator, csrf_refusal
from creditworker.http.console.pages import Refused

FORM_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


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


def text(fields: dict[str, str], name: str, *, required: bool = True) -> str:
    value = fields.get(name, "").strip()
    if required and not value:
        raise Refused(422, f"{name.replace('_', ' ')} is required")
    return value


def optional_integer(fields: dict[str, str], name: str) -> int | None:
    value = text(fields, name, required=False)
    if not value:
        return None
    try:
        return int(value.replace(",", "").replace("_", ""))
    except ValueError:
        raise Refused(422, f"{name.replace('_', ' ')} must be a whole number") from None


def integer(fields: dict[str, str], name: str) -> int:
    value = optional_integer(fields, name)
    if value is None:
        raise Refused(422, f"{name.replace('_', ' ')} is required")
    return value


def reason(fields: dict[str, str]) -> str:
    given = text(fields, "reason")
    if len(given) > MAX_DESCRIPTION_LENGTH:
        raise Refused(422, f"the reason is longer than {MAX_DESCRIPTION_LENGTH} characters")
    return given


def idempotency_key(fields: dict[str, str], action: str) -> str:
    """The action's key, from the token rendered into the form: one form, one operation."""
    token = fields.get("form_token", "")
    if not FORM_TOKEN.match(token):
        raise Refused(422, "the form has no valid form token: reload the page")
    return f"console:{action}:{token}"


def metadata(request: Request, why: str) -> dict[str, Any]:
    """The ledger entry's metadata: the reason and the acting key's id (never the key)."""
    return {"console": {"reason": why, "operator_key": request.state.operator.key_id}}


def day(value: str | None) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise Refused(422, f"{value!r} is not a date (YYYY-MM-DD)") from None


def moment(value: str) -> datetime | None:
    """A date or a datetime-local value from a form, read as UTC."""
    if not value:
        return None
    try:
        given = datetime.fromisoformat(value)
    except ValueError:
        raise Refused(422, f"{value!r} is not a date or time") from None
    if given.tzinfo is None:
        given = given.replace(tzinfo=UTC)
    return given


def kinds(values: list[str]) -> list[str]:
    known = {kind.value for kind in EntryKind}
    return [value for value in values if value in known]


def ledger_filter(request: Request, user_id: str, since: str, until: str) -> queries.LedgerFilter:
    """The ledger entries a page or an export asks for: kinds, and whole UTC days."""
    user(user_id)
    first, last = day(since), day(until)
    try:
        end = datetime.combine(last + timedelta(days=1), datetime.min.time(), UTC) if last else None
    except OverflowError:
        raise Refused(422, f"{until!r} is past the last day the ledger can be filtered to") from None
    return queries.LedgerFilter(
        user_id, kinds(request.query_params.getlist("kind")),
        datetime.combine(first, datetime.min.time(), UTC) if first else None, end,
    )


_USER_ID: TypeAdapter[str] = TypeAdapter(UserId)


def user(user_id: str) -> str:
    """A user id as the engine accepts it, or 422 saying why."""
    try:
        return _USER_ID.validate_python(user_id)
    except ValidationError as exc:
        problem = exc.errors(include_url=False, include_input=False)[0]["msg"]
        raise Refused(422, f"user id {user_id!r}: {problem}") from None


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def search(text_given: str) -> str:
    """A search prefix: any text but control characters (a NUL cannot even reach
    PostgreSQL)."""
    if _CONTROL.search(text_given):
        raise Refused(422, "the search must not contain control characters")
    return text_given.strip()


def plan_ref(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def price(fields: dict[str, str]) -> Decimal:
    given = fields.get("price", "").strip() or "0"
    try:
        return Decimal(given)
    except InvalidOperation:
        raise Refused(422, f"price {given!r} is not a number") from None
