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

from pydantic import BaseModel, ConfigDict
from sqlalchemy import insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from creditworker.storage.tables import LedgerRecordRow

logger = logging.getLogger(__name__)

MAX_PAGE = 1000


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
    # Any value a refused request carried (a Decimal, an object) stored as its text.
    records = [{**record, "details": json.loads(json.dumps(record["details"], default=str))} for record in records]
    try:
        with engine.begin() as connection:
            connection.execute(insert(LedgerRecordRow), list(records))
    except SQLAlchemyError as exc:
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
