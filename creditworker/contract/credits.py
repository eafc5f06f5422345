"""The wire contract shared by the engine, the worker tasks and every producer.

Requests and results of every credit operation as Pydantic models, the limits they enforce
and the task names. It imports neither SQLAlchemy nor Celery: a producer installs this
module's dependencies (pydantic) and nothing of the storage stack.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import re
import types
import typing
from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, ClassVar, TextIO, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from creditworker.contract.errors import ValidationFailed
from creditworker.contract.json_text import json_encoder, utc_text

MAX_AMOUNT = 10**12
"""Largest amount one operation may carry (one trillion of the smallest unit)."""
MAX_BALANCE = 2**62
"""Largest balance an account may reach; a grant beyond it is refused."""
MAX_USER_ID_LENGTH = 128
MAX_KEY_LENGTH = 200
MAX_DESCRIPTION_LENGTH = 500
MAX_METADATA_BYTES = 8192
MAX_METADATA_DEPTH = 32
"""Objects and arrays nested in metadata at most this deep (a deeper value is refused, not
left to overflow the stack of every encoder and decoder it meets)."""
DEFAULT_RESERVATION_TTL_SECONDS = 300
MAX_RESERVATION_TTL_SECONDS = 7 * 24 * 3600
MAX_PRIORITY = 1_000_000
MAX_HISTORY_PAGE = 1000
MAX_WITHIN_DAYS = 3660
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DEFAULT_CREDIT_TYPE = "credits"
"""The credit type of a request that names none, and of every row stored before types."""
MAX_CREDIT_TYPE_LENGTH = 32
CREDIT_TYPE_PATTERN = r"^[a-z][a-z0-9_]*$"
"""A credit type is a short lower-case identifier (`credits`, `images`, `api_tokens`)."""


class CreditSource(StrEnum):
    PURCHASE = "purchase"
    BONUS = "bonus"
    SUBSCRIPTION = "subscription"
    ADJUSTMENT = "adjustment"
    PROMOTIONAL = "promotional"
    TOP_UP = "top_up"
    """Bought by an auto top-up (issue 29): granted only once the charge succeeded."""


PROMOTIONAL_SOURCES: frozenset[str] = frozenset({CreditSource.BONUS.value, CreditSource.PROMOTIONAL.value})
"""Sources of credits given away rather than paid for: at equal priority and expiry, a draw
takes them before paid ones (the one list; docs/credit-types.md)."""


class EntryKind(StrEnum):
    ADD = "add"
    DEDUCT = "deduct"
    RESERVE = "reserve"
    COMMIT = "commit"
    RELEASE = "release"
    EXPIRE = "expire"
    RESERVATION_EXPIRED = "reservation_expired"
    VOID = "void"
    REFUND = "refund"
    EXPIRY_CHANGED = "expiry_changed"
    ROLLOVER = "rollover"


class ReservationStatus(StrEnum):
    ACTIVE = "active"
    COMMITTED = "committed"
    RELEASED = "released"
    EXPIRED = "expired"


class OveragePolicy(StrEnum):
    """What a commit above the held amount does when `available` cannot cover the extra."""

    REJECT = "reject"
    ALLOW_NEGATIVE = "allow_negative"


_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f]")
"""A regular expression, not a loop over the characters: it runs once per text field of
every request (about 40 us per identifier as a Python loop, under 1 us as a search). ASCII
text, most of it, is checked by `str.isprintable` instead, which in ASCII refuses exactly
these (U+0000-U+001F, U+007F) and costs a fraction of a search over the class."""


def _check_text(value: str) -> str:
    if value.isascii() and value.isprintable():  # no ASCII control: the search would find none
        return value
    if _CONTROL_CHARACTER.search(value):
        raise ValueError("must not contain control characters")
    return _check_utf8(value)


def _check_utf8(value: str) -> str:
    """Refuses lone surrogates, which no database stores (ASCII text, the most of it, is
    known to be fine without encoding it)."""
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid UTF-8 text") from exc
    return value


_INVISIBLE_CHARACTER = re.compile(
    "[\x00-\x1f\x7f-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u180e"
    "\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd"
    "\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001"
    "\U000e0020-\U000e007f]"
)
"""Every Unicode control (Cc) and format (Cf) character: C1 controls, zero-width characters,
bidi overrides and isolates, soft hyphen, tags. In an id they make one name look like another
(`admin\u202egnp.exe` shows as `adminexe.png`); descriptions keep format characters (emoji
sequences need U+200D). tests/engine/test_credits.py checks the class against `unicodedata`."""


def _check_identifier(value: str) -> str:
    """Ids and keys compare byte for byte on every database, so no edge whitespace, and they
    are shown to people, so nothing invisible."""
    if value != value.strip():
        raise ValueError("must not be blank or start or end with whitespace")
    if value.isascii() and value.isprintable():  # no ASCII control: nothing else there is invisible
        return value
    if _INVISIBLE_CHARACTER.search(value):  # every control character among them
        raise ValueError("must not contain control or format characters (Unicode Cc, Cf: "
                         "zero-width, bidi overrides)")
    return _check_utf8(value)


def _as_utc(value: datetime) -> datetime:
    """Naive datetimes are taken as UTC; aware ones are converted to UTC."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError as exc:  # e.g. 0001-01-01T00:00:00+05:00
        raise ValueError("is out of range once converted to UTC") from exc


