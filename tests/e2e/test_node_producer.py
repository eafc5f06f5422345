"""A producer that is not Python: Node.js speaks Celery's protocol to Redis directly."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import services
from tests.e2e.conftest import RunningWorker

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).resolve().parents[2] / "producers" / "node" / "deduct.js"


@pytest.fixture
def node() -> str:
    path = shutil.which("node")
    if path is None:
        if services.IN_CI:
            pytest.fail("node is not on PATH (CI=true)")
        pytest.skip("node is not on PATH")
    return path


def deduct(node: str, worker: RunningWorker, user: str, amount: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node, str(SCRIPT), "--redis", worker.broker_url, "--user", user, "--amount", str(amount), "--wait", "20", *extra],
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_node_producer_deducts_through_the_worker(node: str, redis_worker: RunningWorker) -> None:
    redis_worker.service.add_credits("alice", 50)
    run = deduct(node, redis_worker, "alice", 5)
    assert run.returncode == 0, run.stderr
    task_id, result_line = run.stdout.strip().splitlines()
    result = json.loads(result_line)
    assert result["ok"] is True and result["result"]["balance_after"] == 45
    assert result["result"]["idempotency_key"] == f"task:{task_id}"
    assert redis_worker.service.get_user_credits_info("alice").available == 45


def test_node_producer_gets_the_error_code(node: str, redis_worker: RunningWorker) -> None:
    redis_worker.service.add_credits("alice", 3)
    run = deduct(node, redis_worker, "alice", 5)
    assert run.returncode == 1
    assert json.loads(run.stdout.strip().splitlines()[1])["error"]["code"] == "insufficient_credits"
    assert redis_worker.service.get_user_credits_info("alice").available == 3


def test_node_producer_with_the_same_key_deducts_once(node: str, redis_worker: RunningWorker) -> None:
    redis_worker.service.add_credits("alice", 50)
    for _ in range(2):
        assert deduct(node, redis_worker, "alice", 5, "--key", "node-order-1").returncode == 0
    assert redis_worker.service.get_user_credits_info("alice").available == 45
