"""Batches: many operations in one transaction, each with its own key and outcome."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from creditworker import CreditService
from creditworker.audit import audit
from tests.engine.test_credits import snapshot


def test_a_mixed_batch_reports_each_outcome_and_commits_the_rest(service: CreditService) -> None:
    service.add_credits("ann", 20)
    outcomes = service.apply_batch([
        {"op": "deduct", "user_id": "ann", "amount": 5, "idempotency_key": "b-1"},
        {"op": "deduct", "user_id": "ann", "amount": 500, "idempotency_key": "b-2"},
        {"op": "add", "user_id": "bob", "amount": 7, "idempotency_key": "b-3"},
        {"op": "reserve", "user_id": "ann", "amount": 10, "idempotency_key": "b-4"},
        {"op": "deduct", "user_id": "ann", "amount": 6, "idempotency_key": "b-5"},  # 5 available
        {"op": "deduct", "user_id": "nobody", "amount": 1},
        {"op": "deduct", "user_id": "ann", "amount": -1},
        {"op": "teleport", "user_id": "ann"},
        "not an object",
    ])
    assert [o.ok for o in outcomes] == [True, False, True, True, False, False, False, False, False]
    assert [o.error["code"] for o in outcomes if o.error] == [
        "insufficient_credits", "insufficient_credits", "unknown_user", "invalid_input", "invalid_input",
        "invalid_input",
    ]
    assert outcomes[0].result is not None and outcomes[0].result["balance_after"] == 15
    ann = service.get_user_credits_info("ann")
    assert (ann.total, ann.reserved, ann.available) == (15, 10, 5)
    assert service.get_user_credits_info("bob").total == 7
    assert audit(service.engine).passed


def test_a_repeated_batch_returns_the_first_outcomes_and_changes_nothing(
    service: CreditService, engine: Engine
) -> None:
    service.add_credits("ann", 20)
    batch = [
        {"op": "deduct", "user_id": "ann", "amount": 3, "idempotency_key": "r-1"},
        {"op": "deduct", "user_id": "ann", "amount": 99, "idempotency_key": "r-2"},
    ]
    first = service.apply_batch(batch)
    before = snapshot(engine)
    assert service.apply_batch(batch) == first
    assert snapshot(engine) == before
    conflict = service.apply_batch([{"op": "deduct", "user_id": "ann", "amount": 4, "idempotency_key": "r-1"}])
    assert conflict[0].error is not None and conflict[0].error["code"] == "idempotency_conflict"
    assert snapshot(engine) == before


def test_the_same_key_twice_in_one_batch_applies_once(service: CreditService) -> None:
    service.add_credits("ann", 20)
    item = {"op": "deduct", "user_id": "ann", "amount": 3, "idempotency_key": "twice"}
    outcomes = service.apply_batch([item, item])
    assert outcomes[0] == outcomes[1] and outcomes[0].ok
    assert service.get_user_credits_info("ann").total == 17


def test_operations_on_one_account_apply_in_order_including_commit_and_release(service: CreditService) -> None:
    outcomes = service.apply_batch([
        {"op": "add", "user_id": "cat", "amount": 10},
        {"op": "deduct", "user_id": "cat", "amount": 10},  # needs the add before it
        {"op": "add", "user_id": "cat", "amount": 8},
        {"op": "reserve", "user_id": "cat", "amount": 6, "idempotency_key": "hold-1"},
    ], default_keys=["k0", "k1", "k2", "k3"])
    assert all(o.ok for o in outcomes)
    hold = outcomes[3].result
    assert hold is not None
    second = service.apply_batch([
        {"op": "commit", "reservation_id": hold["id"], "amount": 4},
        {"op": "release", "reservation_id": hold["id"]},  # already committed
    ])
    assert second[0].ok and second[1].error is not None
    assert second[1].error["code"] == "reservation_not_active"
    assert service.get_user_credits_info("cat").total == 4
    keys = [e.idempotency_key for e in service.get_history("cat")]
    assert {"k0", "k1", "k2", "hold-1"} <= set(keys)


def test_batches_locking_accounts_in_opposite_orders_never_deadlock(pg_engine: Engine, tmp_path: Path) -> None:
    service = CreditService(pg_engine, ledger_path=str(tmp_path / "ledger.jsonl"))
    users = [f"u{n}" for n in range(8)]
    for user in users:
        service.add_credits(user, 1000)
    errors: list[BaseException] = []

    def run(order: list[str], offset: int) -> None:
        try:
            for round_ in range(15):
                service.apply_batch([
                    {"op": "deduct", "user_id": user, "amount": 1, "idempotency_key": f"d-{offset}-{round_}-{user}"}
                    for user in order
                ])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(users if n % 2 == 0 else users[::-1], n)) for n in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert {service.get_user_credits_info(u).total for u in users} == {1000 - 4 * 15}
    assert audit(pg_engine).passed


def test_an_empty_or_oversized_batch_is_refused() -> None:
    from creditworker.contract import SubmitBatch, parse
    from creditworker.errors import ValidationFailed

    with pytest.raises(ValidationFailed):
        parse(SubmitBatch, {"operations": []})
    with pytest.raises(ValidationFailed):
        parse(SubmitBatch, {"operations": [{"op": "add"}] * 1001})
