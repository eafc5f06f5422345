"""Prometheus metrics scraped by a real HTTP client from a real worker (prefork pool of two)
and from the gateway, while the producer drives operations through the broker."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine

from creditworker.contract.errors import InsufficientCredits
from tests.e2e.conftest import RunningWorker, running_on_redis
from tests.services import free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def metered_worker(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, redis_url: str,
    migrated_engines: dict[str, Engine],
) -> Iterator[tuple[RunningWorker, int]]:
    port = free_port()
    for worker in running_on_redis(tmp_path_factory, postgres_url, redis_url, 13, migrated_engines,
                                   CREDITWORKER_METRICS_PORT=str(port)):
        yield worker, port


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page, by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    return samples(answer.text)


def operations(scraped: dict[tuple[str, tuple[tuple[str, str], ...]], float], operation: str, outcome: str) -> float:
    return scraped.get(("creditworker_operations_total", (("operation", operation), ("outcome", outcome))), 0.0)


def test_the_workers_endpoint_counts_what_the_pool_did(metered_worker: tuple[RunningWorker, int]) -> None:
    worker, port = metered_worker
    before = scrape(port)
    client = worker.client
    client.add_credits("metrics-ann", 100).get()
    for _ in range(5):
        client.deduct_credits("metrics-ann", 10).get()
    with pytest.raises(InsufficientCredits):
        client.deduct_credits("metrics-ann", 1_000).get()
    hold = client.reserve_credits("metrics-ann", 5, ttl_seconds=60)
    client.commit_reservation(hold.id, 3).get()
    assert client.app.send_task("creditworker.credits.expire", kwargs={}).get(timeout=30)["ok"]  # a beat sweep
    assert worker.service.get_user_credits_info("metrics-ann").total == 47

    after = scrape(port)
    assert operations(after, "credits.add", "applied") - operations(before, "credits.add", "applied") == 1
    assert operations(after, "credits.deduct", "applied") - operations(before, "credits.deduct", "applied") == 5
    assert (operations(after, "credits.deduct", "insufficient_credits")
            - operations(before, "credits.deduct", "insufficient_credits")) == 1
    assert operations(after, "credits.commit", "applied") - operations(before, "credits.commit", "applied") == 1
    # every batch was timed, and the beat sweep run by hand recorded its success just now
    assert after[("creditworker_batch_size_count", ())] > before.get(("creditworker_batch_size_count", ()), 0)
    assert after[("creditworker_engine_seconds_count", (("scope", "batch"),))] > 0
    swept = after[("creditworker_sweep_last_success_timestamp_seconds", (("sweep", "expire-credits"),))]
    assert time.time() - 120 < swept <= time.time()
    # the state read at scrape time
    assert after[("creditworker_state_up", (("source", "database"),))] == 1
    assert after[("creditworker_state_up", (("source", "broker"),))] == 1
    assert after[("creditworker_queue_messages", (("queue", "celery"),))] == 0
    assert ("creditworker_outbox_lag_seconds", ()) in after
    assert ("creditworker_dead_letters", ()) in after
    assert not any("metrics-ann" in value for name, labels in after for _, value in labels)


def test_the_gateway_serves_the_state_with_its_api_key(
    metered_worker: tuple[RunningWorker, int], tmp_path: Path,
) -> None:
    from fastapi.testclient import TestClient

    from creditworker.http.api.app import create_app
    from creditworker.settings import Settings

    worker, _port = metered_worker
    from datetime import UTC, datetime, timedelta

    expires = datetime.now(UTC) + timedelta(days=3)
    worker.client.add_credits("metrics-bob", 40, expires_at=expires).get()
    settings = Settings(database_url=str(worker.engine.url.render_as_string(hide_password=False)),
                        broker_url=worker.broker_url, api_keys="scrape-key", expiring_soon_days=7)
    with TestClient(create_app(settings)) as http:
        assert http.get("/metrics").status_code == 401
        answer = http.get("/metrics", headers={"Authorization": "Bearer scrape-key"})
    assert answer.status_code == 200
    scraped = samples(answer.text)
    assert scraped[("creditworker_credits_expiring", ())] >= 40
    assert scraped[("creditworker_state_up", (("source", "database"),))] == 1
    assert scraped[("creditworker_state_up", (("source", "broker"),))] == 1


def test_a_database_that_is_down_is_a_zero_not_a_failed_scrape(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from creditworker.http.api.app import create_app
    from creditworker.settings import Settings

    settings = Settings(database_url="postgresql+psycopg2://postgres@127.0.0.1:1/nowhere",
                        broker_url="filesystem://", data_dir=str(tmp_path / ".creditworker"))
    with TestClient(create_app(settings)) as http:
        answer = http.get("/metrics")
    assert answer.status_code == 200
    scraped = samples(answer.text)
    assert scraped[("creditworker_state_up", (("source", "database"),))] == 0
    assert ("creditworker_outbox_lag_seconds", ()) not in scraped
