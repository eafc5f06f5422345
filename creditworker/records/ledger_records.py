"""Ledger records beside the entries: refused operations (`error`) and sweep runs (`system`).

Entries say how balances changed; these say what did not change and why (a refusal, with
the request and its typed error) and what the background work did (expiry, stale holds,
reminders, allocation: counts per run). They are written in a transaction of their own,
after the operation's transaction ended, so a refusal still changes nothing else, and a
record that cannot be written (an older schema, a lost connection) is logged and dropped,
never turned into the operation's error. The JSON-lines ledger file gets the same records.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from sqlalchemy import insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from creditworker.contract.credits import UserId
from creditworker.storage.tables import LedgerRecordRow

logger = logging.getLogger(__name__)

MAX_PAGE = 1000
_USER_ID: TypeAdapter[str] = TypeAdapter(UserId)


class RecordKind(StrEnum):
    ERROR = "error"
    SYSTEM = "system"


class LedgerRecord(BaseModel):
    model_config = ConfigDict(frozen=True, from_attributes=True)

    id: int
    kind: RecordKind
    operation: str
    user_id: str | None
    code: str | None
    message: str | None
    details: dict[str, Any]
    created_at: datetime


def store(engine: Engine, records: Sequence[dict[str, Any]]) -> None:
    """Insert `records` (rows of `ledger_records`) in one statement and one transaction."""
    if not records:
        return
    records = [{**record, "user_id": _identifier_or_none(record["user_id"]),
                "message": _printable(record["message"]), "details": _plain_json(record["details"])}
               for record in records]
    try:
        with engine.begin() as connection:
            connection.execute(insert(LedgerRecordRow), list(records))
    except (SQLAlchemyError, ValueError, TypeError) as exc:  # e.g. text the driver cannot encode
        logger.warning("could not store %d ledger records: %s", len(records), exc)


def read(
    engine: Engine, *, kind: RecordKind | str | None = None, user_id: str | None = None,
    limit: int = 50, before: int | None = None,
) -> list[LedgerRecord]:
    """Records newest first; pass the last one's id as `before` for the next page."""
    query = select(LedgerRecordRow)
    if kind is not None:
        query = query.where(LedgerRecordRow.kind == RecordKind(kind).value)
    if user_id is not None:
        query = query.where(LedgerRecordRow.user_id == user_id)
    if before is not None:
        query = query.where(LedgerRecordRow.id < before)
    query = query.order_by(LedgerRecordRow.id.desc()).limit(max(1, min(limit, MAX_PAGE)))
    with engine.connect() as connection:
        return [LedgerRecord.model_validate(row, from_attributes=True) for row in connection.execute(query)]


def _identifier_or_none(user_id: Any) -> str | None:
    """The user id of a refused request, if it is one a user could have (else it stays
    in the details only)."""
    try:
        return _USER_ID.validate_python(user_id) if user_id is not None else None
    except ValidationError:
        return None


def _printable(text: str | None) -> str | None:
    """Text every driver stores: lone surrogates and NULs escaped."""
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _plain_json(details: dict[str, Any]) -> dict[str, Any]:
    """Any value a refused request carried (a Decimal, an object, a lone surrogate, a NUL)
    stored as text the JSON column and every driver accept."""

    def plain(value: Any) -> Any:
        if isinstance(value, str):
            return _printable(value)
        if isinstance(value, dict):
            return {str(_printable(str(key))): plain(item) for key, item in value.items()}
        if isinstance(value, list):
            return [plain(item) for item in value]
        return value

    return plain(json.loads(json.dumps(details, default=str)))  # type: ignore[no-any-return]
