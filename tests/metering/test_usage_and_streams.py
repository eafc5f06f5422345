"""Usage numbers in any JSON form, and streamed events split at any byte."""

from __future__ import annotations

import json
from typing import Any

import pytest

from creditworker.http.metering.streams import EventReader
from creditworker.http.metering.usage import TOO_LARGE, UsageError, whole_credits


@pytest.mark.parametrize(("value", "credits"), [
    (12, 12), (12.0, 12), ("12", 12), (" 12 ", 12), (1e3, 1000), ("1e3", 1000), (12.5, 13), ("0.001", 1), (0, 0),
])
def test_whole_numbers_in_any_form_count_as_themselves_and_fractions_round_up(value: Any, credits: int) -> None:
    assert whole_credits(value) == credits


@pytest.mark.parametrize("value", [-1, -0.5, "-3", True, False, [12], {"n": 1}, None, "twelve", "nan", "inf",
                                   float("inf"), "1" * 100])
def test_anything_else_is_a_usage_error(value: Any) -> None:
    with pytest.raises(UsageError):
        whole_credits(value)


def test_huge_numbers_are_capped_without_being_expanded() -> None:
    assert whole_credits("1e999999999") == TOO_LARGE + 1
    assert whole_credits(10**30) == TOO_LARGE + 1


EVENTS = [{"model": "m", "choices": [{"delta": {"content": "hi\n\nthere"}}], "usage": None},
          {"model": "m", "choices": [], "usage": {"prompt_tokens": 3}}]


@pytest.mark.parametrize("media_type", ["text/event-stream", "application/x-ndjson"])
def test_events_are_read_whatever_the_chunk_boundaries(media_type: str) -> None:
    if media_type == "text/event-stream":
        stream = b"".join(b": comment\r\nevent: x\r\ndata: " + json.dumps(e).encode() + b"\r\n\r\n" for e in EVENTS)
        stream += b"data: [DONE]\n\n"
    else:
        stream = b"".join(json.dumps(e).encode() + b"\n" for e in EVENTS)
    for size in (1, 2, 7, len(stream)):
        reader = EventReader(media_type, ["usage", "model"])
        read: list[Any] = []
        for at in range(0, len(stream), size):
            read += reader.feed(stream[at:at + size])
        assert read + reader.close() == EVENTS


def test_events_that_name_no_wanted_key_are_not_parsed() -> None:
    reader = EventReader("text/event-stream", ["usage"])
    assert reader.feed(b'data: {"choices": []}\n\ndata: {"usage": {"x": 1}}\n\n') == [{"usage": {"x": 1}}]


def test_an_unterminated_last_event_is_read_at_the_end() -> None:
    reader = EventReader("text/event-stream", ["usage"])
    assert reader.feed(b'data: {"usage": 5}') == []
    assert reader.close() == [{"usage": 5}]
