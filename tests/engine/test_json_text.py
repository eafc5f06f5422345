"""`json_encoder` writes what `json.dumps` writes with the same options: the fingerprints
stored with every operation depend on it byte for byte. `utc_text` writes what `isoformat`
writes, however many times it has kept."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from creditworker.contract.json_text import json_encoder, utc_text

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_it_writes_what_json_dumps_writes(value: Any) -> None:
    assert json_encoder(sort_keys=True)(value) == json.dumps(value, sort_keys=True, separators=(",", ":"))
    assert json_encoder()(value) == json.dumps(value, separators=(",", ":"))
    assert json_encoder(allow_nan=False)(value) == json.dumps(value, allow_nan=False, separators=(",", ":"))


def test_default_writes_what_json_cannot() -> None:
    at = datetime(2026, 12, 7, tzinfo=UTC)
    encode = json_encoder(default=lambda value: value.isoformat())
    assert encode({"at": at, "n": [at]}) == json.dumps({"at": at, "n": [at]}, default=lambda value: value.isoformat(),
                                                       separators=(",", ":"))


def test_it_refuses_as_json_dumps_does() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        json_encoder()({"a": object()})
    with pytest.raises(ValueError, match="Out of range float"):
        json_encoder(allow_nan=False)([math.inf])
    assert json_encoder()([math.nan]) == "[NaN]"


@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)))
def test_utc_text_is_the_naive_iso_text_pydantic_and_postgres_read(value: datetime) -> None:
    expected = value.replace(tzinfo=None).isoformat()
    assert utc_text(value) == expected
    assert utc_text(value) == expected  # again, from what it kept
    assert datetime.fromisoformat(utc_text(value) + "+00:00") == value


def test_utc_text_keeps_each_time_apart_however_many_it_has_seen() -> None:
    times = [datetime(2026, 12, 7, 3, 40, second % 60, microsecond, tzinfo=UTC)
             for second, microsecond in zip(range(200), range(0, 200_000, 1000), strict=True)]
    for _ in range(2):
        assert [utc_text(at) for at in times] == [at.replace(tzinfo=None).isoformat() for at in times]


def test_utc_text_refuses_a_time_that_is_not_utc() -> None:
    from datetime import timedelta, timezone

    with pytest.raises(ValueError, match="aware UTC"):
        utc_text(datetime(2026, 12, 7, 3, 40))
    with pytest.raises(ValueError, match="aware UTC"):
        utc_text(datetime(2026, 12, 7, 3, 40, tzinfo=timezone(timedelta(hours=1))))
