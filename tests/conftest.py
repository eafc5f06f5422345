"""Fixtures shared by every test: real databases (one fresh database per run) and services."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from creditworker import CreditService
from creditworker.settings import get_settings
from creditworker.storage.database import make_engine
from creditworker.storage.migrate import upgrade
from creditworker.storage.tables import Base
from tests import harness, services

DIALECTS = ["sqlite", "postgres", "mysql"]

def _set_aside_callers_settings() -> dict[str, str]:
    """Take the caller's CREDITWORKER_* variables out of the environment for the run (all but
    the documented CREDITWORKER_TEST_*): every test builds its settings from what it chose,
    never from a developer's shell. At import, before any conftest below this one: the
    e2e conftest imports `creditworker.worker.app`, which reads the environment."""
    set_aside = {name: os.environ.pop(name) for name in list(os.environ)
                 if services.is_callers_setting(name)}
    get_settings.cache_clear()
    return set_aside


_callers_settings = _set_aside_callers_settings()


SHARED_RABBITMQ_FIXTURES = {"rabbitmq_url", "rabbitmq_worker", "rabbitmq_worker_process"}
"""Fixtures that reach the one shared RabbitMQ vhost, whose queues a test purges."""

WHOLE_MODULE_DIRECTORIES = {"e2e", "faults", "reliability", "console", "http"}
"""Test folders whose modules share module-scoped processes (workers, servers, browsers)."""


def _uses_shared_rabbitmq(item: pytest.Item) -> bool:
    """Through a fixture, or a parameter "rabbitmq" that a fixture turns into a worker on it."""
    names = set(getattr(item, "fixturenames", ()))
    callspec = getattr(item, "callspec", None)
    picked = list(callspec.params.values()) if callspec is not None else []
    return bool(names & SHARED_RABBITMQ_FIXTURES) or any(value == "rabbitmq" for value in picked)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`--dist loadgroup`, the default addopts), keep together what must
    not run on several processes at once: every module that reaches the shared RabbitMQ vhost runs
    on one process (the tests purge its queues), and a module that starts module-scoped
    processes runs whole on one process (started once, not once per process). The rest is
    spread test by test. Without xdist the marks change nothing."""
    rabbit_modules = {item.module.__name__ for item in items
                      if isinstance(item, pytest.Function) and _uses_shared_rabbitmq(item)}
    for item in items:
        if not isinstance(item, pytest.Function):
            continue
        module = item.module.__name__
        if module in rabbit_modules:
            item.add_marker(pytest.mark.xdist_group("rabbitmq"))
        elif module.split(".")[1] in WHOLE_MODULE_DIRECTORIES or module == "tests.test_readme":
            item.add_marker(pytest.mark.xdist_group(module))


def pytest_unconfigure(config: pytest.Config) -> None:
    os.environ.update(_callers_settings)
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def embedded() -> Iterator[services.EmbeddedServers]:
    servers = services.EmbeddedServers()
    yield servers
    servers.stop()


@pytest.fixture(scope="session")
def postgres_server_url(embedded: services.EmbeddedServers) -> str:
    """A PostgreSQL server URL: the configured one, or an embedded one outside CI."""
    if services.port_answers(services.POSTGRES_URL, 5432):
        return services.POSTGRES_URL
    if services.IN_CI:
        services.missing("PostgreSQL", services.POSTGRES_URL)
    return embedded.postgres_url()


@pytest.fixture(scope="session")
def redis_url(embedded: services.EmbeddedServers) -> str:
    """This run's own Redis, or the shared one CREDITWORKER_TEST_REDIS_URL names."""
    if services.SHARED_REDIS_URL is None:
        return embedded.redis_url()
    if not services.port_answers(services.SHARED_REDIS_URL, 6379):
        services.missing("Redis", services.SHARED_REDIS_URL)
    return services.SHARED_REDIS_URL


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    if not services.port_answers(services.RABBITMQ_URL, 5672):
        services.missing("RabbitMQ", services.RABBITMQ_URL)
    return services.RABBITMQ_URL


def _fresh_database(server_url: str, isolation: str) -> Iterator[str]:
    """Create a database of its own for this run on `server_url`; drop it afterwards."""
    with harness.fresh_database(server_url, "cw_test", isolation) as url:
        yield url


@pytest.fixture(scope="session")
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    yield from _fresh_database(postgres_server_url, "AUTOCOMMIT")


@pytest.fixture(scope="session")
def mysql_url() -> Iterator[str]:
    if not services.port_answers(services.MYSQL_URL, 3306):
        services.missing("MariaDB/MySQL", services.MYSQL_URL)
    yield from _fresh_database(services.MYSQL_URL, "AUTOCOMMIT")


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'creditworker.db'}"


@pytest.fixture(scope="session")
def migrated_engines() -> Iterator[dict[str, Engine]]:
    """One engine per database URL for the whole run, migrated to the newest schema once."""
    engines: dict[str, Engine] = {}
    yield engines
    for engine in engines.values():
        engine.dispose()


def engine_for(url: str, engines: dict[str, Engine]) -> Engine:
    if url not in engines:
        engine = make_engine(url)
        upgrade(engine)
        engines[url] = engine
    return engines[url]


def wipe(engine: Engine) -> None:
    """Empty every table (children first), keeping the schema and its Alembic revision."""
    with engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(table.delete())


@pytest.fixture(params=DIALECTS)
def database_url(request: pytest.FixtureRequest) -> str:
    """The URL of an empty, migrated database; each test runs once per dialect."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
def engine(database_url: str, migrated_engines: dict[str, Engine]) -> Engine:
    migrated = engine_for(database_url, migrated_engines)
    wipe(migrated)
    return migrated


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.jsonl"


@pytest.fixture
def service(engine: Engine, ledger_path: Path) -> CreditService:
    return CreditService(engine, ledger_path=str(ledger_path))


@pytest.fixture
def pg_engine(postgres_url: str, migrated_engines: dict[str, Engine]) -> Engine:
    """PostgreSQL only, for tests about row locks and concurrency."""
    migrated = engine_for(postgres_url, migrated_engines)
    wipe(migrated)
    return migrated
