"""A missing setup step is one line that says what to do, never a traceback, and a read
leaves no empty database file behind."""

from __future__ import annotations

import os
import subprocess
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
