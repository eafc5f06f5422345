"""Pooled connections are pinged only when they sat idle: a dead one is replaced before use."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import NullPool

from creditworker import CreditService
from creditworker.storage import database
from creditworker.storage.database import make_engine


def test_a_connection_killed_while_idle_is_replaced_without_an_error(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database, "PING_AFTER_IDLE_SECONDS", 0.2)
    engine = make_engine(postgres_url)
    try:
        with engine.connect() as connection:
            pid = connection.scalar(text("SELECT pg_backend_pid()"))
        with make_engine(postgres_url).connect() as admin:
            admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            admin.commit()
        time.sleep(0.3)
        with engine.connect() as connection:
            assert connection.scalar(text("SELECT pg_backend_pid()")) != pid
    finally:
        engine.dispose()


def test_only_a_connection_that_sat_idle_is_pinged(pg_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(database, "PING_AFTER_IDLE_SECONDS", 0.2)
    engine = make_engine(pg_engine.url.render_as_string(hide_password=False))
    pings: list[object] = []
    ping = engine.dialect.do_ping
    monkeypatch.setattr(engine.dialect, "do_ping", lambda connection: pings.append(connection) or ping(connection))
    try:
        service = CreditService(engine)
        service.add_credits("pinged", 10)
        service.deduct_credits("pinged", 1)
        assert pings == []
        time.sleep(0.3)
        service.deduct_credits("pinged", 1)
        assert len(pings) == 1
    finally:
        engine.dispose()


def test_a_burst_keeps_its_connections_for_the_next_one(postgres_url: str) -> None:
    """Twelve at once, twice: the second burst finds the first's twelve connections in the
    pool (SQLAlchemy's default kept five and closed seven, which the next burst opened again,
    each a new server process with cold caches)."""
    engine = make_engine(postgres_url)
    backends: list[set[int]] = []
    try:
        for _burst in range(2):
            connections = [engine.connect() for _ in range(12)]
            backends.append({connection.scalar(text("SELECT pg_backend_pid()")) for connection in connections})
            for connection in connections:
                connection.close()
        assert len(backends[0]) == 12
        assert backends[1] == backends[0]
    finally:
        engine.dispose()


def test_the_pool_opens_at_most_its_size_and_then_waits(postgres_url: str) -> None:
    engine = make_engine(postgres_url, pool_timeout=0.2)
    connections = [engine.connect() for _ in range(database.POOL_CONNECTIONS)]
    try:
        with pytest.raises(PoolTimeout):
            engine.connect()
    finally:
        for connection in connections:
            connection.close()
        engine.dispose()


def test_an_engine_without_a_pool_takes_no_pool_sizes(postgres_url: str) -> None:
    """The worker's dead-letter store and metrics endpoint connect per use (`NullPool`)."""
    engine = make_engine(postgres_url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            assert connection.scalar(text("SELECT 1")) == 1
    finally:
        engine.dispose()
