"""A missing setup step is one line that says what to do, never a traceback, and a read
leaves no empty database file behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests import services


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CREDITWORKER_")}
    return subprocess.run(["creditworker", *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, check=False)


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: database_not_ready: ")
    return lines[0]


@pytest.mark.parametrize("command", [["balance", "alice"], ["history", "alice"], ["audit"],
                                     ["plans", "list"], ["dead-letters", "list"]])
def test_a_command_before_db_upgrade_says_so_and_creates_no_file(
    tmp_path: Path, command: list[str]
) -> None:
    line = one_line(run(tmp_path, *command))
    assert "no database file at sqlite:///creditworker.db" in line
    assert "creditworker db upgrade" in line
    assert list(tmp_path.iterdir()) == []


def test_a_database_without_tables_says_run_db_upgrade(tmp_path: Path, postgres_url: str) -> None:
    name = services.unique_name("cw_empty")
    admin = create_engine(make_url(postgres_url).set(database="postgres"),
                          isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    try:
        url = make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
        line = one_line(run(tmp_path, "--database-url", url, "balance", "alice"))
        assert f"no tables in {url}" in line and "creditworker db upgrade" in line
    finally:
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


@pytest.mark.parametrize("command", [["balance", "alice"], ["db", "upgrade"], ["db", "current"]])
def test_a_postgresql_database_that_does_not_exist_says_how_to_create_it(
    tmp_path: Path, postgres_server_url: str, command: list[str]
) -> None:
    parsed = make_url(postgres_server_url)
    url = parsed.set(database="cw_never_created").render_as_string(hide_password=False)
    line = one_line(run(tmp_path, "--database-url", url, *command))
    assert "PostgreSQL database 'cw_never_created' does not exist" in line
    assert f"createdb -h {parsed.host} -p {parsed.port or 5432}" in line


def test_a_mysql_database_that_does_not_exist_says_how_to_create_it(
    tmp_path: Path, mysql_url: str
) -> None:
    url = make_url(mysql_url).set(database="cw_never_created").render_as_string(hide_password=False)
    line = one_line(run(tmp_path, "--database-url", url, "balance", "alice"))
    assert "MySQL database 'cw_never_created' does not exist" in line and "CREATE DATABASE" in line


def test_a_server_that_does_not_answer_is_one_line(tmp_path: Path) -> None:
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{services.free_port()}/x"
    line = one_line(run(tmp_path, "--database-url", url, "balance", "alice"))
    assert "cannot use the database" in line and "Connection refused" in line


# Issue 30: every setup failure of `up`, `serve` and the other commands is one line.

def without_module(tmp_path: Path, name: str) -> dict[str, str]:
    """An environment in which `import name` fails as if it were not installed: a module of
    that name earlier on the path raises what a missing one raises."""
    shadow = tmp_path / "shadow"
    shadow.mkdir(exist_ok=True)
    (shadow / f"{name}.py").write_text(
        f"raise ModuleNotFoundError(\"No module named '{name}'\", name={name!r})\n"
    )
    return {"PYTHONPATH": os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")])}


def run_with(tmp_path: Path, extra_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CREDITWORKER_")}
    return subprocess.run(["creditworker", *args], env={**env, **extra_env}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines
    return lines[0]


def test_serve_on_a_missing_database_is_one_line(tmp_path: Path, postgres_server_url: str) -> None:
    missing = make_url(postgres_server_url).set(database="cw_never_created")
    env = {"CREDITWORKER_DATABASE_URL": missing.render_as_string(hide_password=False)}
    line = one_error_line(run_with(tmp_path, env, "serve", "--port", str(services.free_port())))
    assert "PostgreSQL database 'cw_never_created' does not exist" in line


@pytest.mark.parametrize("command", [["up"], ["balance", "alice"], ["db", "upgrade"]])
def test_up_on_a_missing_database_or_a_wrong_port_is_one_line(
    tmp_path: Path, postgres_server_url: str, command: list[str]
) -> None:
    parsed = make_url(postgres_server_url)
    missing = parsed.set(database="cw_never_created").render_as_string(hide_password=False)
    line = one_error_line(run_with(tmp_path, {"CREDITWORKER_DATABASE_URL": missing}, *command))
    assert "PostgreSQL database 'cw_never_created' does not exist" in line and "createdb" in line
    wrong_port = parsed.set(port=services.free_port(), password="s3cret")
    url = wrong_port.render_as_string(hide_password=False)
    line = one_error_line(run_with(tmp_path, {"CREDITWORKER_DATABASE_URL": url}, *command))
    assert "Connection refused" in line and f":{wrong_port.port}/" in line
    assert "s3cret" not in line and "***" in line


BAD_NAME = ("creditworker", "error: bad_database_url: 'creditworker' is not a database URL")


@pytest.mark.parametrize(("command", "url", "expected"), [
    # every command with the bare name; each other kind of URL once (they share one path)
    (["up"], *BAD_NAME), (["serve"], *BAD_NAME), (["balance", "alice"], *BAD_NAME),
    (["up"], "mongodb://127.0.0.1/x", "'mongodb' in mongodb://127.0.0.1/x is no database kind"),
    (["serve"], "postgresql+pg8000://u:pw@127.0.0.1/x",
     "driver pg8000 for postgresql+pg8000://u:***@127.0.0.1/x is not installed: pip install pg8000"),
])
def test_a_url_that_cannot_work_is_one_line_that_says_what_to_write(
    tmp_path: Path, command: list[str], url: str, expected: str
) -> None:
    line = one_error_line(run_with(tmp_path, {"CREDITWORKER_DATABASE_URL": url}, *command))
    assert expected in line


def test_postgres_scheme_is_read_as_postgresql(tmp_path: Path, postgres_server_url: str) -> None:
    url = make_url(postgres_server_url).set(drivername="postgres", database="cw_never_created")
    line = one_error_line(run_with(
        tmp_path, {"CREDITWORKER_DATABASE_URL": url.render_as_string(hide_password=False)},
        "balance", "alice"))
    assert "PostgreSQL database 'cw_never_created' does not exist" in line


def test_postgresql_without_psycopg_3_falls_back_to_psycopg2(
    tmp_path: Path, postgres_server_url: str
) -> None:
    url = make_url(postgres_server_url).set(drivername="postgresql", database="cw_never_created")
    env = {**without_module(tmp_path, "psycopg"),
           "CREDITWORKER_DATABASE_URL": url.render_as_string(hide_password=False)}
    line = one_error_line(run_with(tmp_path, env, "balance", "alice"))
    assert "does not exist" in line


def test_a_postgresql_url_without_a_driver_gets_psycopg2_and_psycopg_3_when_named() -> None:
    from creditworker.storage.database import make_engine
    from creditworker.storage.drivers import resolve_database_url

    assert resolve_database_url("postgresql://u@h/db").drivername == "postgresql+psycopg2"
    assert resolve_database_url("postgres://u@h/db").drivername == "postgresql+psycopg2"
    assert resolve_database_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"
    assert make_engine("postgresql://u@127.0.0.1:1/db").dialect.driver == "psycopg2"


def test_postgresql_with_its_driver_missing_names_the_pip_install(tmp_path: Path) -> None:
    env = {**without_module(tmp_path, "psycopg"),
           "CREDITWORKER_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1/x"}
    line = one_error_line(run_with(tmp_path, env, "up"))
    assert line.endswith("is not installed: pip install 'psycopg[binary]>=3.2'")
    env["CREDITWORKER_DATABASE_URL"] = "postgresql+psycopg2://postgres@127.0.0.1/x"
    env.update(without_module(tmp_path, "psycopg2"))
    line = one_error_line(run_with(tmp_path, env, "up"))
    assert line.endswith("is not installed: pip install psycopg2-binary")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    env = {"CREDITWORKER_DATABASE_URL": "creditworker"}
    done = run_with(tmp_path, env, "--debug", "balance", "alice")
    assert done.returncode != 0 and "Traceback" in done.stdout + done.stderr
    done = run_with(tmp_path, {**env, "CREDITWORKER_DEBUG": "1"}, "balance", "alice")
    assert "Traceback" in done.stdout + done.stderr


def test_settings_that_do_not_validate_are_one_line(tmp_path: Path) -> None:
    line = one_error_line(run_with(tmp_path, {"CREDITWORKER_EXPIRING_SOON_DAYS": "-3"},
                                   "balance", "alice"))
    assert line.startswith("error: invalid_settings: CREDITWORKER_EXPIRING_SOON_DAYS: ")


def test_the_async_service_needs_no_asyncio_driver_nor_greenlet(tmp_path: Path) -> None:
    script = ("import asyncio\nfrom creditworker import AsyncCreditService\n"
              "async def main():\n    credits = AsyncCreditService('sqlite:///x.db')\n"
              "    print((await credits.add_credits('ann', 5)).balance_after)\n    await credits.dispose()\n"
              "asyncio.run(main())\n")
    env = {**os.environ, **without_module(tmp_path, "greenlet")}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout.strip() == "5", done.stderr


@pytest.mark.parametrize("scheme", ["amqp://guest:s3cret@", "redis://:s3cret@"])
def test_up_with_a_broker_that_is_down_says_what_to_check(tmp_path: Path, scheme: str) -> None:
    port = services.free_port()
    url = f"{scheme}127.0.0.1:{port}/"
    line = one_error_line(run_with(tmp_path, {"CREDITWORKER_BROKER_URL": url}, "up"))
    assert line.startswith("error: service_unavailable: cannot reach the broker ")
    assert f"127.0.0.1:{port}" in line and "s3cret" not in line
    assert "CREDITWORKER_BROKER_URL" in line


@pytest.mark.parametrize(("url", "expected"), [
    ("creditworker", "'creditworker' is not a database URL"),
    ("postgresql+pg8000://postgres@127.0.0.1/x", "pip install pg8000"),
])
def test_a_worker_with_a_database_url_that_cannot_work_exits_with_one_line(
    tmp_path: Path, url: str, expected: str
) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CREDITWORKER_")}
    env.update(CREDITWORKER_DATABASE_URL=url, C_FORCE_ROOT="1")
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "creditworker", "worker",
                           "--concurrency=1"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    ours = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and expected in ours[0]
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.parametrize("scheme", ["amqp://guest:s3cret@", "redis://:s3cret@"])
def test_a_hand_started_worker_and_beat_say_once_which_broker_they_cannot_reach(
    tmp_path: Path, scheme: str
) -> None:
    """`celery -A creditworker worker` and `beat` keep retrying a broker that refuses
    connections (it may be starting beside them), but say so in one line naming the broker and
    the setting, not in one "Trying again" line per retry."""
    port = services.free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("CREDITWORKER_")}
    env.update(CREDITWORKER_BROKER_URL=f"{scheme}127.0.0.1:{port}/",
               CREDITWORKER_DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}", C_FORCE_ROOT="1")
    commands = {"worker": ["worker", "--concurrency=1", "--loglevel=INFO"], "beat": ["beat"]}
    running = {name: subprocess.Popen([sys.executable, "-m", "celery", "-A", "creditworker", *argv],
                                      env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, start_new_session=True)
               for name, argv in commands.items()}
    time.sleep(9)  # Celery retries at once, then 2 s, 4 s, 6 s later: at least three tries each
    for name, process in running.items():
        process.terminate()
        output = process.communicate(timeout=30)[0].decode(errors="replace")
        ours = [line for line in output.splitlines() if "cannot reach the broker" in line]
        assert len(ours) == 1, f"{name}:\n{output[-3000:]}"
        assert f"127.0.0.1:{port}" in ours[0] and "CREDITWORKER_BROKER_URL" in ours[0]
        assert "Trying again" not in output and "s3cret" not in output, f"{name}:\n{output[-3000:]}"
