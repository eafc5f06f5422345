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
    credits = CreditService(engine)
    credits.add_credits("ann", 100)
    assert credits.set_low_credit_threshold("ann", percent=20).threshold == 20  # 20% of the newest grant
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
    credits = CreditService(engine)
    credits.add_credits("ann", 100)
    for percent in (0, 101, -5, True):
        with pytest.raises(ValidationFailed):
            credits.set_low_credit_threshold("ann", percent=percent)
    credits.deduct_credits("ann", 99)
    assert kinds(engine) == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_percentage_replaces_the_service_default_and_follows_the_next_grant(engine: Engine) -> None:
    credits = CreditService(engine, low_credit_threshold=1000)  # the default no longer applies
    credits.add_credits("ann", 1)
    credits.deduct_credits("ann", 1)
    assert credits.set_low_credit_threshold("ann", percent=50).threshold == 1  # 50% of the newest lot (1), rounded up
    credits.add_credits("ann", 40)  # threshold 20
    credits.deduct_credits("ann", 21)  # 19 < 20: low
    assert [payload["threshold"] for key, payload in alerts(engine) if key == "credits.low"][-1] == 20


# ---------------------------------------------------------------- per credit type


def typed(engine: Engine) -> list[tuple[str, str, int, int | None]]:
    """(event, credit type, available, threshold) of each alert, in order."""
    return [(key, payload["credit_type"], payload["available"], payload.get("threshold"))
            for key, payload in alerts(engine)]


def test_each_credit_type_has_its_own_threshold_and_fires_its_own_alerts(engine: Engine) -> None:
    credits = CreditService(engine)
    credits.add_credits("ann", 50)
    credits.add_credits("ann", 1000, credit_type="tokens")
    assert credits.set_low_credit_threshold("ann", 10).threshold == 10
    assert credits.set_low_credit_threshold("ann", 200, credit_type="tokens").threshold == 200
    credits.deduct_credits("ann", 850, credit_type="tokens")  # tokens 150 <= 200: low; credits untouched
    credits.deduct_credits("ann", 30)  # credits 20 > 10: nothing
    credits.deduct_credits("ann", 150, credit_type="tokens")  # tokens 0: depleted
    credits.deduct_credits("ann", 15)  # credits 5: low (the tokens' flag is not the credits')
    credits.add_credits("ann", 500, credit_type="tokens")  # tokens 500 > 200: recovered
    assert typed(engine) == [
        ("credits.low", "tokens", 150, 200),
        ("credits.depleted", "tokens", 0, None),
        ("credits.low", "credits", 5, 10),
        ("credits.recovered", "tokens", 500, 200),
    ]


def test_each_typed_alert_carries_that_types_snapshot(engine: Engine) -> None:
    credits = CreditService(engine)
    credits.add_credits("ann", 40)
    credits.add_credits("ann", 100, credit_type="tokens")
    credits.set_low_credit_threshold("ann", 30, credit_type="tokens")
    credits.reserve_credits("ann", 75, credit_type="tokens")  # tokens 25 available: low
    [(key, payload)] = alerts(engine)
    assert (key, payload["credit_type"]) == ("credits.low", "tokens")
    assert payload["account"] == {"balance": 100, "reserved": 75, "available": 25, "credit_type": "tokens"}


def test_the_service_default_threshold_is_the_default_types_only(engine: Engine) -> None:
    """Another type counts other units: without a threshold of its own it has no `credits.low`,
    but depleted and recovered, as the default type without a threshold has."""
    credits = CreditService(engine, low_credit_threshold=100)
    credits.add_credits("ann", 50, credit_type="tokens")  # a first grant: nothing
    credits.deduct_credits("ann", 50, credit_type="tokens")
    credits.add_credits("ann", 1, credit_type="tokens")
    assert typed(engine) == [("credits.depleted", "tokens", 0, None), ("credits.recovered", "tokens", 1, None)]


def test_a_percentage_threshold_follows_the_grants_of_its_own_type_only(engine: Engine) -> None:
    credits = CreditService(engine)
    credits.add_credits("ann", 1000, credit_type="tokens")
    credits.add_credits("ann", 10)  # newer, but of the default type
    assert credits.set_low_credit_threshold("ann", percent=10, credit_type="tokens").threshold == 100
    credits.add_credits("ann", 99999)  # moves nothing of the tokens' threshold
    credits.deduct_credits("ann", 900, credit_type="tokens")  # 100 <= 100: low
    credits.add_credits("ann", 3000, credit_type="tokens")  # threshold 300; 3,100 available: recovered
    credits.deduct_credits("ann", 2850, credit_type="tokens")  # 250 <= 300: low again
    assert typed(engine) == [("credits.low", "tokens", 100, 100), ("credits.recovered", "tokens", 3100, 300),
                             ("credits.low", "tokens", 250, 300)]
    assert credits.set_low_credit_threshold("ann", 0, credit_type="tokens").percent is None  # the rule is gone
    credits.add_credits("ann", 10, credit_type="tokens")
    assert kinds(engine)[-1] == "credits.low"  # nothing more: a threshold of 0 is off


