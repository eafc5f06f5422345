"""Every example in README.md, then in each page of docs/, runs as written, in order, in one
fresh directory (the README's background processes still running, as for a reader who goes
on to the docs).

A fenced `bash` or `python` block is an example. An HTML comment on the line before it says
how to run it: `<!-- readme: background wait-for="ready" -->` (a command that keeps running:
started, then awaited until its output shows the text), `postgres-redis` (on the test
servers, in a directory of its own: the README's local URLs are replaced by the test's),
`expect="..."` (the output must contain it), `skip="why"`. `pip install` commands are not
run: the test command installed the project already.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests import services
from tests.e2e.conftest import redis_db

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOC_PAGES = [ROOT / "docs" / f"{name}.md" for name in (
    "worker", "http", "console", "subscriptions", "notifications", "webhooks", "credit-types",
    "topups", "engine", "cli", "metrics", "reliability", "security", "architecture", "benchmarks")]
"""The docs in the order a reader meets them from the README; every page is listed
(test_every_docs_page_is_run_by_the_runner)."""
NODE_PRODUCER = "node producers/node/"
BLOCK = re.compile(r"(?:<!-- readme: (?P<directive>[^\n]*?) -->\n)?```(?P<lang>bash|python)\n(?P<code>.*?)```", re.DOTALL)
PIP_INSTALL = re.compile(r"^pip install [^&\n]*(?:&& )?", re.MULTILINE)
README_POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432/credits"
README_CREATEDB = "createdb -h 127.0.0.1 -U postgres credits"
README_REDIS = "redis://127.0.0.1:6379/0"
REDIS_DB = 4


@dataclass
class Example:
    lang: str
    code: str
    line: int
    options: dict[str, str] = field(default_factory=dict)

    page: Path = README

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)} line {self.line}"


def examples(page: Path = README) -> list[Example]:
    source = page.read_text()
    found = []
    for match in BLOCK.finditer(source):
        options: dict[str, str] = {}
        for word in shlex.split(match.group("directive") or ""):
            key, _, value = word.partition("=")
            options[key] = value
        line = source.count("\n", 0, match.start("code"))
        found.append(Example(match.group("lang"), match.group("code"), line, options, page))
    return found


def all_examples() -> list[Example]:
    return [example for page in [README, *DOC_PAGES] for example in examples(page)]


def test_the_readme_has_examples_and_only_known_directives() -> None:
    known = {"background", "wait-for", "postgres-redis", "expect", "skip"}
    assert len(examples()) >= 8
    for example in all_examples():
        assert set(example.options) <= known, example.name


def test_every_docs_page_is_run_by_the_runner() -> None:
    assert sorted(DOC_PAGES) == sorted((ROOT / "docs").glob("*.md"))


@pytest.fixture
def readme_postgres(postgres_server_url: str) -> Iterator[str]:
    name = services.unique_name("cw_readme")
    yield make_url(postgres_server_url).set(database=name).render_as_string(hide_password=False)
    admin = create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


def test_every_readme_example_runs_as_written(
    tmp_path: Path, readme_postgres: str, redis_url: str
) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CREDITWORKER_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["C_FORCE_ROOT"] = "1"  # Celery refuses to run as root otherwise (CI runs as root)
    broker = redis_db(redis_url, REDIS_DB)
    redis.Redis.from_url(broker).flushdb()
    pg = make_url(readme_postgres)
    substitutions = {
        README_CREATEDB: f"createdb -h {pg.host} -p {pg.port or 5432} -U {pg.username} {pg.database}",
        README_POSTGRES: readme_postgres,
        README_REDIS: broker,
    }
    background: list[tuple[Example, subprocess.Popen[bytes], Path]] = []
    try:
        for example in all_examples():
            if "skip" in example.options:
                continue
            started = time.monotonic()
            code = PIP_INSTALL.sub("", example.code)
            workdir = tmp_path
            if "postgres-redis" in example.options:
                for readme_text, test_text in substitutions.items():
                    code = code.replace(readme_text, test_text)
                workdir = tmp_path / "postgres-redis"
                workdir.mkdir(exist_ok=True)
            code = code.replace(NODE_PRODUCER, f"node {ROOT / 'producers' / 'node'}/")
            run_env = env
            if "postgres-redis" in example.options and example.page != README:
                # a docs page read after the README: the reader exported these for the workers
                run_env = {**env, "CREDITWORKER_DATABASE_URL": readme_postgres,
                           "CREDITWORKER_BROKER_URL": broker}
            argv = ["bash", "-euo", "pipefail", "-c", code] if example.lang == "bash" \
                else [sys.executable, "-c", code]
            if "background" in example.options:
                log = workdir / f"background-{example.line}.log"
                process = subprocess.Popen(argv, cwd=workdir, env=run_env, stdout=open(log, "wb"),  # noqa: SIM115 - the log
                                           stderr=subprocess.STDOUT, start_new_session=True)
                background.append((example, process, log))
                _await(example, process, log, example.options.get("wait-for"))
                print(f"{example.name}: ready in {time.monotonic() - started:.1f} s")
                continue
            done = subprocess.run(argv, cwd=workdir, env=run_env, capture_output=True, text=True, timeout=120, check=False)
            output = done.stdout + done.stderr
            assert done.returncode == 0, f"{example.name} exited {done.returncode}:\n{output[-3000:]}"
            assert example.options.get("expect", "") in output, f"{example.name} printed:\n{output[-3000:]}"
            print(f"{example.name}: {time.monotonic() - started:.1f} s")
    finally:
        for example, process, _log in reversed(background):
            started = time.monotonic()
            _stop(process)
            print(f"{example.name}: stopped in {time.monotonic() - started:.1f} s")


def _await(example: Example, process: subprocess.Popen[bytes], log: Path, text: str | None) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{example.name} exited {process.returncode}:\n{log.read_text()[-3000:]}")
        if text is None or text in log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    pytest.fail(f"{example.name} did not print {text!r} within 90 s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Ctrl-C, as a person would; the whole group if it does not stop in time."""
    try:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(40)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(10)
