"""Prepared statements on PostgreSQL: each statement is prepared once per connection; a
connection that lost them (or holds them unknown to the engine, as a pooler in transaction
mode makes it) reruns the transaction and nothing is written twice; after three such losses
the engine stops preparing; and through a real PgBouncer in transaction mode every operation
lands once."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine, make_url

from creditworker import CreditService
from creditworker.records.audit import audit
from creditworker.storage.backends import prepared
from creditworker.storage.database import make_engine
from creditworker.storage.migrate import upgrade
from tests import services
from tests.conftest import wipe
from tests.engine.test_writer import counted_statements
from tests.harness import free_port, port_answers


@pytest.fixture
def service(postgres_url: str) -> Iterator[CreditService]:
    """An engine of its own (its preparing state is per engine), one pooled connection."""
    engine = make_engine(postgres_url, pool_size=1, max_overflow=0)
    upgrade(engine)
    wipe(engine)
    credits = CreditService(engine)
    credits.add_credits("ada", 1000)
    yield credits
    engine.dispose()


def metered(credits: CreditService, key: str, held: int = 50, charged: int = 20) -> None:
    hold = credits.reserve_credits("ada", held, ttl_seconds=60, idempotency_key=f"{key}:reserve")
    credits.commit_reservation(hold.id, charged, idempotency_key=f"{key}:commit")


def prepares(statements: list[str]) -> int:
    return sum(statement.count("PREPARE cw_") for statement in statements)


def executes(statements: list[str]) -> int:
    return sum(statement.count("EXECUTE cw_") for statement in statements)


def held_on_server(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        return set(connection.scalars(text("SELECT name FROM pg_prepared_statements")))


def entries(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT kind, count(*) FROM ledger_entries GROUP BY kind"))
        return {kind: int(count) for kind, count in rows}


def on_the_pooled_connection(engine: Engine, sql: str) -> None:
    with engine.connect() as connection:
        cursor: Any = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        cursor.execute(sql)
        cursor.close()
        connection.rollback()


def test_a_statement_is_prepared_once_per_connection(service: CreditService) -> None:
    with counted_statements(service.engine) as first:
        metered(service, "one")
    with counted_statements(service.engine) as second:
        metered(service, "two")
    assert prepares(first) > 0
    assert prepares(second) == 0 and executes(second) == executes(first)
    assert executes(second) >= 4  # the lock, the read and the writes of a reserve and a commit
    assert held_on_server(service.engine) >= {  # what the first pair prepared, still there
        statement.split()[1] for text_ in first for statement in text_.split(";")
        if statement.strip().startswith("PREPARE")
    }
    assert service.get_user_credits_info("ada").total == 960


def test_statements_lost_from_the_connection_rerun_the_transaction_once(service: CreditService) -> None:
    metered(service, "warm")
    on_the_pooled_connection(service.engine, "DEALLOCATE ALL")  # as another server connection would be
    with counted_statements(service.engine) as statements:
        metered(service, "after")
    assert prepares(statements) > 0  # prepared again
    assert service.get_user_credits_info("ada").total == 960
    assert entries(service.engine) == {"add": 1, "reserve": 2, "commit": 2}
    assert audit(service.engine).passed


def test_statements_already_on_the_server_connection_rerun_the_transaction_once(service: CreditService) -> None:
    metered(service, "warm")
    with service.engine.connect() as connection:  # the engine forgets what it prepared there
        connection.connection.info["creditworker.prepared"] = set()
    metered(service, "after")  # its PREPARE finds the name taken (42P05), reads the list, reruns
    with counted_statements(service.engine) as statements:
        metered(service, "third")
    assert prepares(statements) == 0
    assert service.get_user_credits_info("ada").total == 940
    assert entries(service.engine) == {"add": 1, "reserve": 3, "commit": 3}


def test_after_three_losses_the_engine_stops_preparing_and_says_so(
    service: CreditService, caplog: pytest.LogCaptureFixture
) -> None:
    metered(service, "warm")
    with caplog.at_level(logging.WARNING, logger=prepared.__name__):
        for round_number in range(prepared.GIVE_UP_AFTER):
            on_the_pooled_connection(service.engine, "DEALLOCATE ALL")
            metered(service, f"lost-{round_number}")
    warnings = [record for record in caplog.records if "stops preparing" in record.getMessage()]
    assert len(warnings) == 1
    assert "CREDITWORKER_DATABASE_PREPARED_STATEMENTS=false" in warnings[0].getMessage()
    assert not prepared.enabled(service.engine)
    with counted_statements(service.engine) as statements:
        metered(service, "plain")
    assert prepares(statements) == 0 and executes(statements) == 0
    assert service.get_user_credits_info("ada").total == 1000 - 20 * (prepared.GIVE_UP_AFTER + 2)
    assert entries(service.engine)["commit"] == prepared.GIVE_UP_AFTER + 2


def test_prepared_statements_off_sends_plain_statements(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    upgrade(engine)
    wipe(engine)
    credits = CreditService(engine, prepared_statements=False)
    with counted_statements(engine) as statements:
        credits.add_credits("bea", 100)
        metered_user = credits.reserve_credits("bea", 10, idempotency_key="off:reserve")
        credits.commit_reservation(metered_user.id, 5, idempotency_key="off:commit")
    assert prepares(statements) == 0 and executes(statements) == 0
    assert credits.get_user_credits_info("bea").total == 95
    engine.dispose()


# ------------------------------------------------------------------ a real PgBouncer


@pytest.fixture
def pgbouncer_url(postgres_url: str) -> Iterator[str]:
    """A PgBouncer of this test's own in transaction mode, three server connections in front
    of the test's database (it refuses to run as root: it runs as the `postgres` user)."""
    binary = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None)
    if binary is None:
        services.unavailable("no pgbouncer on PATH (Debian: apt-get install pgbouncer)")
    server = make_url(postgres_url)
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="cw-pgbouncer-"))
    (folder / "users.txt").write_text(f'"{server.username}" ""\n')
    (folder / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"{server.database} = host={server.host} port={server.port or 5432} dbname={server.database}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {folder / 'users.txt'}\n"
        "pool_mode = transaction\ndefault_pool_size = 3\nmax_client_conn = 100\n"
        f"logfile = {folder / 'pgbouncer.log'}\npidfile = {folder / 'pgbouncer.pid'}\n"
    )
    shutil.chown(folder, "postgres")
    for path in folder.iterdir():
        shutil.chown(path, "postgres")
    command = [binary, str(folder / "pgbouncer.ini")]
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not port_answers(f"postgresql://127.0.0.1:{port}", port, timeout=0.5):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not start: {process.stderr.read() if process.stderr else ''!r}")
            time.sleep(0.05)
        yield server.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("preparing", [True, False], ids=["prepared-by-default", "prepared-statements-off"])
