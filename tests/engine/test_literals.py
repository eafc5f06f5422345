"""The engine's parameters written as SQL literals (storage/backends/literals.py) read back as
the same values on PostgreSQL, whatever `standard_conforming_strings` says: text with quotes,
backslashes, `E'` look-alikes, braces, percent signs, any Unicode but NUL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import event
from sqlalchemy.engine import Engine

from creditworker.storage.backends.literals import inlined, literal, utf8_connection

TRICKY = ["", "'", "''", "\\", "\\'", "E'x'", "\\\\'; DROP TABLE accounts; --", "{}", "%s", "%(x)s", "💳 ü",
          "\u2028", "a\\nb", "$$", "'||'"]


@pytest.fixture(scope="module", params=["on", "off"])
def cursor(request: pytest.FixtureRequest, postgres_url: str) -> Iterator[psycopg2.extensions.cursor]:
    dsn = postgres_url.replace("postgresql+psycopg2://", "postgresql://")
    connection = psycopg2.connect(dsn)
    connection.autocommit = True
    assert utf8_connection(connection)
    with connection.cursor() as cursor:
        cursor.execute(f"SET standard_conforming_strings = {request.param}")
        cursor.execute("SET escape_string_warning = off")
        yield cursor
    connection.close()


def read_back(cursor: psycopg2.extensions.cursor, value: object) -> object:
    text = inlined("SELECT %(value)s, '{}'::text, 100 %% 7", {"value": value})
    assert text is not None
    cursor.execute(text)  # no parameters: psycopg2 reads no placeholders in the text
    got, braces, modulo = cursor.fetchone()
    assert (braces, modulo) == ("{}", 2)
    return got


@pytest.mark.parametrize("value", TRICKY)
def test_tricky_text_reads_back_as_it_was(cursor: psycopg2.extensions.cursor, value: str) -> None:
    assert read_back(cursor, value) == value


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))))
def test_any_text_reads_back_as_it_was(cursor: psycopg2.extensions.cursor, value: str) -> None:
    assert read_back(cursor, value) == value


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_whole_numbers_and_null_read_back(cursor: psycopg2.extensions.cursor, value: int) -> None:
    cursor.execute(inlined("SELECT CAST(%(n)s AS bigint), %(none)s", {"n": value, "none": None}))
    assert cursor.fetchone() == (value, None)


def test_nul_is_refused_and_other_kinds_are_left_to_the_driver() -> None:
    with pytest.raises(ValueError, match="NUL"):
        literal("a\x00b")
    assert literal(True) is None and literal(1.5) is None and literal(b"x") is None
    assert inlined("SELECT %(a)s, %(b)s", {"a": 1, "b": 2.5}) is None


@pytest.mark.parametrize("hide_parameters", [False, True])
def test_an_engine_that_hides_parameters_keeps_values_out_of_the_statement_text(
    postgres_url: str, pg_engine: Engine, hide_parameters: bool
) -> None:
    """Written into the statement, values would be in SQLAlchemy's error messages; an engine
    made with `hide_parameters=True` has the driver bind them instead."""
    from creditworker import CreditService
    from creditworker.storage.database import make_engine

    CreditService(pg_engine).add_credits("private", 10)
    engine = make_engine(postgres_url, hide_parameters=hide_parameters)
    texts: list[str] = []

    def note(_connection: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        texts.append(statement)

    event.listen(engine, "before_cursor_execute", note)
    try:
        CreditService(engine).deduct_credits("private", 1, metadata={"note": "a secret-ish value"})
    finally:
        event.remove(engine, "before_cursor_execute", note)
        engine.dispose()
    assert any("a secret-ish value" in text for text in texts) is not hide_parameters
