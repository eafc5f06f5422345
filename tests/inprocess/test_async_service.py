"""AsyncCreditService: the sync engine's methods, awaitable, in its thread pool, on PostgreSQL and SQLite."""

from __future__ import annotations

import asyncio
import inspect
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect as inspect_database

from creditworker import CreditService, SubscriptionService
from creditworker.contract.errors import IdempotencyConflict, InsufficientCredits
from creditworker.engine.async_service import (
    AsyncCreditService,
    AsyncSubscriptionService,
    public_methods,
)
from creditworker.records.audit import audit


@pytest.mark.parametrize(("sync_class", "async_class"), [
    (CreditService, AsyncCreditService), (SubscriptionService, AsyncSubscriptionService),
])
def test_every_public_method_has_an_awaitable_twin_with_the_same_signature(
    sync_class: type, async_class: type
) -> None:
    for name in public_methods(sync_class):
        twin = getattr(async_class, name)
        assert inspect.iscoroutinefunction(twin), name
        assert inspect.signature(twin) == inspect.signature(getattr(sync_class, name)), name
        assert twin.__wrapped__ is getattr(sync_class, name)  # one implementation, not two


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path, migrated_engines: dict[str, Any]) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'async.db'}"
    from tests.conftest import engine_for, wipe

    url: str = request.getfixturevalue("postgres_url")
    wipe(engine_for(url, migrated_engines))
    return url


def test_concurrent_calls_on_one_account_serialise_and_keep_the_invariants(database_url: str) -> None:
    async def scenario() -> tuple[int, int]:
        credits = AsyncCreditService(database_url)
        await credits.add_credits("alice", 100)
        outcomes = await asyncio.gather(
            *[credits.deduct_credits("alice", 3) for _ in range(40)], return_exceptions=True
        )
        refused = sum(isinstance(outcome, InsufficientCredits) for outcome in outcomes)
        info = await credits.get_user_credits_info("alice")
        await credits.dispose()
        return info.available, refused

    available, refused = run(scenario())
    assert (available, refused) == (100 - 3 * 33, 7)
    sync = CreditService(database_url)
    assert audit(sync.engine).passed


def test_keys_replay_and_conflict_as_in_the_sync_engine(database_url: str) -> None:
    async def scenario() -> None:
        credits = AsyncCreditService(database_url)
        first = await credits.add_credits("bob", 10, idempotency_key="order-1")
        assert await credits.add_credits("bob", 10, idempotency_key="order-1") == first
        with pytest.raises(IdempotencyConflict):
            await credits.add_credits("bob", 11, idempotency_key="order-1")
        hold = await credits.reserve_credits("bob", 4)
        assert (await credits.commit_reservation(hold.id, 3)).amount == -3
        assert [e.kind.value for e in await credits.get_history("bob")] == ["commit", "reserve", "add"]
        await credits.dispose()

    run(scenario())


def test_reports_read_the_same_through_the_async_twin(database_url: str) -> None:
    async def scenario() -> None:
        credits = AsyncCreditService(database_url)
        start = datetime(2030, 1, 1, tzinfo=UTC)
        await credits.add_credits("dora", 10, now=start)
        await credits.deduct_credits("dora", 4, now=start + timedelta(days=1))
        assert (await credits.get_user_credits_info("dora", at=start)).total == 10
        usage = await credits.get_usage("dora", start=start, end=start + timedelta(days=31),
                                        granularity="month")
        assert [(p.granted, p.consumed) for p in usage] == [(10, 4)]
        await credits.dispose()

    run(scenario())


def test_in_memory_sqlite_is_one_line_and_one_database(tmp_path: Path) -> None:
    credits = CreditService("sqlite://")
    credits.add_credits("carol", 5)
    assert credits.get_user_credits_info("carol").available == 5
    assert CreditService("sqlite://").get_history  # another in-memory database, empty and ready

    async def scenario() -> int:
        memory = AsyncCreditService("sqlite://")
        await asyncio.gather(*[memory.add_credits(f"u{i}", 1) for i in range(20)])
        total = sum([(await memory.get_user_credits_info(f"u{i}")).total for i in range(20)])
        await memory.dispose()
        return total

    assert run(scenario()) == 20


def test_a_new_sqlite_file_gets_its_tables_unless_told_not_to(tmp_path: Path) -> None:
    made = tmp_path / "made.db"
    CreditService(f"sqlite:///{made}").add_credits("dave", 1)
    assert "accounts" in inspect_database(CreditService(f"sqlite:///{made}").engine).get_table_names()

    bare = tmp_path / "bare.db"
    untouched = CreditService(f"sqlite:///{bare}", create_tables=False)
    assert "accounts" not in inspect_database(untouched.engine).get_table_names()


def test_a_server_database_is_not_migrated_unless_asked(postgres_server_url: str) -> None:
    from sqlalchemy import create_engine, text

    name = f"cw_bare_{uuid.uuid4().hex[:8]}"
    admin = create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    try:
        url = postgres_server_url.rsplit("/", 1)[0] + f"/{name}"
        bare = CreditService(url)
        assert inspect_database(bare.engine).get_table_names() == []
        bare.engine.dispose()
        made = CreditService(url, create_tables=True)
        assert "accounts" in inspect_database(made.engine).get_table_names()
        made.engine.dispose()
    finally:
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def test_an_engine_of_ones_own_is_used_as_given(tmp_path: Path) -> None:
    from creditworker.storage.database import make_engine

    async def scenario() -> int:
        engine = make_engine(f"sqlite:///{tmp_path / 'own.db'}")
        bare = AsyncCreditService(engine)  # an engine object: its tables are its owner's business
        assert bare.engine is engine
        await bare.create_tables()
        await bare.add_credits("erin", 4)
        available = (await bare.get_user_credits_info("erin")).available
        await bare.dispose()
        return available

    assert run(scenario()) == 4
