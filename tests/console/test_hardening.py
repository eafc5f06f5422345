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


# ---------------------------------------------------------------- hostile parameters


@pytest.mark.parametrize("path", [
    "/console/?q=%00", "/console/?q=al%00ice", "/console/?q=%C2%85",
    "/console/account?user_id=alice&until=9999-12-31",
    "/console/account/ledger.csv?user_id=alice&until=9999-12-31",
    "/console/account?user_id=alice&since=10000-01-01",
    "/console/account/ledger.csv?user_id=al%00ice",
    "/console/account?user_id=admin%E2%80%AEgnp.exe",
])
def test_a_parameter_the_console_cannot_use_is_a_clear_4xx(embedded: TestClient, path: str) -> None:
    response = embedded.get(path)
    assert response.status_code == 422, (response.status_code, response.text[:300])
    assert "text/html" in response.headers["content-type"]


def test_the_last_day_the_ledger_can_be_filtered_to_still_works(embedded: TestClient) -> None:
    assert embedded.get("/console/account?user_id=alice&until=9999-12-30").status_code == 200
    export = embedded.get("/console/account/ledger.csv?user_id=alice&until=9999-12-30")
    assert export.status_code == 200 and "hardening-alice" in export.text


# ---------------------------------------------------------------- login and logout


def browser(embedded: TestClient, address: str = "203.0.113.7") -> TestClient:
    """A client without the bearer key, from `address`, holding the login page's CSRF cookie."""
    fresh = TestClient(embedded.app, client=(address, 50000), follow_redirects=False)
    assert fresh.get("/console/login").status_code == 200
    return fresh


def log_in(client: TestClient, key: str) -> int:
    form = {"api_key": key, "next": "/", "csrf_token": client.cookies["cw_console_csrf"]}
    return client.post("/console/login", data=form).status_code


def test_failed_logins_are_slowed_then_refused_for_that_address_only(embedded: TestClient) -> None:
    attacker = browser(embedded)
    started = time.monotonic()
    assert [log_in(attacker, f"guess-{n}") for n in range(5)] == [401] * 5
    assert time.monotonic() - started >= 2.5  # each failure answered half a second late
    # Now every attempt from that address waits, the right key included, and says so.
    form = {"api_key": KEY, "csrf_token": attacker.cookies["cw_console_csrf"]}
    refused = attacker.post("/console/login", data=form)
    assert refused.status_code == 429
    assert "Too many failed logins from your address: try again in" in refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    # Another operator is not locked out by it.
    assert log_in(browser(embedded, "198.51.100.20"), KEY) == 303
    # Once the wait is over, the right key works from there too.
    time.sleep(int(refused.headers["Retry-After"]))
    assert log_in(attacker, KEY) == 303


def test_logout_ends_the_session_on_the_server(embedded: TestClient) -> None:
    operator = browser(embedded)
    assert log_in(operator, KEY) == 303
    session = operator.cookies["cw_console_session"]
    assert operator.get("/console/").status_code == 200
    kept = TestClient(embedded.app, client=("203.0.113.8", 50000), follow_redirects=False)
    kept.cookies.set("cw_console_session", session, path="/console")
    assert kept.get("/console/").status_code == 200  # a copy of the cookie works, until...
    csrf = operator.cookies["cw_console_csrf"]
    assert operator.post("/console/logout", data={"csrf_token": csrf}).status_code == 303
    answer = kept.get("/console/")
    assert answer.status_code == 303 and "/console/login" in answer.headers["location"]
