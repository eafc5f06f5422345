"""A real `creditworker serve` and a real headless Chromium for the console's tests.

The browser is Debian's Chromium (`apt-get install chromium`), driven by Playwright with
`executable_path`, so no browser is downloaded. Each server backend is a module-scoped
fixture: the embedded defaults (SQLite file, `filesystem://` broker), and PostgreSQL with
Redis and a real worker (so the system page has a worker to ping).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import sync_playwright
from sqlalchemy.engine import Engine

from creditworker import CreditService
from creditworker.storage.database import make_engine
from creditworker.storage.migrate import upgrade
from tests import services
from tests.conftest import wipe
from tests.e2e.conftest import RunningWorker, running_on_redis, serving, worker_env

API_KEY = "console-test-key-0123456789"
OTHER_KEY = "second-key-abcdefghij"
REDIS_DB = 12
CHROMIUM = os.environ.get("CREDITWORKER_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@dataclass
class ConsoleServer:
    """A running `creditworker serve`, and an engine on its database."""

    name: str
    base_url: str
    engine: Engine
    workdir: Path
    has_worker: bool

    @property
    def console(self) -> str:
        return f"{self.base_url}/console"

    @property
    def credits(self) -> CreditService:
        return CreditService(self.engine)


def _serve(env: dict[str, str], workdir: Path) -> Iterator[str]:
    yield from serving(env, workdir, services.free_port(), "/console/login")


@pytest.fixture(scope="module", params=["embedded", "postgres_redis"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
    migrated_engines: dict[str, Engine],
) -> Iterator[ConsoleServer]:
    keys = {"CREDITWORKER_API_KEYS": f"{API_KEY},{OTHER_KEY}"}
    if request.param == "embedded":
        workdir = tmp_path_factory.mktemp("console-embedded")
        database_url = f"sqlite:///{workdir / 'creditworker.db'}"
        engine = make_engine(database_url)
        upgrade(engine)
        env = worker_env(workdir, database_url, "filesystem://", **keys)
        try:
            for base_url in _serve(env, workdir):
                yield ConsoleServer("embedded", base_url, engine, workdir, has_worker=False)
        finally:
            engine.dispose()
        return
    postgres_url: str = request.getfixturevalue("postgres_url")
    redis_url: str = request.getfixturevalue("redis_url")
    for worker in running_on_redis(
        tmp_path_factory, postgres_url, redis_url, REDIS_DB, migrated_engines
    ):
        yield from _with_worker(worker, keys)


def _with_worker(worker: RunningWorker, keys: dict[str, str]) -> Iterator[ConsoleServer]:
    wipe(worker.engine)  # the run's shared database: other modules' rows would fail the audit
    env = {**worker.env, "CREDITWORKER_RESULT_BACKEND": worker.result_backend, **keys}
    for base_url in _serve(env, worker.workdir):
        yield ConsoleServer("postgres_redis", base_url, worker.engine, worker.workdir,
                            has_worker=True)


@pytest.fixture(scope="module")  # not the session: its event loop would stay running for later asyncio.run()
def browser_context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium for the module, with a fresh profile folder."""
    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists():
        services.missing("Chromium", CHROMIUM)
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True,
            viewport={"width": 1100, "height": 900},
        )
        context.set_default_timeout(10_000)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser_context: Any) -> Iterator[Any]:
    """A fresh tab with no cookies: every test logs in (or not) for itself."""
    browser_context.clear_cookies()
    tab = browser_context.new_page()
    try:
        yield tab
    finally:
        tab.close()
