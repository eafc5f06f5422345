"""Reading a streamed response's events as they pass, without holding any of them back.

LLM APIs stream `text/event-stream` (server-sent events: `data: {...}` lines, a blank line
ends an event, `data: [DONE]` at the end) or `application/x-ndjson` (one JSON per line),
and put the usage in the last event when asked to. `EventReader` is fed each chunk after it
was sent on, splits complete events out of it and parses only those that may matter (whose
text holds one of the given keys), so the cost per chunk is a scan of its bytes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

STREAM_MEDIA_TYPES = ("text/event-stream", "application/x-ndjson")
MAX_EVENT_BYTES = 4 * 1024 * 1024
"""An event (or line) longer than this is skipped unread: the reader's memory stays bounded
whatever the stream sends."""


class EventReader:
    """Splits a stream into events and parses the JSON of those that name a wanted key."""

    def __init__(self, media_type: str, wanted: Sequence[str]) -> None:
        self.sse = media_type == "text/event-stream"
        self.wanted = [f'"{key}"'.encode() for key in wanted]
        self._partial = bytearray()
        self._data: list[bytes] = []
        self._skipping = False

    def feed(self, chunk: bytes) -> list[Any]:
        """The parsed events completed by `chunk` (those that hold a wanted key), in order."""
        if not chunk:
            return []
        events: list[Any] = []
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                break
            if self._partial:
                self._partial += chunk[start:end]
                line = bytes(self._partial)
                self._partial.clear()
            else:
                line = chunk[start:end]
            start = end + 1
            if self._skipping:
                self._skipping = False
                continue
            self._line(line.rstrip(b"\r"), events)
        rest = chunk[start:]
        if rest and not self._skipping:
            self._partial += rest
            if len(self._partial) > MAX_EVENT_BYTES:
                logger.warning("metering: a streamed line of more than %d bytes was not read", MAX_EVENT_BYTES)
                self._partial.clear()
                self._skipping = True
        return events

    def close(self) -> list[Any]:
        """What the stream's last, unterminated line or event held."""
        events: list[Any] = []
        if self._partial and not self._skipping:
            self._line(bytes(self._partial).rstrip(b"\r"), events)
        self._partial.clear()
        if self.sse:
            self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[Any]) -> None:
        if not self.sse:
            if line.strip():
                self._parse(line, events)
            return
        if not line:
            if self._data:
                data = b"\n".join(self._data)
                self._data.clear()
                self._parse(data, events)
            return
        if line.startswith(b"data:"):
            data = line[5:]
            self._data.append(data[1:] if data.startswith(b" ") else data)
            if sum(len(part) for part in self._data) > MAX_EVENT_BYTES:
                logger.warning("metering: a streamed event of more than %d bytes was not read", MAX_EVENT_BYTES)
                self._data.clear()

    def _parse(self, data: bytes, events: list[Any]) -> None:
        if not any(key in data for key in self.wanted):
            return
        try:
            events.append(json.loads(data))
        except ValueError:
            pass  # not JSON (`[DONE]`, a comment): nothing to meter


def stream_media_type(media_type: str) -> bool:
    return media_type in STREAM_MEDIA_TYPES