def test_through_pgbouncer_in_transaction_mode_every_operation_lands_once(
    postgres_url: str, pgbouncer_url: str, preparing: bool
) -> None:
    direct = make_engine(postgres_url)
    upgrade(direct)
    wipe(direct)
    credits = CreditService(make_engine(pgbouncer_url, pool_size=8, max_overflow=0), prepared_statements=preparing)
    users = [f"user-{n}" for n in range(4)]
    for user in users:
        credits.add_credits(user, 10_000)
    failures: list[BaseException] = []

    def meter(thread: int) -> None:
        try:
            for n in range(25):
                user = users[(thread + n) % len(users)]
                hold = credits.reserve_credits(user, 30, idempotency_key=f"{thread}-{n}:reserve")
                credits.commit_reservation(hold.id, 7, idempotency_key=f"{thread}-{n}:commit")
        except BaseException as error:  # noqa: BLE001 - reported below
            failures.append(error)

    threads = [threading.Thread(target=meter, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert sum(credits.get_user_credits_info(user).total for user in users) == 4 * 10_000 - 8 * 25 * 7
    assert entries(direct) == {"add": 4, "reserve": 200, "commit": 200}
    assert audit(direct).passed
    # Prepared, the statements were lost as transactions moved between server connections,
    # and the engine stopped preparing; off, it never prepared.
    assert not prepared.enabled(credits.engine)
    credits.engine.dispose()
    direct.dispose()
