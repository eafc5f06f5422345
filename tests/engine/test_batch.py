"""Batches: many operations in one transaction, each with its own key and outcome."""

from __future__ import annotations

import json
import random
import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from creditworker import CreditService
from creditworker.contract.errors import CreditError
from creditworker.records.audit import audit
from creditworker.storage.tables import Account, Entry, Lot
from tests.conftest import wipe
from tests.engine.test_credits import NOW, snapshot


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
    from creditworker.contract.credits import SubmitBatch, parse
    from creditworker.contract.errors import ValidationFailed

    with pytest.raises(ValidationFailed):
        parse(SubmitBatch, {"operations": []})
    with pytest.raises(ValidationFailed):
        parse(SubmitBatch, {"operations": [{"op": "add"}] * 1001})


def _random_operations(seed: int, count: int) -> list[dict[str, object]]:
    rng = random.Random(seed)
    users = ["p", "q", "r"]
    items: list[dict[str, object]] = []
    for n in range(count):
        user = rng.choice(users)
        roll = rng.random()
        if roll < 0.25:
            item: dict[str, object] = {"op": "add", "user_id": user, "amount": rng.randint(1, 40),
                                       "priority": rng.choice([None, 0, 1, -1])}
            if rng.random() < 0.5:
                item["expires_at"] = (NOW + timedelta(days=rng.randint(1, 30))).isoformat()
        elif roll < 0.85:
            item = {"op": "deduct", "user_id": user, "amount": rng.randint(1, 30)}
        else:
            item = {"op": "reserve", "user_id": user, "amount": rng.randint(1, 10)}
        item["idempotency_key"] = f"eq-{seed}-{n % (count - 3)}"  # a few keys repeat
        items.append(item)
    return items


def _state(service: CreditService, engine: Engine) -> tuple[object, ...]:
    with Session(engine) as session:
        lots = sorted((lot.user_id, lot.amount, lot.remaining, lot.priority) for lot in session.scalars(select(Lot)))
        first_lot = min(session.scalars(select(Lot.id)), default=0)  # ids go on after a wipe
        entries = sorted(
            (e.idempotency_key, e.kind, e.amount, e.balance_after, e.reserved_after,
             json.dumps([(d["lot_id"] - first_lot, d["amount"]) for d in e.draws or []]))
            for e in session.scalars(select(Entry))
        )
    balances = [service.get_user_credits_info(u, now=NOW) for u in ("p", "q", "r") if _has_account(engine, u)]
    return lots, entries, [(b.total, b.reserved) for b in balances]


def _has_account(engine: Engine, user: str) -> bool:
    with Session(engine) as session:
        return session.get(Account, user) is not None


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_batch_has_the_same_effect_as_its_items_one_by_one(service: CreditService, engine: Engine, seed: int) -> None:
    items = _random_operations(seed, 60)
    singles: list[tuple[bool, object]] = []
    methods = {"add": service.add_credits, "deduct": service.deduct_credits, "reserve": service.reserve_credits}
    for item in items:
        fields = {k: v for k, v in item.items() if k != "op"}
        if "expires_at" in fields:
            fields["expires_at"] = datetime.fromisoformat(str(fields["expires_at"]))
        try:
            result = methods[str(item["op"])](now=NOW, **fields)  # type: ignore[operator]
            singles.append((True, result.model_dump(mode="json")["amount"]))
        except CreditError as exc:
            singles.append((False, exc.code))
    one_by_one = _state(service, engine)
    assert audit(engine).passed
    wipe(engine)

    outcomes = service.apply_batch(items, now=NOW)
    assert [(o.ok, o.result["amount"] if o.ok and o.result else (o.error or {}).get("code")) for o in outcomes] == singles
    assert _state(service, engine) == one_by_one
    assert audit(engine).passed


def test_a_key_taken_from_an_earlier_result_replays_it(service: CreditService) -> None:
    """Requests without a key get a fresh `auto:` key that is never looked up; the same key
    given back explicitly is looked up like any other."""
    entry = service.add_credits("ann", 20)
    assert entry.idempotency_key.startswith("auto:")
    assert service.add_credits("ann", 20, idempotency_key=entry.idempotency_key) == entry
    (outcome,) = service.apply_batch([{"op": "add", "user_id": "ann", "amount": 20,
                                       "idempotency_key": entry.idempotency_key}])
    assert outcome.result == entry.model_dump(mode="json")
    assert service.get_user_credits_info("ann").total == 20


def test_draws_reach_past_many_lots_and_the_lots_granted_in_the_same_batch(service: CreditService) -> None:
    """PostgreSQL loads only the lots a batch's draws can reach (the prefix of the draw-down
    order covering its deducts and commits); the draws must be those of all the lots."""
    later = NOW + timedelta(days=30)
    lots = [service.add_credits("ann", 10, priority=p, expires_at=later if p else None, now=NOW).lot_id
            for p in (3, 0, 2, 1, 0)]
    hold = service.reserve_credits("ann", 12, now=NOW)
    outcomes = service.apply_batch([
        {"op": "deduct", "user_id": "ann", "amount": 15},
        {"op": "add", "user_id": "ann", "amount": 4, "priority": -1},
        {"op": "deduct", "user_id": "ann", "amount": 6},
        {"op": "commit", "reservation_id": hold.id},
    ], now=NOW)
    assert all(outcome.ok for outcome in outcomes)
    draws = [[(d["lot_id"], d["amount"]) for d in o.result["draws"]] for o in outcomes if o.result and o.result["kind"] != "add"]
    new_lot = outcomes[1].result["lot_id"]
    assert draws == [
        [(lots[1], 10), (lots[4], 5)],
        [(new_lot, 4), (lots[4], 2)],
        [(lots[4], 3), (lots[3], 9)],
    ]
    assert service.get_user_credits_info("ann", now=NOW).total == 50 + 4 - 15 - 6 - 12
    assert audit(service.engine).passed
