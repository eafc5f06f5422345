"""Auto top-ups through a real worker on PostgreSQL (issue 29), under faults: the whole path
(producer -> worker -> relay -> charge -> grant) on Redis and on RabbitMQ, the faults on
RabbitMQ.

The payment provider is the scripted one (creditworker/engine/payments.py), configured by
CREDITWORKER_PAYMENT_PROVIDER as a user configures theirs: it keeps its charges in a folder
shared with the test, and blocks mid-charge while a flag file exists, after it took the
money, so that a SIGKILL lands where a lost answer hurts most.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from creditworker.contract.operations import CHARGE_DUE_TOPUPS
from creditworker.engine.payments import ScriptedProvider
from creditworker.records.audit import audit
from creditworker.storage.tables import Entry
from tests.conftest import wipe
from tests.e2e.conftest import RunningWorker, _running, running_on_redis

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def payments(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("payments")


REDIS_DB = 2
"""This module's Redis database (each module that starts a worker on Redis has its own)."""


def topup_settings(payments: Path) -> dict[str, str]:
    """The scripted provider, as a user configures theirs, and a sweep that finds a top-up
    stale after 1 s."""
    return {
        "CREDITWORKER_PAYMENT_PROVIDER": "creditworker.engine.payments:scripted",
        "CREDITWORKER_TEST_PAYMENT_DIR": str(payments),
        "CREDITWORKER_TOPUP_STALE_AFTER_SECONDS": "1",
    }


@pytest.fixture(scope="module")
def worker_process(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, rabbitmq_url: str,
    migrated_engines: dict[str, Engine], payments: Path,
) -> Iterator[RunningWorker]:
    yield from _running(
        tmp_path_factory, postgres_url, rabbitmq_url, migrated_engines,
        CREDITWORKER_RESULT_BACKEND="rpc://", **topup_settings(payments),
    )


@pytest.fixture(scope="module")
def redis_worker_process(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, redis_url: str,
    migrated_engines: dict[str, Engine], payments: Path,
) -> Iterator[RunningWorker]:
    yield from running_on_redis(
        tmp_path_factory, postgres_url, redis_url, REDIS_DB, migrated_engines, **topup_settings(payments),
    )


def ready(process: RunningWorker, payments: Path) -> RunningWorker:
    """The worker on an empty database, with no charge recorded or scripted, running."""
    wipe(process.engine)
    for leftover in payments.iterdir():
        leftover.unlink()
    if process.process is None:
        process.start()
    return process


@pytest.fixture
def worker(worker_process: RunningWorker, payments: Path) -> RunningWorker:
    """The worker on RabbitMQ, for the faults."""
    return ready(worker_process, payments)


@pytest.fixture(params=["redis", "rabbitmq"])
def either_worker(request: pytest.FixtureRequest, payments: Path) -> RunningWorker:
    """The worker on Redis, then on RabbitMQ (one idles while the other runs: an idle worker
    runs nothing, since only a task it is sent wakes its relay)."""
    process = request.getfixturevalue("redis_worker_process" if request.param == "redis" else "worker_process")
    return ready(process, payments)


@pytest.fixture
def provider(payments: Path) -> ScriptedProvider:
    return ScriptedProvider(payments)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def grants_of(engine: Engine, key: str) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(select(func.count()).select_from(Entry).where(
            Entry.idempotency_key == key, Entry.kind == "add")) or 0)


def test_a_deduct_through_the_worker_tops_the_account_up_once(either_worker: RunningWorker,
                                                              provider: ScriptedProvider) -> None:
    worker = either_worker
    worker.client.add_credits("alice", 500).get(timeout=30)
    rule = worker.client.set_auto_topup("alice", threshold=100, target=1000, unit_price="0.01").get(timeout=30)
    assert worker.client.get_auto_topup("alice").get(timeout=30) == rule
    worker.client.deduct_credits("alice", 450).get(timeout=30)
    wait_for(lambda: worker.service.get_user_credits_info("alice").available == 1000, 30, "the top-up's grant")
    (topup,) = worker.client.list_topups(user_id="alice").get(timeout=30)
    assert (topup.state, topup.credits) == ("succeeded", 950)
    assert [charge["idempotency_key"] for charge in provider.charges()] == [topup.idempotency_key]
    assert grants_of(worker.engine, topup.idempotency_key) == 1


def test_sigkill_during_the_charge_charges_once_and_grants_once(worker: RunningWorker,
                                                               provider: ScriptedProvider, payments: Path) -> None:
    worker.service.add_credits("alice", 500)
    worker.service.set_auto_topup("alice", threshold=100, amount=700)
    (payments / "block").touch()  # the provider takes the money, then hangs before answering
    worker.client.deduct_credits("alice", 450).get(timeout=30)
    wait_for(lambda: len(provider.charges()) == 1, 30, "the charge to reach the provider")
    worker.kill()
    (topup,) = worker.service.list_topups()
    assert topup.state == "charging" and worker.service.get_user_credits_info("alice").available == 50
    (payments / "block").unlink()
    worker.start()
    # RabbitMQ gives the killed worker's unacknowledged charge back; it runs again with the
    # same idempotency key, and the provider answers its first answer.
    wait_for(lambda: worker.service.list_topups()[0].state == "succeeded", 60, "the charge after the restart")
    assert len(provider.charges()) == 1
    assert grants_of(worker.engine, topup.idempotency_key) == 1
    assert worker.service.get_user_credits_info("alice").available == 750
    assert audit(worker.engine).passed


def test_beat_s_sweep_charges_a_top_up_whose_message_was_lost(worker: RunningWorker,
                                                              provider: ScriptedProvider) -> None:
    """The in-process engine writes the request without waking a relay: only the sweep
    (`charge-due-topups`) can find it."""
    worker.service.add_credits("alice", 50)
    worker.service.set_auto_topup("alice", threshold=100, amount=200)
    (topup,) = worker.service.list_topups()
    assert topup.state == "requested"
    time.sleep(1.2)  # CREDITWORKER_TOPUP_STALE_AFTER_SECONDS=1
    sent = worker.client.app.send_task(CHARGE_DUE_TOPUPS.task).get(timeout=30)
    assert sent == {"ok": True, "result": {"sent": 1}}
    wait_for(lambda: worker.service.list_topups()[0].state == "succeeded", 30, "the swept charge")
    assert len(provider.charges()) == 1
    assert worker.service.get_user_credits_info("alice").available == 250


def test_a_failing_provider_then_a_working_one_through_the_worker(worker: RunningWorker,
                                                                 provider: ScriptedProvider) -> None:
    provider.script("failed", "succeeded")
    worker.service.add_credits("alice", 500)
    worker.service.set_auto_topup("alice", threshold=100, amount=300)
    worker.client.deduct_credits("alice", 450).get(timeout=30)
    wait_for(lambda: worker.service.list_topups()[0].state == "failed", 30, "the failed charge")
    assert worker.service.get_user_credits_info("alice").available == 50
    worker.client.deduct_credits("alice", 10).get(timeout=30)
    wait_for(lambda: worker.service.list_topups()[0].state == "succeeded", 30, "the second charge")
    assert worker.service.get_user_credits_info("alice").available == 340
    assert [topup.state for topup in worker.service.list_topups()] == ["succeeded", "failed"]
