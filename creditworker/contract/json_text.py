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
