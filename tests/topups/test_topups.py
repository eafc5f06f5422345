"""Auto top-ups in the engine (issue 29): the rule, the trigger, the charge, its failures.

Real databases (every dialect unless the test is about row locks) and the scripted payment
provider, which keeps its charges in a folder as a remote provider keeps them.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from creditworker import CreditService
from creditworker.contract.errors import (
    PaymentProviderError,
    TopupNotPending,
    UnknownTopup,
    UnknownUser,
    ValidationFailed,
)
from creditworker.engine.payments import ScriptedProvider, load_provider
from creditworker.records.audit import audit
from creditworker.storage.tables import Lot, OutboxEvent


@pytest.fixture
def provider(tmp_path: Path) -> ScriptedProvider:
    return ScriptedProvider(tmp_path / "payments")


@pytest.fixture
def topping(engine: Engine, provider: ScriptedProvider) -> CreditService:
    """A service whose top-ups are charged by the scripted provider."""
    return CreditService(engine, payment_provider=provider)


def events(engine: Engine, routing_key: str) -> list[dict]:
    with engine.connect() as connection:
        return [row.payload for row in connection.execute(
            select(OutboxEvent.payload).where(OutboxEvent.routing_key == routing_key).order_by(OutboxEvent.id))]


def available(service: CreditService, user: str = "alice", credit_type: str = "credits") -> int:
    return service.get_user_credits_info(user, credit_type=credit_type).available


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(("fields", "problem"), [
    ({"threshold": 100}, "exactly one of amount"),
    ({"threshold": 100, "amount": 50, "target": 500}, "exactly one of amount"),
    ({"threshold": -1, "amount": 50}, "threshold"),
    ({"threshold": 10**13, "amount": 50}, "threshold"),
    ({"threshold": 100, "amount": 0}, "amount"),
    ({"threshold": 100, "amount": 10**13}, "amount"),
    ({"threshold": 100, "target": 100}, "target must be above threshold"),
    ({"threshold": 100, "amount": 50, "max_per_month": 10}, "give unit_price"),
    ({"threshold": 100, "amount": 50, "unit_price": "-1"}, "unit_price"),
    ({"threshold": "100", "amount": 50}, "threshold"),
    ({"threshold": 100, "amount": 50, "expires_after_days": 0}, "expires_after_days"),
    ({"threshold": 100, "amount": 50, "currency": "usd"}, "currency"),
    ({"threshold": 100, "amount": 10**9, "unit_price": 1000}, "maximum charge"),
    ({"threshold": 100, "target": 10**11, "unit_price": 10}, "maximum charge"),
])
def test_a_bad_rule_is_refused_and_stores_nothing(service: CreditService, fields: dict, problem: str) -> None:
    service.add_credits("alice", 500)
    with pytest.raises(ValidationFailed, match=problem):
        service.set_auto_topup("alice", **fields)
    assert service.get_auto_topup("alice") is None


def test_a_rule_for_an_unknown_account_is_refused(service: CreditService) -> None:
    with pytest.raises(UnknownUser):
        service.set_auto_topup("nobody", threshold=10, amount=100)
    assert service.get_auto_topup("nobody") is None


def test_set_get_replace_and_remove_a_rule(service: CreditService) -> None:
    service.add_credits("alice", 500)
    rule = service.set_auto_topup("alice", threshold=100, amount=300, unit_price="0.02", max_per_month=50)
    assert (rule.threshold, rule.amount, rule.target, rule.enabled) == (100, 300, None, True)
    assert rule.unit_price == Decimal("0.02") and rule.max_per_month == Decimal(50)
    replaced = service.set_auto_topup("alice", threshold=50, target=1000)
    assert replaced.id == rule.id and (replaced.threshold, replaced.amount, replaced.target) == (50, None, 1000)
    assert service.get_auto_topup("alice") == replaced
    assert service.remove_auto_topup("alice")["removed"] is True
    assert service.get_auto_topup("alice") is None
    assert service.remove_auto_topup("alice")["removed"] is False


# ---------------------------------------------------------------- the trigger


def test_the_deduct_that_crosses_asks_for_one_top_up_in_its_own_transaction(topping: CreditService,
                                                                            engine: Engine) -> None:
    topping.add_credits("alice", 500)
    topping.set_auto_topup("alice", threshold=100, amount=1000)
    topping.deduct_credits("alice", 300)
    assert topping.list_topups(user_id="alice") == []  # still at 200
    topping.deduct_credits("alice", 150)
    topping.deduct_credits("alice", 20)  # still below: the first is in flight
    (topup,) = topping.list_topups(user_id="alice")
    assert (topup.state, topup.credits, topup.idempotency_key) == ("requested", 1000, f"topup:alice:{topup.rule_id}:1")
    (requested,) = events(engine, "credits.topup_requested")
    assert requested["topup_id"] == topup.id and requested["credits"] == 1000
    assert available(topping) == 30  # nothing granted before the charge


def test_a_reserve_below_the_threshold_asks_for_a_top_up_and_a_grant_does_not(topping: CreditService) -> None:
    topping.add_credits("alice", 50)
    topping.set_auto_topup("alice", threshold=10, amount=100)
    topping.add_credits("alice", 5)
    assert topping.list_topups() == []
    topping.reserve_credits("alice", 50)
    assert [topup.state for topup in topping.list_topups()] == ["requested"]


def test_setting_a_rule_below_the_threshold_asks_at_once(topping: CreditService) -> None:
    topping.add_credits("alice", 50)
    topping.set_auto_topup("alice", threshold=100, target=500)
    (topup,) = topping.list_topups()
    assert topup.credits == 450


def test_other_credit_types_have_rules_of_their_own(topping: CreditService) -> None:
    topping.add_credits("alice", 500)
    topping.add_credits("alice", 50, credit_type="images")
    topping.set_auto_topup("alice", threshold=20, amount=40, credit_type="images")
    topping.deduct_credits("alice", 490)  # the default type has no rule
    assert topping.list_topups() == []
    topping.deduct_credits("alice", 40, credit_type="images")
    (topup,) = topping.list_topups()
    topping.charge_topup(topup.id)
    assert available(topping, credit_type="images") == 50
    assert available(topping) == 10


# ---------------------------------------------------------------- the charge


def test_a_successful_charge_grants_once_with_its_reference_and_cost_basis(topping: CreditService, engine: Engine,
                                                                           provider: ScriptedProvider) -> None:
    topping.add_credits("alice", 500)
    topping.set_auto_topup("alice", threshold=100, target=1000, unit_price="0.01", expires_after_days=30)
    topping.deduct_credits("alice", 450)
    (topup,) = topping.list_topups()
    assert topup.credits == 950 and topup.cost == Decimal("9.5")
    done = topping.charge_topup(topup.id)
    assert done.state == "succeeded" and done.provider_reference == f"scripted:{topup.idempotency_key}"
    assert topping.charge_topup(topup.id) == done  # a redelivered task: nothing more
    assert available(topping) == 1000
    assert [charge["idempotency_key"] for charge in provider.charges()] == [topup.idempotency_key]
    with engine.connect() as connection:
        lot = connection.execute(select(Lot).where(Lot.id == done.lot_id)).one()
    assert (lot.source, lot.amount, lot.cost_basis_amount, lot.cost_basis_currency) == (
        "top_up", 950, Decimal("0.01"), "USD")
    assert lot.expires_at is not None
    (succeeded,) = events(engine, "credits.topup_succeeded")
    assert succeeded["lot_id"] == done.lot_id and succeeded["account"]["available"] == 1000
    assert audit(engine).passed


def test_a_charge_run_again_after_a_crash_mid_charge_charges_once(topping: CreditService,
                                                                  provider: ScriptedProvider) -> None:
    """A worker that died after the provider took the money: the top-up is left `charging`;
    the next run sends the same key, the provider answers its first answer, one grant."""
    topping.add_credits("alice", 50)
    topping.set_auto_topup("alice", threshold=100, amount=200)
    (topup,) = topping.list_topups()
    provider.charge(account="alice", credits=200, amount=None, currency="USD", idempotency_key=topup.idempotency_key)
    from creditworker.engine import topups as engine_topups

    topping.run(lambda uow: engine_topups._update(uow, topup.id, state="charging", attempts=1))
    assert topping.charge_topup(topup.id).state == "succeeded"
    assert len(provider.charges()) == 1
    assert available(topping) == 250


def test_the_provider_failing_then_succeeding(topping: CreditService, engine: Engine,
                                              provider: ScriptedProvider) -> None:
    provider.script("failed", "succeeded")
    topping.add_credits("alice", 500)
    topping.set_auto_topup("alice", threshold=100, amount=300)
    topping.deduct_credits("alice", 450)
    (first,) = topping.list_topups()
    failed = topping.charge_topup(first.id)
    assert (failed.state, failed.error, failed.lot_id) == ("failed", "card declined", None)
    assert available(topping) == 50
    assert topping.get_auto_topup("alice").consecutive_failures == 1
    assert events(engine, "credits.topup_failed")[0]["consecutive_failures"] == 1
    topping.deduct_credits("alice", 1)  # the next write below asks again, with a new key
    second = topping.list_topups()[0]
    assert second.idempotency_key.endswith(":2")
    assert topping.charge_topup(second.id).state == "succeeded"
    assert available(topping) == 349
    assert topping.get_auto_topup("alice").consecutive_failures == 0


def test_three_failures_in_a_row_disable_the_rule(topping: CreditService, engine: Engine,
                                                  provider: ScriptedProvider) -> None:
    provider.script("failed", "failed", "failed")
    topping.add_credits("alice", 500)
    topping.set_auto_topup("alice", threshold=100, amount=300)
    for _ in range(3):
        topping.deduct_credits("alice", 10 if topping.list_topups() else 450)
        topping.charge_topup(topping.list_topups()[0].id)
    rule = topping.get_auto_topup("alice")
    assert (rule.enabled, rule.consecutive_failures) == (False, 3)
    (disabled,) = events(engine, "credits.topup_disabled")
    assert disabled["consecutive_failures"] == 3
    topping.deduct_credits("alice", 10)
    assert len(topping.list_topups()) == 3  # disabled: no more
    assert available(topping) == 20
    assert topping.set_auto_topup("alice", threshold=100, amount=300).enabled  # set again: on again


def test_a_provider_that_raises_or_answers_nonsense_is_retried_with_the_same_key_then_fails(
    topping: CreditService, provider: ScriptedProvider,
) -> None:
    provider.script("raise", "garbage", "raise")
    topping.add_credits("alice", 50)
    topping.set_auto_topup("alice", threshold=100, amount=200)
    (topup,) = topping.list_topups()
    first = topping.charge_topup(topup.id)
    assert first.state == "charging" and "ConnectionError" in (first.error or "")
    second = topping.charge_topup(topup.id)
    assert second.state == "charging" and "answered int" in (second.error or "")
    third = topping.charge_topup(topup.id)
    assert third.state == "failed" and third.attempts == 3
    assert available(topping) == 50
    assert provider.charges() == []


def test_a_provider_that_does_not_load_fails_the_charge_not_the_deduct(engine: Engine) -> None:
    service = CreditService(engine, payment_provider="no_such_module_anywhere:provider")
    service.add_credits("alice", 500)
    service.set_auto_topup("alice", threshold=100, amount=300)
    entry = service.deduct_credits("alice", 450)
    assert entry.balance_after == 50
    (topup,) = service.list_topups()
    with pytest.raises(PaymentProviderError, match="does not import"):
        service.charge_topup(topup.id)
    assert service.list_topups()[0].state == "requested"  # the sweep tries again once it is fixed


@pytest.mark.parametrize(("spec", "problem"), [
    ("nonsense", "neither 'manual' nor 'module:object'"),
    ("no_such_module_anywhere:x", "does not import"),
    ("creditworker.engine.payments:missing", "has no 'missing'"),
    ("creditworker.engine.payments:MANUAL", "has no charge"),
])
def test_a_wrong_provider_setting_says_what_is_wrong(spec: str, problem: str) -> None:
    with pytest.raises(PaymentProviderError, match=problem):
        load_provider(spec)


def test_the_manual_provider_grants_at_once(service: CreditService) -> None:
    service.add_credits("alice", 50)
    service.set_auto_topup("alice", threshold=100, amount=200)
    done = service.charge_topup(service.list_topups()[0].id)
    assert done.state == "succeeded" and done.provider_reference.startswith("manual:")
    assert available(service) == 250


def test_charging_an_unknown_top_up_is_a_clear_error(service: CreditService) -> None:
    with pytest.raises(UnknownTopup):
        service.charge_topup(999)
    with pytest.raises(UnknownTopup):
        service.complete_topup(999, succeeded=True)


# ---------------------------------------------------------------- pending, target, cap


def test_a_pending_charge_is_granted_when_completed(topping: CreditService, provider: ScriptedProvider) -> None:
    provider.script("pending")
    topping.add_credits("alice", 50)
    topping.set_auto_topup("alice", threshold=100, target=500)
    (topup,) = topping.list_topups()
    assert topping.charge_topup(topup.id).state == "pending"
    assert available(topping) == 50
    done = topping.complete_topup(topup.id, succeeded=True, reference="pi_123")
    assert (done.state, done.provider_reference) == ("succeeded", "pi_123")
    assert available(topping) == 500
    assert topping.complete_topup(topup.id, succeeded=True).state == "succeeded"  # a webhook delivered twice
    assert available(topping) == 500
    with pytest.raises(TopupNotPending):
        topping.complete_topup(topup.id, succeeded=False)


def test_a_failed_completion_grants_nothing_and_counts_a_failure(topping: CreditService,
                                                                 provider: ScriptedProvider) -> None:
    provider.script("pending")
    topping.add_credits("alice", 50)
    topping.set_auto_topup("alice", threshold=100, amount=200)
    (topup,) = topping.list_topups()
    topping.charge_topup(topup.id)
    done = topping.complete_topup(topup.id, succeeded=False, error="insufficient funds")
    assert (done.state, done.error) == ("failed", "insufficient funds")
    assert available(topping) == 50
    assert topping.get_auto_topup("alice").consecutive_failures == 1


def test_pending_top_ups_count_toward_the_target(topping: CreditService, provider: ScriptedProvider) -> None:
    provider.script("pending")
    topping.add_credits("alice", 500)
    topping.set_auto_topup("alice", threshold=100, target=1000)
    topping.deduct_credits("alice", 450)  # 50 left: 950 asked
    first = topping.list_topups()[0]
    topping.charge_topup(first.id)  # pending: 950 coming
    topping.deduct_credits("alice", 40)  # 10 + 950 coming: above the threshold
    assert len(topping.list_topups()) == 1
    topping.complete_topup(first.id, succeeded=False)
    topping.deduct_credits("alice", 5)  # 5 left, nothing coming: 995 asked
    assert topping.list_topups()[0].credits == 995


def test_max_per_month_caps_the_money_charged(topping: CreditService) -> None:
    topping.add_credits("alice", 150)
    topping.set_auto_topup("alice", threshold=100, amount=100, unit_price=1, max_per_month=250)
    for _round in range(2):
        topping.deduct_credits("alice", 100)
        topping.charge_topup(topping.list_topups()[0].id)
    assert [topup.cost for topup in topping.list_topups()] == [Decimal(100), Decimal(100)]
    topping.deduct_credits("alice", 100)  # a third 100 would make 300 > 250
    assert len(topping.list_topups()) == 2
    assert available(topping) == 50


def test_list_top_ups_by_state(topping: CreditService, provider: ScriptedProvider) -> None:
    provider.script("failed")
    topping.add_credits("alice", 50)
    topping.add_credits("bob", 50)
    topping.set_auto_topup("alice", threshold=100, amount=100)
    topping.set_auto_topup("bob", threshold=100, amount=100)
    topping.charge_topup(topping.list_topups(user_id="alice")[0].id)
    assert [topup.user_id for topup in topping.list_topups(state="failed")] == ["alice"]
    assert [topup.user_id for topup in topping.list_topups(state="requested")] == ["bob"]
    with pytest.raises(ValidationFailed):
        topping.list_topups(state="lost")


# ---------------------------------------------------------------- concurrency


def test_fifty_concurrent_deducts_that_all_cross_make_one_top_up(pg_engine: Engine) -> None:
    service = CreditService(pg_engine)
    service.add_credits("hot", 1000)
    service.set_auto_topup("hot", threshold=900, amount=500)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: service.deduct_credits("hot", 10, idempotency_key=f"d{i}"), range(50)))
    (topup,) = service.list_topups()
    assert topup.state == "requested"
    with ThreadPoolExecutor(4) as pool:  # four workers handed the same top-up: one grant
        done = list(pool.map(lambda _: service.charge_topup(topup.id), range(4)))
    assert {topup.state for topup in done} == {"succeeded"}
    assert available(service, "hot") == 1000 - 500 + 500
    assert len(service.get_history("hot", limit=100, kinds=["add"])) == 2
    assert audit(pg_engine).passed


def _statements_on(engine: Engine) -> list[str]:
    from sqlalchemy import event

    seen: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: seen.append(str(args[2])))
    return seen


def test_a_deduct_reads_no_rule_on_an_account_without_one_or_well_above_its_threshold(
    topping: CreditService, engine: Engine,
) -> None:
    """The rules are read only when a write leaves an account below the highest threshold
    of its enabled rules (`accounts.topup_threshold`): the metered path pays nothing else."""
    topping.add_credits("alice", 500)
    topping.add_credits("bob", 500)
    topping.set_auto_topup("bob", threshold=100, amount=100)
    seen = _statements_on(engine)
    topping.deduct_credits("alice", 450)
    topping.deduct_credits("bob", 300)
    assert not [statement for statement in seen if "auto_topup_rules" in statement]
    topping.deduct_credits("bob", 150)
    assert [statement for statement in seen if "auto_topup_rules" in statement]
    assert [topup.user_id for topup in topping.list_topups()] == ["bob"]


def test_removing_or_disabling_the_rule_stops_the_reads(topping: CreditService, engine: Engine) -> None:
    topping.add_credits("alice", 500)
    topping.set_auto_topup("alice", threshold=100, amount=100)
    topping.set_auto_topup("alice", threshold=300, amount=100, credit_type="images")
    topping.remove_auto_topup("alice")
    topping.remove_auto_topup("alice", credit_type="images")
    seen = _statements_on(engine)
    topping.deduct_credits("alice", 450)
    assert not [statement for statement in seen if "auto_topup_rules" in statement]
    assert [topup.credit_type for topup in topping.list_topups()] == ["images"]  # asked when set (0 < 300)


def test_the_audit_finds_a_top_up_granted_but_not_succeeded_or_succeeded_but_not_granted(
    service: CreditService, engine: Engine,
) -> None:
    from sqlalchemy import update

    from creditworker.storage.tables import TopupRow

    service.add_credits("alice", 50)
    service.set_auto_topup("alice", threshold=100, amount=200)
    done = service.charge_topup(service.list_topups()[0].id)
    assert audit(engine).passed
    with engine.begin() as connection:
        connection.execute(update(TopupRow).where(TopupRow.id == done.id).values(state="failed"))
    assert [problem.check for problem in audit(engine).problems] == ["topup_granted_once"]
    service.add_credits("bob", 50)
    service.set_auto_topup("bob", threshold=100, amount=200)
    with engine.begin() as connection:
        connection.execute(update(TopupRow).where(TopupRow.user_id == "bob").values(state="succeeded"))
    found = sorted(problem.detail for problem in audit(engine).problems)
    assert len(found) == 2 and any("succeeded for 200 credits: no lot" in detail for detail in found)


def test_a_worker_starting_with_a_provider_that_does_not_load_warns_and_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from creditworker.settings import Settings
    from creditworker.worker.startup import check_payment_provider

    check_payment_provider(Settings(payment_provider="manual"))
    assert caplog.records == []
    check_payment_provider(Settings(payment_provider="no_such_module_anywhere:provider"))
    (record,) = caplog.records
    assert "auto top-ups wait until the payment provider loads" in record.getMessage()
    assert "CREDITWORKER_PAYMENT_PROVIDER='no_such_module_anywhere:provider'" in record.getMessage()
