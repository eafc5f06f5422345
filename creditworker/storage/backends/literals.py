"""The engine's script parameters written into its statement text as SQL literals, for
psycopg2 on a UTF-8 connection.

psycopg2 binds on the client too, but through its adaptation protocol: per parameter an
adapter object, a `prepare` and a `getquoted` call looked up by name, and libpq's escaping.
A metered request's scripts carry about thirty parameters (rows as JSON text, array
literals, timestamps), and that was 9% of its instructions (callgrind,
bench/engine_instructions.py), several times what quoting them here costs.

The parameters here are text, whole numbers or None (anything else is left to the driver,
`inlined` answers None). Text is written `'...'` when it holds neither a quote nor a
backslash, which reads the same whatever `standard_conforming_strings` says, and otherwise
`E'...'` with both doubled, which reads the same under either setting too. Text with a NUL
character is refused, as psycopg2 refuses it. Only a UTF-8 client encoding is accepted: in
some client-only encodings (SJIS, BIG5, GBK) a multibyte character may end in the byte of a
backslash or a quote, which a quoting that does not know the encoding would get wrong.
`tests/engine/test_literals.py` reads arbitrary text back through PostgreSQL under both
settings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

_PLACEHOLDER_OR_BRACE = re.compile(r"%\((\w+)\)s|%%|[{}]")


def _format_piece(match: re.Match[str]) -> str:
    text = match.group(0)
    if match.group(1) is not None:
        return "{" + match.group(1) + "}"
    return {"%%": "%", "{": "{{", "}": "}}"}[text]


@lru_cache(maxsize=1024)
def _template(statement: str) -> str:
    """`statement`'s `%(name)s` placeholders as `str.format` fields (its braces doubled, its
    `%%` a single `%`, as psycopg2 reads them)."""
    return _PLACEHOLDER_OR_BRACE.sub(_format_piece, statement)


def literal(value: Any) -> str | None:
    """`value` as an SQL literal, or None when it is not text, a whole number or None."""
    if value is None:
        return "NULL"
    kind = type(value)
    if kind is str:
        if "\x00" in value:
            raise ValueError("A string literal cannot contain NUL (0x00) characters.")
        if "'" not in value and "\\" not in value:
            return "'" + value + "'"
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    if kind is int:
        return int.__repr__(value)
    return None


def inlined(statement: str, parameters: Mapping[str, Any]) -> str | None:
    """`statement` with its parameters written in, or None if one of them is of another
    kind (the driver then binds them)."""
    literals = {}
    for name, value in parameters.items():
        text = literal(value)
        if text is None:
            return None
        literals[name] = text
    return _template(statement).format_map(literals)


def utf8_connection(dbapi_connection: Any) -> bool:
    """Whether a psycopg2 connection talks UTF-8 (the only encoding `inlined` is for)."""
    return getattr(dbapi_connection, "encoding", None) in ("UTF8", "UNICODE")
