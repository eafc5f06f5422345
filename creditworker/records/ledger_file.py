"""The JSON-lines ledger file: the same entries as the database, for people debugging.

Each record is one line written with a single ``write()`` on a file opened for append, so
lines from several worker processes never interleave.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from creditworker.contract.credits import LedgerEntry
from creditworker.contract.errors import CreditError


class LedgerFile:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def write_entries(self, entries: Iterable[LedgerEntry]) -> None:
        self.write_records(entry.model_dump(mode="json") for entry in entries)

    def write_records(self, entries: Iterable[dict[str, Any]]) -> None:
        """Entries already in JSON form (`LedgerEntry.model_dump(mode="json")`)."""
        self._append({"record": "entry", **entry} for entry in entries)

    def write_errors(self, refused: Iterable[tuple[str, dict[str, Any], CreditError]], at: datetime) -> None:
        """Refused operations (operation name, request as JSON, error), in one append."""
        self._append({"record": "error", "operation": operation, "request": request,
                      "error": error.to_dict(), "at": at.isoformat()} for operation, request, error in refused)

    def write_system(self, operation: str, counts: dict[str, Any], at: datetime) -> None:
        """What a sweep run did (its counts)."""
        self._append([{"record": "system", "operation": operation, "counts": counts, "at": at.isoformat()}])

    def _append(self, records: Iterable[dict[str, Any]]) -> None:
        text = "".join(json.dumps(record, default=str) + "\n" for record in records)
        if not text:
            return
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, text.encode("utf-8"))
            finally:
                os.close(fd)
