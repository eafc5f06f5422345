"""One real worker per HTTP test module, on the Redis database its `REDIS_DB` names."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.engine import Engine

from tests.e2e.conftest import RunningWorker, running_on_redis


@pytest.fixture(scope="module")
def worker(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    postgres_url: str,
    redis_url: str,
    migrated_engines: dict[str, Engine],
) -> Iterator[RunningWorker]:
    yield from running_on_redis(
        tmp_path_factory, postgres_url, redis_url, request.module.REDIS_DB, migrated_engines
    )
