"""Operations on one account serialise; different accounts never wait on each other."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from creditworker import CreditService
from creditworker.contract.errors import InsufficientCredits
from creditworker.records.audit import audit


def deduct_until_refused(service: CreditService, user: str, step: int) -> int:
    done = 0
    while True:
        try:
            service.deduct_credits(user, step)
        except InsufficientCredits:
            return done
        done += 1


@pytest.mark.parametrize("dialect", ["postgres", "mysql", "sqlite"])
def test_sixteen_threads_deducting_from_one_account_leave_exactly_the_remainder(
    dialect: str, request: pytest.FixtureRequest, migrated_engines: dict[str, Engine]
) -> None:
    from tests.conftest import engine_for, wipe

    engine = engine_for(request.getfixturevalue(f"{dialect}_url"), migrated_engines)
    wipe(engine)
    service = CreditService(engine)
    service.add_credits("hot", 1000)
    with ThreadPoolExecutor(16) as pool:
        counts = list(pool.map(lambda _: deduct_until_refused(service, "hot", 7), range(16)))
    info = service.get_user_credits_info("hot")
    assert info.total == 1000 % 7 == 6
    assert sum(counts) == 1000 // 7
    assert len(service.get_history("hot", limit=1000, kinds=["deduct"])) == 142
    assert audit(engine).passed


def test_reservations_and_commits_racing_on_one_account_keep_the_invariants(pg_engine: Engine) -> None:
    service = CreditService(pg_engine)
    service.add_credits("hot", 500)

    def work(worker: int) -> None:
        for round_ in range(15):
            try:
                hold = service.reserve_credits("hot", 9)
            except InsufficientCredits:
                continue
            if (worker + round_) % 3:
                service.commit_reservation(hold.id, 7)
            else:
                service.release_reservation(hold.id)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    info = service.get_user_credits_info("hot")
    assert info.reserved == 0 and info.total >= 0
    assert audit(pg_engine).passed


def test_a_locked_account_does_not_block_another_account(pg_engine: Engine) -> None:
    service = CreditService(pg_engine)
    service.add_credits("locked", 10)
    service.add_credits("free", 10)
    blocker = pg_engine.connect()
    transaction = blocker.begin()
    blocker.execute(text("SELECT * FROM accounts WHERE user_id = 'locked' FOR UPDATE"))
    try:
        blocked_done = threading.Event()
        blocked = threading.Thread(
            target=lambda: (service.deduct_credits("locked", 1), blocked_done.set()), daemon=True
        )
        blocked.start()
        free_done = threading.Event()
        threading.Thread(
            target=lambda: (service.deduct_credits("free", 1), free_done.set()), daemon=True
        ).start()
        assert free_done.wait(10), "a deduct on another account waited for the lock"
        assert not blocked_done.wait(0.5), "the locked account's deduct did not wait"
    finally:
        transaction.rollback()
        blocker.close()
    assert blocked_done.wait(10)
    assert service.get_user_credits_info("locked").total == 9
