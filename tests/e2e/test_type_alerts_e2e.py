"""Per-type low thresholds set through the producer, a real worker, RabbitMQ and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from creditworker.contract.errors import IdempotencyConflict, UnknownUser, ValidationFailed
from creditworker.storage.tables import OutboxEvent
from tests.e2e.conftest import RunningWorker

pytestmark = pytest.mark.e2e


def test_a_types_threshold_set_by_a_producer_fires_that_types_low_alert(rabbitmq_worker: RunningWorker) -> None:
    client = rabbitmq_worker.client
    client.add_credits("ann", 100).get()
    client.add_credits("ann", 5000, credit_type="tokens").get()
    set_to = client.set_low_credit_threshold("ann", percent=20, credit_type="tokens", idempotency_key="th-1").get()
    assert (set_to.credit_type, set_to.threshold, set_to.percent) == ("tokens", 1000, 20)
    assert client.set_low_credit_threshold("ann", percent=20, credit_type="tokens",
                                           idempotency_key="th-1").get() == set_to
    with pytest.raises(IdempotencyConflict):
        client.set_low_credit_threshold("ann", percent=30, credit_type="tokens", idempotency_key="th-1").get()
    with pytest.raises(UnknownUser):
        client.set_low_credit_threshold("nobody", 5).get()
    with pytest.raises(ValidationFailed):
        client.set_low_credit_threshold("ann", 5, percent=5)  # refused before it is sent
    client.deduct_credits("ann", 4200, credit_type="tokens").get()  # 800 <= 1000: low, of tokens
    client.deduct_credits("ann", 90).get()  # the default type has no threshold: nothing
    with rabbitmq_worker.engine.connect() as connection:
        lows = connection.scalars(select(OutboxEvent.payload).where(OutboxEvent.routing_key == "credits.low")).all()
    assert [(low["credit_type"], low["available"], low["threshold"]) for low in lows] == [("tokens", 800, 1000)]
    assert lows[0]["account"] == {"balance": 800, "reserved": 0, "available": 800, "credit_type": "tokens"}
