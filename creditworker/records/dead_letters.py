"""Dead letters: messages a worker could not even read, kept for an operator.

A message with the wrong shape (not `[args, kwargs, embed]`, kwargs that are not an
object, an unknown task, undecodable bytes, a content type other than JSON, an oversized
body) cannot become an operation, and retrying it can never help. Celery would crash the
worker on some of these and requeue them forever; the worker's intake
(`creditworker.worker.intake`) stores each one here instead, whole, and goes on. This
module knows nothing of Celery: it stores and lists what it is given.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from creditworker.storage.tables import DeadLetterRow

MAX_STORED_BODY = 32 * 1024
"""Bytes of a body kept (base64 of this still fits MySQL's TEXT); `body_size` says the rest."""
MAX_STORED_HEADERS = 16 * 1024
"""Characters of JSON kept for the headers and for the properties, each."""


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered message as it arrived, and why it could not be applied."""

    id: int | None
    reason: str
    task_id: str | None
    task_name: str | None
    queue: str | None
    content_type: str | None
    content_encoding: str | None
    headers: dict[str, Any]
    properties: dict[str, Any]
    body: str
    body_encoding: str
    body_size: int
    received_at: datetime

    @classmethod
    def capture(
        cls,
        reason: str,
        *,
        body: bytes | str | None,
        headers: Any,
        properties: Any,
        content_type: str | None,
        content_encoding: str | None,
        queue: str | None,
        now: datetime | None = None,
    ) -> DeadLetter:
        """Everything worth keeping of a raw message, bounded in size whatever arrived."""
        raw = body.encode("utf-8", "surrogateescape") if isinstance(body, str) else (body or b"")
        kept = raw[:MAX_STORED_BODY]
        if _is_utf8(raw) and b"\x00" not in kept:  # whole characters only: a cut may split one
            text, encoding = kept.decode("utf-8", "ignore"), "utf-8"
        else:
            text, encoding = base64.b64encode(kept).decode("ascii"), "base64"
        header_map = _bounded_json(headers)
        task_id, task_name = header_map.get("id"), header_map.get("task")
        return cls(
            id=None,
            reason=reason[:2000],
            task_id=task_id[:255] if isinstance(task_id, str) else None,
            task_name=task_name[:255] if isinstance(task_name, str) else None,
            queue=queue[:255] if isinstance(queue, str) and queue else None,
            content_type=content_type[:255] if isinstance(content_type, str) else None,
            content_encoding=content_encoding[:64] if isinstance(content_encoding, str) else None,
            headers=header_map,
            properties=_bounded_json(properties),
            body=text,
            body_encoding=encoding,
            body_size=len(raw),
            received_at=now or datetime.now(UTC),
        )

    def body_bytes(self) -> bytes:
        """The stored body (at most MAX_STORED_BODY bytes of what arrived)."""
        if self.body_encoding == "base64":
            return base64.b64decode(self.body)
        return self.body.encode("utf-8")

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "reason": self.reason, "task_id": self.task_id,
            "task_name": self.task_name, "queue": self.queue, "content_type": self.content_type,
            "content_encoding": self.content_encoding, "headers": self.headers,
            "properties": self.properties, "body": self.body, "body_encoding": self.body_encoding,
            "body_size": self.body_size, "received_at": self.received_at.isoformat(),
        }


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _bounded_json(value: Any) -> dict[str, Any]:
    """A JSON-safe copy of a header or property mapping, cut to MAX_STORED_HEADERS."""
    if not isinstance(value, dict):
        return {"unreadable": repr(value)[:MAX_STORED_HEADERS]}
    text = json.dumps(value, default=repr)
    if len(text) > MAX_STORED_HEADERS:
        return {"truncated": text[:MAX_STORED_HEADERS]}
    loaded: dict[str, Any] = json.loads(text)
    return loaded


class DeadLetterStore:
    """The `dead_letters` table: add, list, show and purge."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def add(self, letter: DeadLetter) -> int:
        row = DeadLetterRow(
            task_id=letter.task_id, task_name=letter.task_name, queue=letter.queue,
            reason=letter.reason, content_type=letter.content_type,
            content_encoding=letter.content_encoding, headers=letter.headers,
            properties=letter.properties, body=letter.body, body_encoding=letter.body_encoding,
            body_size=letter.body_size, received_at=letter.received_at,
        )
        with Session(self.engine) as session, session.begin():
            session.add(row)
            session.flush()
            return int(row.id)

    def newest(self, *, limit: int = 50, before_id: int | None = None) -> list[DeadLetter]:
        """Newest first."""
        query = select(DeadLetterRow).order_by(DeadLetterRow.id.desc()).limit(limit)
        if before_id is not None:
            query = query.where(DeadLetterRow.id < before_id)
        with Session(self.engine) as session:
            return [_letter(row) for row in session.scalars(query)]

    def get(self, letter_id: int) -> DeadLetter | None:
        with Session(self.engine) as session:
            row = session.get(DeadLetterRow, letter_id)
            return None if row is None else _letter(row)

    def count(self) -> int:
        with Session(self.engine) as session:
            return int(session.scalar(select(func.count()).select_from(DeadLetterRow)) or 0)

    def purge(self, *, ids: list[int] | None = None, before: datetime | None = None) -> int:
        """Delete the given letters, or those received before `before`, or (neither) all."""
        statement = delete(DeadLetterRow)
        if ids is not None:
            statement = statement.where(DeadLetterRow.id.in_(ids))
        if before is not None:
            statement = statement.where(DeadLetterRow.received_at < before)
        with Session(self.engine) as session, session.begin():
            return int(session.execute(statement).rowcount or 0)  # type: ignore[attr-defined]


def _letter(row: DeadLetterRow) -> DeadLetter:
    return DeadLetter(
        id=row.id, reason=row.reason, task_id=row.task_id, task_name=row.task_name,
        queue=row.queue, content_type=row.content_type, content_encoding=row.content_encoding,
        headers=row.headers, properties=row.properties, body=row.body,
        body_encoding=row.body_encoding, body_size=row.body_size, received_at=row.received_at,
    )
