"""The one retry policy (creditworker/worker/delivery.py): what goes back to the broker, when."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from creditworker.contract.errors import InsufficientCredits
from creditworker.worker import delivery


def _connection_refused() -> DBAPIError:
    engine = create_engine("postgresql+psycopg2://postgres@127.0.0.1:1/none", pool_pre_ping=False)
    try:
        with engine.connect() as connection:
            connection.execute(text("select 1"))
    except DBAPIError as exc:
        return exc
    raise AssertionError("port 1 answered")


def test_the_countdown_doubles_from_half_a_second_up_to_a_minute() -> None:
    for retries in range(12):
        low, high = (min(60.0, 0.5 * 2**retries) * factor for factor in (0.5, 1.5))
        assert all(low <= delivery.backoff(retries) <= high for _ in range(20))
    assert max(delivery.backoff(30) for _ in range(50)) <= 90


def test_a_lost_database_goes_back_to_the_broker_until_the_retries_are_spent() -> None:
    refused = _connection_refused()
    assert isinstance(delivery.decide(refused, 0, 3), delivery.RetryLater)
    assert isinstance(delivery.decide(refused, 2, 3), delivery.RetryLater)
    assert delivery.decide(refused, 3, 3) is None


@pytest.mark.parametrize("error", [InsufficientCredits("no"), ValueError("a bug"), KeyError("x")])
def test_refusals_and_bugs_are_never_retried(error: Exception) -> None:
    assert delivery.decide(error, 0, 8) is None


def test_a_gathered_batch_whose_database_is_gone_goes_back_to_the_broker_at_once(redis_url: str) -> None:
    """The pool process does not sleep holding the batch (it once slept up to 8 backoffs):
    each message is re-published at once, same id, retries + 1, with a countdown."""
    import json
    import time

    import redis
    from celery.exceptions import Retry

    from creditworker.engine import CreditService
    from creditworker.settings import Settings
    from creditworker.worker import tasks
    from creditworker.worker.app import make_celery
    from tests.e2e.conftest import redis_db

    broker = redis_db(redis_url, 13)
    queue = redis.Redis.from_url(broker)
    queue.flushdb()
    app = make_celery(Settings(broker_url=broker))
    entries = [{"id": f"gone-{i}", "task": "creditworker.credits.deduct", "args": [],
                "kwargs": {"user_id": "ann", "amount": 1}, "retries": 0, "delivery_info": {}} for i in range(3)]
    previous = tasks._service
    tasks._service = CreditService("postgresql+psycopg2://postgres@127.0.0.1:1/none")
    try:
        began = time.monotonic()
        outcomes = tasks.apply_gathered(entries, lambda name: app.tasks[name])
        took = time.monotonic() - began
    finally:
        tasks._service = previous
    assert all(isinstance(outcome, Retry) for outcome in outcomes), outcomes
    assert took < 5
    published = [json.loads(raw) for raw in queue.lrange("celery", 0, -1)]
    assert sorted(message["headers"]["id"] for message in published) == ["gone-0", "gone-1", "gone-2"]
    assert {message["headers"]["retries"] for message in published} == {1}
    assert all(message["headers"]["eta"] for message in published)
    queue.flushdb()