_NESTING = (dict, list)


def nesting_depth(value: Any) -> int:
    """How deep objects and arrays nest in `value`, counted without recursion (a deep value
    would overflow the stack of a recursive count), stopping past the limit."""
    if type(value) is dict:  # most metadata: one flat object
        for child in value.values():
            if isinstance(child, _NESTING):
                break
        else:
            return 1
    deepest = 0
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, _NESTING):
            deepest = max(deepest, depth)
            if deepest > MAX_METADATA_DEPTH:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children)
    return deepest


_STRICT_JSON = json_encoder(allow_nan=False)


def _check_metadata(value: dict[str, Any]) -> dict[str, Any]:
    if nesting_depth(value) > MAX_METADATA_DEPTH:
        raise ValueError(f"must nest objects and arrays at most {MAX_METADATA_DEPTH} deep")
    try:
        encoded = _STRICT_JSON(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"must be plain JSON: {exc}") from exc
    except RecursionError:  # tuples (which `nesting_depth` does not count) in a cycle or too deep
        raise ValueError("must be plain JSON: nested too deep to encode (or it contains itself)") from None
    if len(encoded.encode("utf-8")) > MAX_METADATA_BYTES:
        raise ValueError(f"must encode to at most {MAX_METADATA_BYTES} bytes of JSON")
    return value


UserId = Annotated[
    str,
    Strict(),
    Field(min_length=1, max_length=MAX_USER_ID_LENGTH),
    AfterValidator(_check_identifier),
]
Amount = Annotated[int, Strict(), Field(gt=0, le=MAX_AMOUNT)]
NonNegativeAmount = Annotated[int, Strict(), Field(ge=0, le=MAX_AMOUNT)]
IdempotencyKey = Annotated[
    str,
    Strict(),
    Field(min_length=1, max_length=MAX_KEY_LENGTH),
    AfterValidator(_check_identifier),
]
Description = Annotated[
    str, Strict(), Field(max_length=MAX_DESCRIPTION_LENGTH), AfterValidator(_check_text)
]
Metadata = Annotated[dict[str, Any], AfterValidator(_check_metadata)]
UtcDateTime = Annotated[datetime, AfterValidator(_as_utc)]
Priority = Annotated[int, Strict(), Field(ge=-MAX_PRIORITY, le=MAX_PRIORITY)]
CreditType = Annotated[
    str, Strict(), Field(min_length=1, max_length=MAX_CREDIT_TYPE_LENGTH, pattern=CREDIT_TYPE_PATTERN)
]
"""Which kind of credit an operation moves; kinds never mix (see docs/credit-types.md)."""
ReservationId = Annotated[
    str, Strict(), Field(min_length=1, max_length=64), AfterValidator(_check_identifier)
]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Request(_Message):
    """A write request; its fingerprint (everything but the key) guards idempotency."""

    NOT_FINGERPRINTED: ClassVar[frozenset[str]] = frozenset({"idempotency_key"})
    """Fields that say when or how a request was sent, not what it asks: a retry with the
    same key may carry other values and is still the same request."""
    OMITTED_AT_DEFAULT: ClassVar[frozenset[str]] = frozenset({"credit_type", "effective_at", "cost_basis"})
    """Fields added after requests were stored: at their default they are left out of the
    fingerprint, so a request stored before them keeps its fingerprint (a retry replays)."""

    idempotency_key: IdempotencyKey | None = None

    def fingerprint(self) -> str:
        """SHA-256 of the request as canonical JSON: `{"op": class name, **fields}` as
        `model_dump(mode="json")` gives them (minus `NOT_FINGERPRINTED`), keys sorted, no
        spaces. Stored with every operation row, so it must never change for the same request
        (`tests/engine/test_fingerprint.py` pins values). Models whose fields are all of plain
        types take the same JSON values from their attributes without `model_dump`, which was
        most of the cost (6 us a request)."""
        fields = _plain_fields(type(self))
        if fields is None:
            body = self.model_dump(mode="json", exclude=set(self.NOT_FINGERPRINTED))
            for name in self.OMITTED_AT_DEFAULT & body.keys():
                if body[name] == type(self).model_fields[name].default:
                    del body[name]
            canonical = _CANONICAL({"op": type(self).__name__, **body})
        else:
            values = self.__dict__
            parts = []
            for name, head, convert, omitted in fields:
                value = type(self).__name__ if name is None else values[name]
                if omitted is not _KEPT and value == omitted:
                    continue
                if value is None:
                    parts.append(head + "null")
                elif convert is _TEXT:
                    parts.append(head + _json_text(value))
                elif convert is None:  # an int
                    parts.append(head + int.__repr__(value))
                else:
                    parts.append(head + _CANONICAL(convert(value)))
            canonical = "{" + ",".join(parts) + "}"
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


