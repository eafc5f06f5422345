"""JSON text from values the caller knows to be acyclic, without `json.JSONEncoder`'s
per-call set-up.

`JSONEncoder.encode` rebuilds its C encoder, a circular-reference table and a float
formatter in Python on every call; a metered request encodes about a dozen small objects
(rows, fingerprints, metadata checks), and that set-up was most of their cost. The encoder
here is built once and called directly. It keeps no circular-reference table (a shared one
would be wrong across threads): callers pass values that cannot hold a cycle (rows the engine
built, requests whose nesting was checked first). It writes exactly what `json.dumps` with
the same options writes (`tests/engine/test_json_text.py`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

_c_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)


def _not_serializable(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def json_encoder(
    *,
    default: Callable[[Any], Any] | None = None,
    sort_keys: bool = False,
    allow_nan: bool = True,
    separators: tuple[str, str] = (",", ":"),
) -> Callable[[Any], str]:
    """A function from an acyclic value to the text `json.dumps(value, default=default,
    sort_keys=sort_keys, allow_nan=allow_nan, separators=separators)` gives."""
    item_separator, key_separator = separators
    if _c_make_encoder is None:  # an interpreter without the C accelerator
        return json.JSONEncoder(default=default, sort_keys=sort_keys, allow_nan=allow_nan,
                                separators=separators, check_circular=False).encode
    encode_chunks = _c_make_encoder(
        None, default or _not_serializable, json.encoder.encode_basestring_ascii,  # type: ignore[attr-defined]
        None, key_separator, item_separator, sort_keys, False, allow_nan,
    )

    def encode(value: Any) -> str:
        return "".join(encode_chunks(value, 0))

    return encode


_RECENT_TIMES: dict[int, tuple[datetime, str]] = {}
"""The last few times converted by `utc_text`, by identity (each entry holds its datetime, so
its id is not reused while it is here)."""


def utc_text(value: datetime) -> str:
    """An aware UTC datetime as naive ISO text (`2026-12-07T03:40:00.123456`, microseconds
    only if any): what the engine stores, and, with `Z` after it, what pydantic's JSON mode
    writes.

    A metered request makes about sixteen conversions of three distinct times (the rows'
    timestamps, the results', the statements' `at`). `datetime.isoformat` formats through
    `sprintf` (12,000 instructions for an aware datetime) and an `lru_cache` hashes an aware
    datetime, the first time, through its UTC offset and two timedeltas (6,000): the last few
    are kept by identity instead."""
    if value.tzinfo is not UTC:
        raise ValueError(f"utc_text takes an aware UTC datetime, not {value!r}")
    known = _RECENT_TIMES.get(id(value))
    if known is not None and known[0] is value:
        return known[1]
    text = value.isoformat()[:-6]
    if len(_RECENT_TIMES) >= 64:
        _RECENT_TIMES.clear()
    _RECENT_TIMES[id(value)] = (value, text)
    return text
