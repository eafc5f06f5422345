"""The engine's transactions: on PostgreSQL BEGIN rides on the first statement and the engine
commits itself; a failure at any point leaves nothing behind, and the pooled connection
goes back as psycopg2 expects it (not in autocommit mode, its isolation level restored)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from creditworker import CreditService
from creditworker.engine.unit_of_work import UnitOfWork
from creditworker.records.audit import audit
from creditworker.storage.transaction import BEGIN, COMMIT
from tests.conftest import engine_for, wipe
from tests.engine.test_writer import counted_statements

NEW_ACCOUNT = ("INSERT INTO accounts (user_id, balance, reserved, low_credit_alerted, overdraft_limit, created_at,"
               " updated_at) VALUES ('{user}', 0, 0, false, 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)")


def accounts_named(engine: Engine, user: str) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(text("SELECT count(*) FROM accounts WHERE user_id = :u"), {"u": user}))


def assert_pool_connection_is_plain(engine: Engine) -> None:
    """The next user of the pool gets a connection in the driver's own transactions."""
    with engine.connect() as connection:
        dbapi: Any = connection.connection.dbapi_connection
        assert dbapi.autocommit is False
        assert dbapi.info.transaction_status == 0
        connection.exec_driver_sql(NEW_ACCOUNT.format(user="not-committed"))
        connection.rollback()
    assert accounts_named(engine, "not-committed") == 0


@pytest.fixture(params=["psycopg2", "psycopg"])
def pg_engine_of_each_driver(request: pytest.FixtureRequest, postgres_url: str,
                             migrated_engines: dict[str, Engine]) -> Engine:
    """PostgreSQL through psycopg2, then through psycopg 3 (whose own cursor binds on the
    server and takes one command: the engine's scripts use its client-side cursor)."""
    migrated = engine_for(postgres_url.replace("+psycopg2", f"+{request.param}"), migrated_engines)
    wipe(migrated)
    return migrated


def test_a_batch_of_deducts_is_two_statements_begin_and_commit_included(pg_engine_of_each_driver: Engine) -> None:
    pg_engine = pg_engine_of_each_driver
    service = CreditService(pg_engine)
    service.apply_batch([{"op": "add", "user_id": f"t{n}", "amount": 100} for n in range(5)])
    with counted_statements(pg_engine) as statements:
        outcomes = service.apply_batch([
            {"op": "deduct", "user_id": f"t{n % 5}", "amount": 1, "idempotency_key": f"four-{n}"} for n in range(50)
        ])
    assert all(outcome.ok for outcome in outcomes)
    # BEGIN, the lock, then the lots, the keys' operation rows and the entries' ids; the writer and COMMIT
    assert len(statements) == 2
    assert statements[0].startswith(BEGIN) and statements[-1].endswith(COMMIT)
    assert_pool_connection_is_plain(pg_engine)
    repeated = service.apply_batch([
        {"op": "deduct", "user_id": f"t{n % 5}", "amount": 1, "idempotency_key": f"four-{n}"} for n in range(50)
    ])
    assert repeated == outcomes
    conflict = service.apply_batch([{"op": "deduct", "user_id": "t0", "amount": 2, "idempotency_key": "four-0"}])
    assert conflict[0].error is not None and conflict[0].error["code"] == "idempotency_conflict"
    assert service.get_user_credits_info("t0").total == 90
    assert audit(pg_engine).passed


def test_begin_goes_out_with_the_first_statement(pg_engine: Engine) -> None:
    """Statements SQLAlchemy runs (an ORM query, `exec_driver_sql`) get BEGIN folded in when
    they are sent, after the cursor listeners saw them: PostgreSQL itself says it. A
    transaction begun by a message of its own would start before the first statement's
    message (`now()` before `statement_timestamp()`); begun in the same message, at it."""
    service = CreditService(pg_engine)
    seen: list[Any] = []

    def decide(uow: UnitOfWork) -> None:
        seen.append(tuple(uow.connection.exec_driver_sql(
            "SELECT now() = statement_timestamp(), current_setting('transaction_isolation')").one()))
        seen.append(uow.connection.exec_driver_sql("SELECT now() = statement_timestamp()").scalar_one())

    service.run(decide)
    assert seen == [(True, "read committed"), False]  # the second statement ran in the first one's transaction
    assert_pool_connection_is_plain(pg_engine)


@pytest.mark.parametrize("where", ["in its first statement", "after it wrote", "in an after-commit hook's unit"])
def test_a_failure_leaves_nothing_and_a_clean_connection(pg_engine: Engine, where: str) -> None:
    service = CreditService(pg_engine)
    committed: list[int] = []

    def decide(uow: UnitOfWork) -> None:
        uow.on_commit(lambda: committed.append(1))
        if where != "in its first statement":
            uow.connection.exec_driver_sql(NEW_ACCOUNT.format(user="failed"))
        uow.connection.exec_driver_sql("SELECT 1 / 0")

    with pytest.raises(DBAPIError):
        service.run(decide)
    assert committed == []
    assert accounts_named(pg_engine, "failed") == 0
    assert_pool_connection_is_plain(pg_engine)


def test_an_exception_in_python_after_begin_rolls_back(pg_engine: Engine) -> None:
    service = CreditService(pg_engine)

    def decide(uow: UnitOfWork) -> None:
        uow.connection.exec_driver_sql(NEW_ACCOUNT.format(user="python-failed"))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        service.run(decide)
    assert accounts_named(pg_engine, "python-failed") == 0
    assert_pool_connection_is_plain(pg_engine)