_CANONICAL = json_encoder(sort_keys=True)
"""`json.dumps(..., sort_keys=True, separators=(",", ":"))`, built once."""
_JSON_OBJECT = TypeAdapter(dict[str, Any])
_DATETIME = TypeAdapter(datetime)


def json_datetime(value: datetime) -> str:
    """A datetime as pydantic's JSON mode writes it (UTC as `Z`, microseconds only if any):
    in fingerprints and in the engine's results."""
    if value.tzinfo is UTC:
        return utc_text(value) + "Z"
    return _DATETIME.dump_python(value, mode="json")  # type: ignore[no-any-return]


def _json_object(value: dict[str, Any]) -> Any:
    return _JSON_OBJECT.dump_python(value, mode="json")


def _enum_value(value: Any) -> Any:
    return value.value


_TEXT: Callable[[Any], Any] = str
"""The converter of text fields (their JSON is the string, escaped as `json.dumps` does)."""
_json_text: Callable[[str], str] = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


_KEPT = object()
"""In `_plain_fields`: the field is in the fingerprint whatever its value."""


@functools.cache
def _plain_fields(
    model: type[BaseModel],
) -> tuple[tuple[str | None, str, Callable[[Any], Any] | None, Any], ...] | None:
    """The canonical JSON of `model`'s fingerprint, field by field in key order: the field
    (None: the `op`, the class name), its `"key":` text, and how to turn its value into the
    JSON value `model_dump(mode="json")` gives (None for an int, `_TEXT` for text). None when
    a field's type is not one of the plain ones known here (the fingerprint then calls
    `model_dump`). The last item of each is the default at which the field is left out
    (`Request.OMITTED_AT_DEFAULT`), or `_KEPT`."""
    decorators = model.__pydantic_decorators__
    if decorators.field_serializers or decorators.model_serializers:
        return None
    excluded = getattr(model, "NOT_FINGERPRINTED", frozenset())
    omitted = getattr(model, "OMITTED_AT_DEFAULT", frozenset())
    fields: list[tuple[str | None, str, Callable[[Any], Any] | None, Any]] = [(None, '"op":', _TEXT, _KEPT)]
    for name, field in model.model_fields.items():
        if name in excluded:
            continue
        if field.exclude or field.alias not in (None, name) or field.serialization_alias not in (None, name):
            return None
        convert = _converter(field.annotation, field.metadata)
        if convert is False or not name.isidentifier() or not name.isascii():
            return None
        fields.append((name, f'"{name}":', convert, field.default if name in omitted else _KEPT))  # type: ignore[arg-type]
    return tuple(sorted(fields, key=lambda field: field[0] or "op"))


def _converter(annotation: Any, metadata: list[Any]) -> Callable[[Any], Any] | None | bool:
    """The converter of one field's type: None for an int, `_TEXT` for text, False: unknown."""
    if any(type(item).__name__ in ("PlainSerializer", "WrapSerializer") for item in metadata):
        return False
    if typing.get_origin(annotation) is Annotated:
        base, *extra = typing.get_args(annotation)
        return _converter(base, [*metadata, *extra])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _converter(options[0], metadata) if len(options) == 1 else False
    if annotation is str:
        return _TEXT
    if annotation is int:
        return None
    if annotation is datetime:
        return json_datetime
    if annotation == dict[str, Any]:
        return _json_object
    if isinstance(annotation, type) and issubclass(annotation, StrEnum):
        return _enum_value
    return False


