"""Several processes on one account, and fuzzed task payloads against a real database."""

from __future__ import annotations

import multiprocessing
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine

from creditworker import CreditService
from creditworker.contract.errors import ERRORS_BY_CODE, InsufficientCredits
from creditworker.contract.operations import OPERATIONS
from creditworker.engine import SubscriptionService
from creditworker.records.audit import audit
from creditworker.worker import tasks
from tests.engine.test_credits import snapshot


def hammer(url: str, seed: int, rounds: int) -> int:
    """Deduct and reserve-then-commit on one hot account; returns what was charged."""
    service = CreditService(url)
    rng = random.Random(seed)
    charged = 0
    for _ in range(rounds):
        try:
            if rng.random() < 0.5:
                amount = rng.randint(1, 9)
                service.deduct_credits("hot", amount)
                charged += amount
            else:
                hold = service.reserve_credits("hot", rng.randint(1, 9))
                actual = rng.randint(0, hold.amount)
                service.commit_reservation(hold.id, actual)
                charged += actual
        except InsufficientCredits:
            pass
    service.engine.dispose()
    return charged


def test_processes_hammering_one_account_never_overdraw_it(pg_engine: Engine) -> None:
    service = CreditService(pg_engine)
    service.add_credits("hot", 2000)
    url = pg_engine.url.render_as_string(hide_password=False)
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        charged = pool.starmap(hammer, [(url, seed, 150) for seed in range(4)])
    info = service.get_user_credits_info("hot")
    assert info.total == 2000 - sum(charged) >= 0
    assert info.reserved == 0
    assert audit(pg_engine).passed


FIELDS = ["user_id", "amount", "description", "metadata", "idempotency_key", "expires_at",
          "priority", "source", "ttl_seconds", "reservation_id", "limit", "before", "kinds",
          "within_days", "name", "credit_limit", "price", "currency", "billing_period",
          "validity_days", "active", "plan", "start_at", "at_period_end", "include_inactive",
          "operations", "subscription_ids", "threshold", "percent", "credit_type", "junk"]
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=300),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.sampled_from(["ann", "2031-01-01T00:00:00Z", "bonus", "not-a-date", "\ud800", " ann",
                     "monthly", "EUR", "9.99", "basic"]),
    st.lists(st.fixed_dictionaries({"op": st.sampled_from(["add", "deduct", "nope"]),
                                    "user_id": st.just("ann"), "amount": st.integers(-5, 50)}), max_size=3),
)
TASKS = [tasks.TASKS[operation.task] for operation in OPERATIONS
         if operation.periodic is None]  # beat's sweeps touch every account, not the payload


@pytest.fixture
def task_engine(engine: Engine) -> Any:
    previous = tasks._service, tasks._subscriptions
    tasks._service = CreditService(engine)
    tasks._subscriptions = SubscriptionService(tasks._service)
    tasks._service.add_credits("ann", 10)
    yield engine
    tasks._service, tasks._subscriptions = previous


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(task=st.sampled_from(TASKS), payload=st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=6))
def test_fuzzed_payloads_get_an_envelope_and_refusals_change_nothing(
    task_engine: Engine, task: Any, payload: dict[str, Any]
) -> None:
    """Eager mode here: the point is the validation path with a real database behind it."""
    before = snapshot(task_engine)
    envelope = task.apply(kwargs=payload).get()
    assert isinstance(envelope, dict) and isinstance(envelope["ok"], bool)
    if not envelope["ok"]:
        assert envelope["error"]["code"] in ERRORS_BY_CODE
        if envelope["error"]["code"] != "plan_in_use":  # the one refusal that reports a change
            assert snapshot(task_engine) == before


GATHERED_TASKS = sorted(operation.task for operation in OPERATIONS if operation.gathered)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(
    st.tuples(st.sampled_from(GATHERED_TASKS), st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=6),
              st.lists(st.integers(), max_size=1)),
    min_size=1, max_size=5,
))
def test_fuzzed_gathered_messages_each_get_their_own_envelope(
    task_engine: Engine, messages: list[tuple[str, dict[str, Any], list[int]]]
) -> None:
    """What the worker's pool process does with a gathered list: one envelope per message,
    never an exception for bad input, and a list that is all refusals changes nothing."""
    before = snapshot(task_engine)
    entries = [{"id": f"fuzz-{i}", "task": name, "args": args, "kwargs": kwargs}
               for i, (name, kwargs, args) in enumerate(messages)]
    outcomes = tasks.apply_gathered(entries)
    assert len(outcomes) == len(entries)
    for outcome in outcomes:
        assert isinstance(outcome, dict) and isinstance(outcome["ok"], bool), outcome
        if not outcome["ok"]:
            assert outcome["error"]["code"] in ERRORS_BY_CODE
    if not any(outcome["ok"] for outcome in outcomes):  # type: ignore[index]
        assert snapshot(task_engine) == before


def test_gathered_messages_answer_as_their_tasks_answer_alone(engine: Engine) -> None:
    """The same messages, gathered into one list or run one by one as tasks, on two fresh
    accounts: the same envelopes (but for ids and times) and the same balances."""
    def run(gathered: bool, user: str) -> tuple[list[Any], Any]:
        tasks._service = CreditService(engine)
        tasks._service.add_credits(user, 10)
        messages = [
            ("creditworker.credits.deduct", {"user_id": user, "amount": 4}),
            ("creditworker.credits.deduct", {"user_id": user, "amount": 40}),
            ("creditworker.credits.reserve", {"user_id": user, "amount": 3, "idempotency_key": f"{user}-r"}),
            ("creditworker.credits.add", {"user_id": user, "amount": 5, "source": "bonus"}),
            ("creditworker.credits.deduct", {"user_id": user, "amount": -1}),
            ("creditworker.credits.deduct", {"user_id": f"{user}-nobody", "amount": 1}),
            ("creditworker.credits.reserve", {"user_id": user, "amount": 3, "idempotency_key": f"{user}-r"}),
            ("creditworker.credits.deduct", {"user_id": user, "amount": 8}),
        ]
        if gathered:
            outcomes = tasks.apply_gathered([
                {"id": f"{user}-{i}", "task": name, "args": [], "kwargs": kwargs}
                for i, (name, kwargs) in enumerate(messages)
            ])
        else:
            by_name = {task.name: task for task in TASKS}
            outcomes = [by_name[name].apply(kwargs=kwargs, task_id=f"{user}-{i}").get()
                        for i, (name, kwargs) in enumerate(messages)]
        return outcomes, tasks._service.get_user_credits_info(user)

    previous = tasks._service
    try:
        gathered, gathered_info = run(True, "gat")
        alone, alone_info = run(False, "one")
    finally:
        tasks._service = previous

    def comparable(outcome: Any) -> Any:
        return [outcome["ok"], (outcome.get("error") or {}).get("code"),
                {k: v for k, v in (outcome.get("result") or {}).items()
                 if k in ("kind", "amount", "held", "balance_after", "reserved_after", "status")}]

    assert [comparable(o) for o in gathered] == [comparable(o) for o in alone]
    assert [o["ok"] for o in gathered] == [True, False, True, True, False, False, True, True]
    assert (gathered_info.total, gathered_info.reserved) == (alone_info.total, alone_info.reserved) == (3, 3)
