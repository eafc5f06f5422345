"""Pooled connections are pinged only when they sat idle: a dead one is replaced before use."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

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