class AddCredits(Request):
    user_id: UserId
    amount: Amount
    expires_at: UtcDateTime | None = None
    priority: Priority | None = None
    source: CreditSource = CreditSource.PURCHASE
    description: Description | None = None
    metadata: Metadata | None = None
    credit_type: CreditType = DEFAULT_CREDIT_TYPE
    effective_at: Moment | None = None
    """Until this moment the grant is pending: shown, counted in the total, not spendable."""
    cost_basis: CostBasis | None = None
    """What was paid per credit, carried onto every draw of the lot (usage values it)."""

    @model_validator(mode="after")
    def _effective_before_expiry(self) -> AddCredits:
        if self.effective_at is not None and self.expires_at is not None and self.expires_at <= self.effective_at:
            raise ValueError("expires_at must be after effective_at")
        return self


class DeductCredits(Request):
    user_id: UserId
    amount: Amount
    description: Description | None = None
    metadata: Metadata | None = None
    credit_type: CreditType = DEFAULT_CREDIT_TYPE


class ReserveCredits(Request):
    NOT_FINGERPRINTED = frozenset({"idempotency_key", "requested_at", "deadline"})

    user_id: UserId
    amount: Amount
    ttl_seconds: Annotated[int, Strict(), Field(gt=0, le=MAX_RESERVATION_TTL_SECONDS)] = (
        DEFAULT_RESERVATION_TTL_SECONDS
    )
    description: Description | None = None
    metadata: Metadata | None = None
    requested_at: UtcDateTime | None = None
    """When the caller asked: the hold's TTL runs from the earlier of this and the time the
    engine applies it (so a producer clock running ahead cannot lengthen a hold)."""
    deadline: UtcDateTime | None = None
    """When the caller stops waiting: the engine refuses the reservation after it, and a
    reservation that reaches it later is not applied (`invalid_input`, `applied: false`)."""
    credit_type: CreditType = DEFAULT_CREDIT_TYPE


class CostBasis(_Message):
    """The price paid per credit of a grant: a decimal amount and an ISO 4217 currency."""

    amount: Annotated[Decimal, Field(ge=0, max_digits=24, decimal_places=12, allow_inf_nan=False)]
    currency: Annotated[str, Strict(), Field(pattern=r"^[A-Z]{3}$")]


class CommitReservation(Request):
    reservation_id: ReservationId
    amount: NonNegativeAmount | None = Field(default=None, description="Credits to charge; omitted: the amount held.")
    description: Description | None = None
    metadata: Metadata | None = None


class ReleaseReservation(Request):
    reservation_id: ReservationId


def _after_epoch(value: datetime) -> datetime:
    if value < EPOCH:
        raise ValueError("must not be before 1970-01-01T00:00:00Z")
    return value


Moment = Annotated[datetime, AfterValidator(_as_utc), AfterValidator(_after_epoch)]
"""A moment a read asks about: naive is taken as UTC (as everywhere), before the epoch refused."""
RowId = Annotated[int, Strict(), Field(gt=0, le=2**63 - 1)]
"""A lot or ledger entry id: the columns are BIGINT, so a larger id is no id at all."""
LotId = RowId
Reason = Annotated[
    str, Strict(), Field(min_length=1, max_length=MAX_DESCRIPTION_LENGTH), AfterValidator(_check_text)
]
"""Why a correction was made: `refund`, `chargeback`, `fraud`, `correction`, or free text."""


class VoidLot(Request):
    """Remove what is left of a grant (or `amount` of it); consumed credits stay consumed."""

    lot_id: LotId
    reason: Reason
    amount: Amount | None = Field(default=None, description="Credits to void; omitted: all that is left.")


class RefundDeduction(Request):
    """Give back all (or `amount`) of a deduction or commit to the lots it drew from."""

    entry_id: RowId
    reason: Reason
    amount: Amount | None = Field(default=None, description="Credits to give back; omitted: all that is left.")


class ChangeLotExpiry(Request):
    """Move a grant's expiry; a moment already past expires what is left of it now."""

    lot_id: LotId
    expires_at: UtcDateTime


