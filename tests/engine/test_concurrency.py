"""Operations on one account serialise; different accounts never wait on each other."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from creditworker import CreditService
from creditworker.contract.errors import InsufficientCredits
from creditworker.engine import rules
from creditworker.engine.unit_of_work import UnitOfWork
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


@pytest.mark.parametrize("waiting", ["deduct", "commit"])
def test_a_write_that_waited_for_the_lock_reads_what_the_holder_committed(pg_engine: Engine, waiting: str) -> None:
    """The lock and the reads go out in one round trip on PostgreSQL: the reads must still see
    the lots and totals the previous lock holder committed while this write waited (a read
    with the lock's snapshot would draw the lot from its old `remaining`, and lose a draw)."""
    service = CreditService(pg_engine)
    service.add_credits("hot", 10)
    hold = service.reserve_credits("hot", 6) if waiting == "commit" else None
    holding, go_on = threading.Event(), threading.Event()

    def first(uow: UnitOfWork) -> None:  # draws 4 with the lock held until told to go on
        uow.lock(["hot"], with_lots=True)
        uow.post(rules.deduct(uow.account("hot"), 4, at=uow.at, key="first"))
        uow.record_system_operation("first", "DeductCredits", "hot")
        holding.set()
        assert go_on.wait(10)

    holder = threading.Thread(target=service.run, args=(first,), daemon=True)
    holder.start()
    assert holding.wait(10)
    with ThreadPoolExecutor(1) as pool:
        second = pool.submit(lambda: service.deduct_credits("hot", 6) if hold is None
                             else service.commit_reservation(hold.id, 6))
        with pg_engine.connect() as connection:  # the second write waits for the lock
            for _ in range(200):
                if connection.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                          " AND datname = current_database()")):
                    break
                connection.rollback()  # the activity view is read once per transaction
                time.sleep(0.02)
            else:
                pytest.fail("the second write never waited for the lock")
        go_on.set()
        holder.join(10)
        assert second.result(10).amount == -6
    info = service.get_user_credits_info("hot")
    print("DEBUG", info, [ (e.kind, e.amount, e.balance_after) for e in service.get_history("hot")])
    assert (info.total, info.reserved) == (0, 0)
    with pytest.raises(InsufficientCredits):
        service.deduct_credits("hot", 1)
    assert audit(pg_engine).passed