def test_a_serialization_failure_reruns_the_whole_transaction(pg_engine: Engine) -> None:
    service = CreditService(pg_engine)
    attempts: list[int] = []

    def decide(uow: UnitOfWork) -> int:
        attempts.append(1)
        uow.connection.exec_driver_sql(NEW_ACCOUNT.format(user=f"attempt-{len(attempts)}"))
        if len(attempts) == 1:
            uow.connection.exec_driver_sql(
                "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$")
        return len(attempts)

    assert service.run(decide) == 2
    assert (accounts_named(pg_engine, "attempt-1"), accounts_named(pg_engine, "attempt-2")) == (0, 1)
    assert_pool_connection_is_plain(pg_engine)


def test_a_failed_commit_is_an_error_and_leaves_nothing(pg_engine: Engine) -> None:
    """A deferred constraint fails at COMMIT, the engine's own statement."""
    service = CreditService(pg_engine)
    with pg_engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE IF EXISTS deferred_check")
        connection.exec_driver_sql("CREATE TABLE deferred_check (id int, parent int REFERENCES deferred_check"
                                   " (id) DEFERRABLE INITIALLY DEFERRED, UNIQUE (id))")

    def decide(uow: UnitOfWork) -> None:
        uow.connection.exec_driver_sql(NEW_ACCOUNT.format(user="commit-failed"))
        uow.connection.exec_driver_sql("INSERT INTO deferred_check VALUES (1, 2)")

    try:
        with pytest.raises(DBAPIError):
            service.run(decide)
        assert accounts_named(pg_engine, "commit-failed") == 0
        assert_pool_connection_is_plain(pg_engine)
    finally:
        with pg_engine.begin() as connection:
            connection.exec_driver_sql("DROP TABLE deferred_check")


def test_orm_work_in_a_unit_is_flushed_before_the_commit(engine: Engine) -> None:
    """Plans and subscriptions use the unit's ORM session; it rides on the same transaction."""
    from creditworker.storage.tables import Account

    service = CreditService(engine)

    def decide(uow: UnitOfWork) -> None:
        uow.session.add(Account(user_id="orm-made", balance=0, reserved=0, low_credit_alerted=False,
                                overdraft_limit=0, created_at=uow.at, updated_at=uow.at))

    service.run(decide)
    assert accounts_named(engine, "orm-made") == 1


def test_a_writer_statement_that_fails_with_its_commit_rolls_back_and_reruns(
    pg_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another transaction stores one of the batch's keys after the batch read them: the
    writer's statement (COMMIT riding on it) fails on the key; nothing of the first attempt
    stays, and the rerun sees the other row."""
    from creditworker.engine import service as service_module

    service = CreditService(pg_engine)
    service.add_credits("racer", 100)
    write = service_module.write
    calls: list[int] = []

    def racing_write(uow: UnitOfWork) -> None:
        calls.append(1)
        if len(calls) == 1:
            with pg_engine.begin() as other:
                other.exec_driver_sql(
                    "INSERT INTO operations (idempotency_key, kind, fingerprint, user_id, result, created_at)"
                    " VALUES ('race-1', 'DeductCredits', 'another request', 'racer', '{}', CURRENT_TIMESTAMP)")
        write(uow)

    monkeypatch.setattr(service_module, "write", racing_write)
    with counted_statements(pg_engine) as statements:
        outcomes = service.apply_batch([
            {"op": "deduct", "user_id": "racer", "amount": 1, "idempotency_key": "race-0"},
            {"op": "deduct", "user_id": "racer", "amount": 1, "idempotency_key": "race-1"},
        ])
    assert len(calls) == 2
    assert any(statement.endswith(COMMIT) for statement in statements)
    assert [outcome.ok for outcome in outcomes] == [True, False]
    assert outcomes[1].error is not None and outcomes[1].error["code"] == "idempotency_conflict"
    assert service.get_user_credits_info("racer").total == 99
    assert_pool_connection_is_plain(pg_engine)
    with pg_engine.begin() as connection:
        connection.exec_driver_sql("DELETE FROM operations WHERE idempotency_key = 'race-1'")
    assert audit(pg_engine).passed


def test_nothing_runs_after_the_commit_that_rode_on_a_statement(pg_engine: Engine) -> None:
    from creditworker.storage.transaction import commit_with_next_statement

    service = CreditService(pg_engine)

    def decide(uow: UnitOfWork) -> None:
        assert commit_with_next_statement(uow.connection)
        uow.connection.exec_driver_sql(NEW_ACCOUNT.format(user="committed-early"))
        uow.connection.exec_driver_sql(NEW_ACCOUNT.format(user="after-commit"))

    with pytest.raises(RuntimeError, match="after the engine's transaction committed"):
        service.run(decide)
    assert (accounts_named(pg_engine, "committed-early"), accounts_named(pg_engine, "after-commit")) == (1, 0)
    assert_pool_connection_is_plain(pg_engine)
    with pg_engine.begin() as connection:
        connection.exec_driver_sql("DELETE FROM accounts WHERE user_id = 'committed-early'")


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_a_new_engines_first_connection_learns_the_server_inside_a_folded_transaction(
    pg_engine: Engine, postgres_url: str, driver: str
) -> None:
    """The first connection of an engine is the one SQLAlchemy asks the server's version on,
    through the dialect's statement hooks: a worker's first task opens it in a folded
    transaction (this once failed every task of a fresh worker)."""
    CreditService(pg_engine).add_credits("first-connect", 5)
    fresh = CreditService(postgres_url.replace("+psycopg2", f"+{driver}"))
    try:
        assert fresh.deduct_credits("first-connect", 2).balance_after == 3
        assert fresh.engine.dialect.server_version_info is not None
    finally:
        fresh.engine.dispose()