def test_a_type_an_account_never_held_takes_a_threshold_before_its_first_grant(engine: Engine) -> None:
    credits = CreditService(engine)
    credits.add_credits("ann", 5)
    set_to = credits.set_low_credit_threshold("ann", percent=25, credit_type="gpu_seconds")
    assert (set_to.credit_type, set_to.threshold, set_to.percent) == ("gpu_seconds", 0, 25)  # off until a grant
    credits.add_credits("ann", 400, credit_type="gpu_seconds")  # threshold 100
    credits.deduct_credits("ann", 320, credit_type="gpu_seconds")  # 80: low
    assert typed(engine) == [("credits.low", "gpu_seconds", 80, 100)]
    assert credits.get_user_credits_info("ann", credit_type="gpu_seconds").available == 80


def test_setting_a_types_threshold_rearms_that_type_only(engine: Engine) -> None:
    credits = CreditService(engine)
    for credit_type in ("credits", "tokens"):
        credits.add_credits("ann", 100, credit_type=credit_type)
        credits.set_low_credit_threshold("ann", 50, credit_type=credit_type)
        credits.deduct_credits("ann", 60, credit_type=credit_type)  # 40: low
    credits.set_low_credit_threshold("ann", 45, credit_type="tokens")  # re-armed: 40 is a new crossing
    credits.deduct_credits("ann", 1, credit_type="tokens")
    credits.deduct_credits("ann", 1)  # the credits' flag still set: nothing
    assert typed(engine) == [("credits.low", "credits", 40, 50), ("credits.low", "tokens", 40, 50),
                             ("credits.low", "tokens", 39, 45)]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("arguments", [
    {"threshold": 5, "percent": 10},  # both
    {"threshold": -1},
    {"percent": 0},
    {"threshold": "5"},
    {"credit_type": ""},
    {"credit_type": "no spaces"},
    {"credit_type": 7},
])
def test_a_bad_threshold_is_refused_and_changes_nothing(engine: Engine, arguments: dict[str, Any]) -> None:
    from creditworker.contract.errors import ValidationFailed

    credits = CreditService(engine)
    credits.add_credits("ann", 100, credit_type="tokens")
    with pytest.raises(ValidationFailed):
        credits.set_low_credit_threshold("ann", **arguments)
    credits.deduct_credits("ann", 100, credit_type="tokens")
    assert typed(engine) == [("credits.depleted", "tokens", 0, None)]  # no low: no threshold was set


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_threshold_for_an_unknown_account_is_refused(engine: Engine) -> None:
    from creditworker.contract.errors import UnknownUser

    with pytest.raises(UnknownUser):
        CreditService(engine).set_low_credit_threshold("nobody", 5, credit_type="tokens")


def test_each_types_alerts_fire_once_under_concurrent_deducts_of_two_types(pg_engine: Engine) -> None:
    """Twenty threads spend two types of one account at once: each type crosses its own
    threshold and zero once, so each fires its low and its depleted exactly once."""
    credits = CreditService(pg_engine)
    credits.add_credits("ann", 100)
    credits.add_credits("ann", 1000, credit_type="tokens")
    credits.set_low_credit_threshold("ann", 30)
    credits.set_low_credit_threshold("ann", percent=50, credit_type="tokens")  # 500
    start = threading.Barrier(20)
    refused: list[Exception] = []

    def spend(n: int) -> None:
        start.wait()
        try:
            for _ in range(10):
                if n % 2:
                    credits.deduct_credits("ann", 10, credit_type="tokens")
                else:
                    credits.deduct_credits("ann", 1)
        except InsufficientCredits as exc:  # pragma: no cover - exactly each balance is spent
            refused.append(exc)

    threads = [threading.Thread(target=spend, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert refused == []
    assert credits.get_user_credits_info("ann").available == 0
    assert credits.get_user_credits_info("ann", credit_type="tokens").available == 0
    fired = sorted((key, credit_type) for key, credit_type, _available, _threshold in typed(pg_engine))
    assert fired == [("credits.depleted", "credits"), ("credits.depleted", "tokens"),
                     ("credits.low", "credits"), ("credits.low", "tokens")]
    lows = {credit_type: (available, threshold) for key, credit_type, available, threshold in typed(pg_engine)
            if key == "credits.low"}
    assert lows == {"credits": (30, 30), "tokens": (500, 500)}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_threshold_with_a_key_is_set_once_and_another_request_with_that_key_conflicts(engine: Engine) -> None:
    from creditworker.contract.errors import IdempotencyConflict

    credits = CreditService(engine)
    credits.add_credits("ann", 100, credit_type="tokens")
    first = credits.set_low_credit_threshold("ann", 40, credit_type="tokens", idempotency_key="t-1")
    credits.deduct_credits("ann", 70, credit_type="tokens")  # 30: low, the flag is set
    assert credits.set_low_credit_threshold("ann", 40, credit_type="tokens", idempotency_key="t-1") == first
    credits.deduct_credits("ann", 1, credit_type="tokens")  # the replay re-armed nothing: no second low
    with pytest.raises(IdempotencyConflict):
        credits.set_low_credit_threshold("ann", 50, credit_type="tokens", idempotency_key="t-1")
    assert typed(engine) == [("credits.low", "tokens", 30, 40)]