LowThreshold = Annotated[int, Strict(), Field(ge=0, le=MAX_AMOUNT)]
"""`credits.low` when `available` is at or below it (0: off)."""
ThresholdPercent = Annotated[int, Strict(), Field(ge=1, le=100)]
"""A low threshold as a percentage of the credit type's last grant (rounded up)."""


class SetLowCreditThreshold(Request):
    """An account's low-credit threshold in one credit type: an amount, a percentage of that
    type's last grant, or neither (the default type goes back to the service default; another
    type has no `credits.low`, only depleted and recovered). The type's once-per-crossing
    flag is re-armed. Keyed like every write, so a redelivered task applies it once."""

    user_id: UserId
    threshold: LowThreshold | None = None
    percent: ThresholdPercent | None = None
    credit_type: CreditType = DEFAULT_CREDIT_TYPE

    @model_validator(mode="after")
    def _one_kind(self) -> SetLowCreditThreshold:
        if self.threshold is not None and self.percent is not None:
            raise ValueError("give a threshold or a percent, not both")
        return self


class LowCreditThreshold(BaseModel):
    """The threshold an account now has in a credit type (None: the service default for the
    default type, none for another); with a percent, what that percentage of the type's
    last grant is now (0 before any grant: off until one lands)."""

    model_config = ConfigDict(frozen=True)

    user_id: str
    credit_type: str
    threshold: int | None
    percent: int | None


class GetCredits(_Message):
    user_id: UserId
    at: Moment | None = None
    """The balance as it was at this moment (None: now)."""
    credit_type: CreditType | None = None
    """One credit type's balance (None: the default type's, with `by_type` for all)."""


class Granularity(StrEnum):
    DAY = "day"
    MONTH = "month"


class GetUsage(_Message):
    """Credits granted, consumed, expired, voided and refunded per period of [start, end);
    one user's, or all accounts' together when `user_id` is None."""

    start: Moment
    end: Moment
    granularity: Granularity = Granularity.DAY
    user_id: UserId | None = None
    credit_type: CreditType | None = None
    """One credit type's usage (None: every type's together)."""

    @model_validator(mode="after")
    def _ordered(self) -> GetUsage:
        if self.start > self.end:
            raise ValueError("start must not be after end")
        return self


class GetHistory(_Message):
    user_id: UserId
    limit: Annotated[int, Strict(), Field(gt=0, le=MAX_HISTORY_PAGE)] = 50
    before: Annotated[int, Strict(), Field(gt=0)] | None = None
    kinds: list[EntryKind] | None = None
    credit_type: CreditType | None = None
    """One credit type's entries (None: every type's)."""


class GetReservation(_Message):
    reservation_id: ReservationId


class GetExpiring(_Message):
    user_id: UserId
    within_days: Annotated[int, Strict(), Field(ge=0, le=MAX_WITHIN_DAYS)] = 7
    credit_type: CreditType | None = None


class LedgerEntry(BaseModel):
    """One immutable change to an account, as stored and as written to the ledger file.

    `amount` is the signed change to the balance, `held` the signed change to the credits
    on hold; `draws` lists the lots a deduction or commit drew from.
    """

    model_config = ConfigDict(frozen=True)

    id: int
    user_id: str
    kind: EntryKind
    amount: int
    held: int
    balance_after: int
    reserved_after: int
    available_after: int
    lot_id: int | None = None
    reservation_id: str | None = None
    draws: list[dict[str, Any]] = Field(default_factory=list)
    """`{"lot_id", "amount"}` per lot drawn, with `unit_cost` (decimal text) and `currency`
    when the lot has a cost basis."""
    description: str | None = None
    metadata: dict[str, Any] | None = None
    idempotency_key: str
    created_at: datetime
    credit_type: str = DEFAULT_CREDIT_TYPE


