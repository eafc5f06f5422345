"""The console under a down database or broker, and under hostile parameters (issue 30).

In process, over the gateway's real app (TestClient), with a real SQLite file or a database
and broker on closed ports: a page answers a clear 4xx or 503, never a bare 500."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from creditworker import CreditService
from creditworker.http.api.app import create_app
from creditworker.settings import Settings
from creditworker.storage.database import make_engine
from creditworker.storage.migrate import upgrade
from tests import services

KEY = "hardening-key-0123456789"


def console_client(settings: Settings) -> TestClient:
    app = create_app(settings.model_copy(update={"api_keys": KEY}))
    return TestClient(app, headers={"Authorization": f"Bearer {KEY}"}, raise_server_exceptions=False)


@pytest.fixture
def down(tmp_path: Path) -> TestClient:
    """Database and broker on ports nobody listens on."""
    return console_client(Settings(
        database_url=f"postgresql+psycopg2://postgres:s3cret@127.0.0.1:{services.free_port()}/x",
        broker_url=f"redis://127.0.0.1:{services.free_port()}/0", data_dir=str(tmp_path)))


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[TestClient]:
    """A migrated SQLite file with one account, and a broker on a closed port."""
    url = f"sqlite:///{tmp_path / 'console.db'}"
    engine = make_engine(url)
    upgrade(engine)
    CreditService(engine).add_credits("alice", 100, idempotency_key="hardening-alice")
    engine.dispose()
    yield console_client(Settings(database_url=url, data_dir=str(tmp_path),
                                  broker_url=f"redis://127.0.0.1:{services.free_port()}/0"))


@pytest.mark.parametrize("path", ["/console/", "/console/?q=al", "/console/account?user_id=alice",
                                  "/console/account/ledger.csv?user_id=alice", "/console/plans",
                                  "/console/system"])
def test_a_database_that_is_down_is_a_503_page_saying_so(down: TestClient, path: str) -> None:
    response = down.get(path)
    assert response.status_code == 503, response.text[:500]
    assert "database" in response.text and "does not answer" in response.text
    assert "s3cret" not in response.text


def test_with_only_the_broker_down_the_system_page_answers_within_its_probe_time(
    embedded: TestClient,
) -> None:
    started = time.monotonic()
    response = embedded.get("/console/system")
    took = time.monotonic() - started
    assert response.status_code == 200
    assert took < 3.5, took
