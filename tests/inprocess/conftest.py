"""Engines in this process: sync and async, on SQLite and PostgreSQL, each on empty tables."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from creditworker import CreditService
from creditworker.engine.async_service import AsyncCreditService
from tests.conftest import engine_for, wipe

KINDS = ["sync-sqlite", "sync-postgres", "sync-psycopg3", "async-sqlite", "async-postgres"]
"""`sync-postgres` runs psycopg2, `sync-psycopg3` psycopg 3; the async engine on PostgreSQL
runs psycopg 3 in asyncio mode."""


@pytest.fixture(params=KINDS)
def engine_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def credit_service(
    engine_kind: str, request: pytest.FixtureRequest, tmp_path: Path,
    migrated_engines: dict[str, Engine],
) -> Iterator[Any]:
    """A `CreditService` or `AsyncCreditService`; SQLite ones make their own tables."""
    mode, backend = engine_kind.split("-")
    if backend in ("postgres", "psycopg3"):
        url: str = request.getfixturevalue("postgres_url")
        wipe(engine_for(url, migrated_engines))
        if backend == "psycopg3":
            url = url.replace("+psycopg2", "+psycopg")
    else:
        url = f"sqlite:///{tmp_path / 'credits.db'}"
    if mode == "sync":
        service = CreditService(url, ledger_path=str(tmp_path / "ledger.jsonl"))
        yield service
        if backend == "sqlite":
            service.engine.dispose()
        return
    async_service = AsyncCreditService(url, ledger_path=str(tmp_path / "ledger.jsonl"))
    yield async_service
    asyncio.run(async_service.dispose())


def sync_face(service: Any) -> CreditService:
    """The sync engine over the same database, for checks in a test's own thread."""
    return service if isinstance(service, CreditService) else service.sync