class Reservation(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    user_id: str
    amount: int
    status: ReservationStatus
    expires_at: datetime
    created_at: datetime
    committed_amount: int | None = None
    idempotency_key: str
    credit_type: str = DEFAULT_CREDIT_TYPE


class CreditLot(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    user_id: str
    amount: int
    remaining: int
    source: CreditSource
    priority: int
    expires_at: datetime | None
    created_at: datetime
    credit_type: str = DEFAULT_CREDIT_TYPE
    effective_at: datetime | None = None
    cost_basis: CostBasis | None = None


class TypeTotals(BaseModel):
    """One credit type's totals in a `CreditsInfo`."""

    model_config = ConfigDict(frozen=True)

    total: int
    reserved: int
    available: int
    pending: int = 0


class CreditsInfo(BaseModel):
    """A balance summary, read in O(1) from the account row (plus its live lots)."""

    model_config = ConfigDict(frozen=True)

    user_id: str
    total: int
    reserved: int
    available: int
    expiring_soon: int
    expiring_within_days: int
    at: datetime | None = None
    """The moment of a balance read in the past (`expiring_soon` is then 0: not computed)."""
    credit_type: str = DEFAULT_CREDIT_TYPE
    """The type the totals above are of."""
    pending: int = 0
    """Granted credits not effective yet: in `total`, not in `available`."""
    by_type: dict[str, TypeTotals] | None = None
    """Every type the account holds, when no type was asked for (None when one was)."""


class UsagePeriod(BaseModel):
    """One period of a usage report: each column a positive number of credits.

    `by_kind` is the signed sum of `amount` per entry kind in the period, every kind
    included, so a kind the columns do not name yet still shows up."""

    model_config = ConfigDict(frozen=True)

    period: date
    granted: int = 0
    consumed: int = 0
    expired: int = 0
    voided: int = 0
    refunded: int = 0
    by_kind: dict[str, int] = Field(default_factory=dict)
    consumed_cost: dict[str, Decimal] = Field(default_factory=dict)
    """What the consumed credits cost, per currency, from their lots' cost basis (refunds
    taken off); credits of lots without one are not in it."""


USAGE_CSV_COLUMNS = ("period", "granted", "consumed", "expired", "voided", "refunded", "consumed_cost")
"""The usage CSV's header, for `creditworker usage` and the console's per-account export."""


def usage_csv_row(period: UsagePeriod) -> list[str | int]:
    """One period as a CSV row; the cost reads `12.50 EUR; 3.00 USD` (currencies sorted)."""
    cost = "; ".join(f"{amount} {currency}" for currency, amount in sorted(period.consumed_cost.items()))
    return [period.period.isoformat(), period.granted, period.consumed, period.expired, period.voided,
            period.refunded, cost]


def write_usage_csv(report: Iterable[UsagePeriod], out: TextIO) -> None:
    """A usage report as CSV, a header and a row per period: the one way every edge writes it
    (here, beside the report's model, so the CLI writes it without the storage stack)."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(USAGE_CSV_COLUMNS)
    writer.writerows(usage_csv_row(period) for period in report)


M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], payload: Any) -> M:
    """Validate a payload into `model`, raising `ValidationFailed` with every problem named."""
    if not isinstance(payload, dict):
        raise ValidationFailed(
            f"{model.__name__} expects a JSON object, got {type(payload).__name__}"
        )
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        problems = [
            {
                "field": ".".join(str(part) for part in err["loc"]) or "(root)",
                "problem": err["msg"],
            }
            for err in exc.errors(include_url=False, include_input=False)
        ]
        summary = "; ".join(f"{p['field']}: {p['problem']}" for p in problems)
        raise ValidationFailed(f"invalid {model.__name__}: {summary}", problems=problems) from None



# ---------------------------------------------------------------- batches

MAX_BATCH = 1000
BATCH_OPERATIONS: dict[str, type[Request]] = {
    "add": AddCredits,
    "deduct": DeductCredits,
    "reserve": ReserveCredits,
    "commit": CommitReservation,
    "release": ReleaseReservation,
}
"""The `op` of a batch item and the request it carries (its other fields)."""


class SubmitBatch(_Message):
    """Many operations for one transaction: `{"op": "deduct", "user_id": ..., ...}` each."""

    operations: Annotated[list[dict[str, Any]], Field(min_length=1, max_length=MAX_BATCH)]


class BatchOutcome(BaseModel):
    """One item's outcome: the result of its operation, or its typed error."""

    ok: bool
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


def parse_batch_item(item: Any) -> Request:
    """A batch item as its request model; a bad item raises `ValidationFailed`."""
    if not isinstance(item, dict) or item.get("op") not in BATCH_OPERATIONS:
        raise ValidationFailed(
            f"a batch item needs an 'op' of {', '.join(BATCH_OPERATIONS)}", item_type=type(item).__name__
        )
    fields = {name: value for name, value in item.items() if name != "op"}
    return parse(BATCH_OPERATIONS[item["op"]], fields)
