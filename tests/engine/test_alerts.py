"""Balance alerts: credits.low, credits.depleted and credits.recovered, each once per
crossing, also when deducts race on one account (threads on PostgreSQL)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from creditworker import CreditService
from creditworker.contract.errors import InsufficientCredits
from creditworker.storage.tables import OutboxEvent

ALERTS = ("credits.low", "credits.depleted", "credits.recovered")


def alerts(engine: Engine) -> list[tuple[str, dict[str, Any]]]:
    with engine.connect() as connection:
        rows = connection.execute(select(OutboxEvent.routing_key, OutboxEvent.payload)
                                  .where(OutboxEvent.routing_key.in_(ALERTS)).order_by(OutboxEvent.id))
        return [(row.routing_key, row.payload) for row in rows]


def kinds(engine: Engine) -> list[str]:
    return [key for key, _payload in alerts(engine)]


def test_depleted_fires_when_available_reaches_zero_and_recovered_when_it_is_above_again(engine: Engine) -> None:
    credits = CreditService(engine)  # no low threshold
    credits.add_credits("ann", 20)  # a first grant recovers nothing
    assert kinds(engine) == []
    credits.deduct_credits("ann", 20)
    credits.add_credits("ann", 5)
    credits.deduct_credits("ann", 5)
    with pytest.raises(InsufficientCredits):
        credits.deduct_credits("ann", 1)  # refused: no second depletion, no event
    credits.add_credits("ann", 50)
    assert kinds(engine) == ["credits.depleted", "credits.recovered", "credits.depleted", "credits.recovered"]
    depleted = alerts(engine)[0][1]
    assert (depleted["user_id"], depleted["available"], depleted["credit_type"]) == ("ann", 0, "credits")
    assert alerts(engine)[-1][1]["available"] == 50


def test_with_a_threshold_low_then_depleted_then_recovered_only_back_at_the_threshold(engine: Engine) -> None:
    credits = CreditService(engine, low_credit_threshold=10)
    credits.add_credits("ann", 30)
    credits.deduct_credits("ann", 25)  # 5: low
    credits.deduct_credits("ann", 5)  # 0: depleted
    credits.add_credits("ann", 4)  # 4: still below 10, nothing
    credits.deduct_credits("ann", 4)  # 0 again: depleted again (it was above zero)
    credits.add_credits("ann", 20)  # 20: recovered
    credits.deduct_credits("ann", 12)  # 8: low again
    assert kinds(engine) == ["credits.low", "credits.depleted", "credits.depleted", "credits.recovered",
                             "credits.low"]
    recovered = next(payload for key, payload in alerts(engine) if key == "credits.recovered")
    assert (recovered["available"], recovered["threshold"]) == (20, 10)


def test_a_reservation_that_takes_everything_depletes_and_its_release_recovers(engine: Engine) -> None:
    credits = CreditService(engine)
    credits.add_credits("ann", 10)
    hold = credits.reserve_credits("ann", 10)
    credits.release_reservation(hold.id)
    assert kinds(engine) == ["credits.depleted", "credits.recovered"]


def test_each_alert_fires_once_per_crossing_under_concurrent_deducts(pg_engine: Engine) -> None:
    credits = CreditService(pg_engine, low_credit_threshold=30)
    credits.add_credits("ann", 100)
    start = threading.Barrier(20)
    refused: list[Exception] = []

    def spend() -> None:
        start.wait()
        try:
            credits.deduct_credits("ann", 5)
        except InsufficientCredits as exc:  # pragma: no cover - 20 x 5 is exactly the balance
            refused.append(exc)

    threads = [threading.Thread(target=spend) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert refused == []
    assert credits.get_user_credits_info("ann").available == 0
    assert kinds(pg_engine) == ["credits.low", "credits.depleted"]
    start = threading.Barrier(10)

    def top_up(n: int) -> None:
        start.wait()
        credits.add_credits("ann", 10, idempotency_key=f"top-up-{n}")

    threads = [threading.Thread(target=top_up, args=(n,)) for n in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert kinds(pg_engine) == ["credits.low", "credits.depleted", "credits.recovered"]


def test_a_threshold_as_a_percentage_of_the_last_grant_follows_each_grant(engine: Engine) -> None:
    from creditworker.engine.thresholds import set_low_threshold_percent

    credits = CreditService(engine)
    credits.add_credits("ann", 100)
    assert set_low_threshold_percent(credits, "ann", 20) == 20  # 20% of the newest grant
    credits.deduct_credits("ann", 81)  # 19 < 20: low
    credits.add_credits("ann", 1000)  # threshold 200; 1,019 available: recovered
    credits.deduct_credits("ann", 870)  # 149 < 200: low again
    assert kinds(engine) == ["credits.low", "credits.recovered", "credits.low"]
    low = [payload for key, payload in alerts(engine) if key == "credits.low"]
    assert [(event["available"], event["threshold"]) for event in low] == [(19, 20), (149, 200)]
    credits.set_low_credit_threshold("ann", 10)  # absolute again: the rule is gone
    credits.add_credits("ann", 5000)
    credits.deduct_credits("ann", 5145)  # 4 < 10
    assert [payload["threshold"] for key, payload in alerts(engine) if key == "credits.low"][-1] == 10


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_percentage_outside_1_to_100_is_refused_and_changes_nothing(engine: Engine) -> None:
    from creditworker.contract.errors import ValidationFailed
    from creditworker.engine.thresholds import set_low_threshold_percent

    credits = CreditService(engine)
    credits.add_credits("ann", 100)
    for percent in (0, 101, -5, True):
        with pytest.raises(ValidationFailed):
            set_low_threshold_percent(credits, "ann", percent)  # type: ignore[arg-type]
    credits.deduct_credits("ann", 99)
    assert kinds(engine) == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_percentage_replaces_the_service_default_and_follows_the_next_grant(engine: Engine) -> None:
    from creditworker.engine.thresholds import set_low_threshold_percent

    credits = CreditService(engine, low_credit_threshold=1000)  # the default no longer applies
    credits.add_credits("ann", 1)
    credits.deduct_credits("ann", 1)
    assert set_low_threshold_percent(credits, "ann", 50) == 1  # 50% of the newest lot (1), rounded up
    credits.add_credits("ann", 40)  # threshold 20
    credits.deduct_credits("ann", 21)  # 19 < 20: low
    assert [payload["threshold"] for key, payload in alerts(engine) if key == "credits.low"][-1] == 20
