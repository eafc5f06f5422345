"""The writer: set-based (its statements do not grow with the batch) and exact (any text
round-trips) on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Engine

from creditworker import CreditService
from creditworker.records.audit import audit


@contextmanager
def counted_statements(engine: Engine) -> Iterator[list[str]]:
    statements: list[str] = []

    def count(_connection: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", count)


def mixed_batches(service: CreditService, size: int, prefix: str) -> int:
    """A batch of adds, deducts and reserves, then one that commits and releases the holds;
    returns how many statements the two took."""
    users = [f"{prefix}-{n}" for n in range(size)]
    service.apply_batch([{"op": "add", "user_id": user, "amount": 100} for user in users])
    with counted_statements(service.engine) as statements:
        first = service.apply_batch(
            [{"op": "add", "user_id": user, "amount": 5} for user in users]
            + [{"op": "deduct", "user_id": user, "amount": 3} for user in users]
            + [{"op": "reserve", "user_id": user, "amount": 4} for user in users]
        )
        holds = [outcome.result["id"] for outcome in first[2 * size:] if outcome.result]
        second = service.apply_batch(
            [{"op": "commit", "reservation_id": hold, "amount": 2} for hold in holds[: size // 2]]
            + [{"op": "release", "reservation_id": hold} for hold in holds[size // 2:]]
        )
    assert all(outcome.ok for outcome in first + second)
    return len(statements)


def test_a_batch_takes_as_many_statements_for_fifty_accounts_as_for_four(service: CreditService) -> None:
    assert mixed_batches(service, 4, "small") == mixed_batches(service, 50, "large")
    assert audit(service.engine).passed


def test_any_text_round_trips_exactly_through_the_writer(service: CreditService) -> None:
    tricky = 'quote " backslash \\ comma , braces {} NULL ümlaut 💳'
    metadata = {"note": tricky, "nested": {"list": [1, "two", None]}, "empty": ""}
    service.add_credits("ann", 10, description=tricky, metadata=metadata, idempotency_key=tricky)
    entry = service.deduct_credits("ann", 3, description="", metadata={"k": tricky})
    (stored_deduct, stored_add) = service.get_history("ann")
    assert (stored_add.description, stored_add.metadata, stored_add.idempotency_key) == (tricky, metadata, tricky)
    assert stored_deduct == entry and stored_deduct.description == ""
    again = service.add_credits("ann", 10, description=tricky, metadata=metadata, idempotency_key=tricky)
    assert again == stored_add  # the replay rebuilds the same entry from its row


def test_each_step_of_a_metered_request_is_two_round_trips_on_postgresql(pg_engine: Engine) -> None:
    """The middleware's steps (reserve, then commit or release; a deduct) each send the lock
    with every read, then the writes with COMMIT: a release used to take five."""
    service = CreditService(pg_engine)
    service.add_credits("meter", 100)
    with counted_statements(service.engine) as statements:
        hold = service.reserve_credits("meter", 10, idempotency_key="m-1")
        reserved = len(statements)
        service.commit_reservation(hold.id, 4)
        committed = len(statements) - reserved
        second = service.reserve_credits("meter", 10)
        before = len(statements)
        service.release_reservation(second.id)
        released = len(statements) - before
        service.deduct_credits("meter", 1)
        deducted = len(statements) - before - released
    assert (reserved, committed, released, deducted) == (2, 2, 2, 2), statements
    assert service.get_user_credits_info("meter").available == 95
    assert audit(service.engine).passed


def test_another_credit_types_totals_go_with_the_writes_on_postgresql(pg_engine: Engine) -> None:
    """A reserve and a commit in another credit type: the lock with its reads, that type's
    totals and lots (two queries), then the writes with COMMIT, that type's totals among
    them. Its holds past their TTL come with the lock: no query of their own."""
    service = CreditService(pg_engine)
    service.add_credits("typed", 100)
    service.add_credits("typed", 50, credit_type="tokens")
    with counted_statements(service.engine) as statements:
        hold = service.reserve_credits("typed", 10, credit_type="tokens")
        reserved = len(statements)
        service.commit_reservation(hold.id, 4)
        committed = len(statements) - reserved
    assert (reserved, committed) == (4, 4), statements

    stale = service.reserve_credits("typed", 5, credit_type="tokens", ttl_seconds=1)
    later = datetime.now(UTC) + timedelta(minutes=1)
    with counted_statements(service.engine) as statements:
        service.deduct_credits("typed", 6, credit_type="tokens", now=later)
    assert not [statement for statement in statements if "FROM reservations" in statement], statements
    assert service.get_reservation(stale.id).status == "expired"
    tokens = service.get_user_credits_info("typed", credit_type="tokens", now=later)
    assert (tokens.total, tokens.reserved, tokens.available) == (40, 0, 40)
    assert audit(service.engine).passed


def test_listeners_see_each_statement_once_as_sent_with_or_without_other_listeners(pg_engine: Engine) -> None:
    """The engine's scripts fold BEGIN and COMMIT in themselves and skip SQLAlchemy's dispatch
    when nothing else listens; a listener added later sees every statement as it is sent
    (BEGIN first, COMMIT last, each once), before and after it runs."""
    service = CreditService(pg_engine)
    service.add_credits("heard", 100)
    unheard = service.reserve_credits("heard", 10)  # nothing listening: the fast path
    before: list[str] = []
    after: list[str] = []

    def note_before(_connection: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        before.append(statement)

    def note_after(_connection: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        after.append(statement)

    event.listen(service.engine, "before_cursor_execute", note_before)
    event.listen(service.engine, "after_cursor_execute", note_after)
    try:
        service.commit_reservation(unheard.id, 4)
    finally:
        event.remove(service.engine, "before_cursor_execute", note_before)
        event.remove(service.engine, "after_cursor_execute", note_after)
    assert before == after and len(before) == 2, before
    assert before[0].startswith("BEGIN ISOLATION LEVEL READ COMMITTED;") and before[1].endswith("COMMIT")
    assert sum(statement.count("BEGIN ISOLATION") for statement in before) == 1
    service.release_reservation(service.reserve_credits("heard", 5).id)  # unheard again
    info = service.get_user_credits_info("heard")
    assert (info.total, info.reserved, info.available) == (96, 0, 96)
    assert audit(service.engine).passed


def test_a_listener_to_transactions_hears_the_engines_own(pg_engine: Engine) -> None:
    """Folded transactions keep SQLAlchemy's account of themselves only when someone listens
    to it: a `begin`/`commit` listener hears each of the engine's transactions, and the
    writes are the same either way."""
    service = CreditService(pg_engine)
    service.add_credits("told", 50)
    heard: list[str] = []

    def began(_connection: Any) -> None:
        heard.append("begin")

    def committed(_connection: Any) -> None:
        heard.append("commit")

    event.listen(service.engine, "begin", began)
    event.listen(service.engine, "commit", committed)
    try:
        hold = service.reserve_credits("told", 10)
        service.commit_reservation(hold.id, 3)
    finally:
        event.remove(service.engine, "begin", began)
        event.remove(service.engine, "commit", committed)
    assert heard == ["begin", "commit"] * 2
    service.deduct_credits("told", 2)  # nobody listening again
    assert service.get_user_credits_info("told").available == 45
    assert audit(service.engine).passed


def test_a_json_column_stores_the_same_text_for_one_row_and_for_many(pg_engine: Engine) -> None:
    """The JSON columns (type `json`, kept as sent) hold the same text whether the row went
    alone (`json_populate_record` keeps the value's text) or in a batch (the engine's encoder
    writes each value): compact, UTF-8 as it is."""
    service = CreditService(pg_engine)
    metadata = {"a": 1, "b": [1, "ü"]}
    service.add_credits("json-one", 5, metadata=metadata)
    service.apply_batch([{"op": "add", "user_id": user, "amount": 5, "metadata": metadata}
                         for user in ("json-many-1", "json-many-2")])
    with pg_engine.connect() as connection:
        stored = connection.execute(text(
            "SELECT metadata::text FROM ledger_entries WHERE user_id LIKE 'json-%' ORDER BY id")).scalars().all()
    assert stored == ['{"a":1,"b":[1,"ü"]}'] * 3


def test_values_orjson_refuses_are_written_as_the_standard_library_writes_them(pg_engine: Engine) -> None:
    """Integers beyond 64 bits and text with a lone surrogate are plain JSON to the contract;
    orjson refuses both, and the writer falls back to `json.dumps` (a row alone and a batch)."""
    service = CreditService(pg_engine)
    metadata = {"n": 10**30, "m": [2**64, -(2**70)], "s": "a\ud800b"}
    service.add_credits("wide-one", 5, metadata=metadata)
    outcomes = service.apply_batch([{"op": "add", "user_id": user, "amount": 5, "metadata": metadata}
                                    for user in ("wide-many-1", "wide-many-2")])
    assert all(outcome.ok for outcome in outcomes)
    for user in ("wide-one", "wide-many-1", "wide-many-2"):
        (entry,) = service.get_history(user)
        assert entry.metadata == metadata and service.get_user_credits_info(user).available == 5
    with pg_engine.connect() as connection:
        stored = connection.execute(text(
            "SELECT metadata::text FROM ledger_entries WHERE user_id LIKE 'wide-%' ORDER BY id")).scalars().all()
    assert stored == [json.dumps(metadata, separators=(",", ":"))] * 3
