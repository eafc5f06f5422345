"""`creditworker up` on the embedded defaults, and Flower listing the tasks that ran."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from creditworker.settings import Settings
from creditworker.worker import commands
from producers import CreditClient
from tests.e2e.conftest import RunningWorker
from tests.faults.servers import free_port

pytestmark = pytest.mark.e2e

AUTH = ("operator", "s3cret")


def wait_for_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer")


def flower_tasks(port: int, expected: int, timeout: float = 30) -> dict[str, dict[str, object]]:
    deadline = time.monotonic() + timeout
    tasks: dict[str, dict[str, object]] = {}
    while time.monotonic() < deadline:
        tasks = httpx.get(f"http://127.0.0.1:{port}/api/tasks", auth=AUTH, timeout=5).json()
        if len([t for t in tasks.values() if t.get("state") == "SUCCESS"]) >= expected:
            return tasks
        time.sleep(0.5)
    return tasks


def child_running(parent: int, program: str) -> int:
    """The pid of `parent`'s child whose command line names `program` (e.g. celery's worker)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    for pid in children:
        if program in Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0"):
            return int(pid)
    raise AssertionError(f"no {program} among the children of {parent}")


@pytest.fixture
def embedded_up(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITWORKER_")}
    env["C_FORCE_ROOT"] = "1"
    port = free_port()
    log = open(tmp_path / "up.log", "wb")
    process = subprocess.Popen(
        ["creditworker", "up", "--flower", "--flower-port", str(port), "--flower-basic-auth", ":".join(AUTH)],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        yield process, port, tmp_path
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_up_runs_worker_beat_and_flower_on_the_embedded_defaults_and_stops_cleanly(
    embedded_up: tuple[subprocess.Popen[bytes], int, Path],
) -> None:
    process, port, workdir = embedded_up
    client = CreditClient(Settings(data_dir=str(workdir / ".creditworker")))
    deadline = time.monotonic() + 60
    while not client.app.control.ping(timeout=1.0):
        assert process.poll() is None, (workdir / "up.log").read_text()
        assert time.monotonic() < deadline, (workdir / "up.log").read_text()
    client.add_credits("alice", 100).get(timeout=20)
    assert client.deduct_credits("alice", 30).get(timeout=20).balance_after == 70
    assert (workdir / "creditworker.db").exists()

    # a worker that dies (as one can on a broker outage) is restarted by `up`
    os.killpg(child_running(process.pid, "worker"), signal.SIGKILL)
    deadline = time.monotonic() + 60
    while "worker exited with -9; restarting it" not in (workdir / "up.log").read_text():
        assert time.monotonic() < deadline, (workdir / "up.log").read_text()
        time.sleep(0.2)
    assert client.deduct_credits("alice", 5).get(timeout=60).balance_after == 65
    assert process.poll() is None

    wait_for_http(f"http://127.0.0.1:{port}/healthcheck")
    assert httpx.get(f"http://127.0.0.1:{port}/api/tasks", timeout=5).status_code == 401
    tasks = flower_tasks(port, expected=2)
    names = {t["name"] for t in tasks.values()}
    assert {"creditworker.credits.add", "creditworker.credits.deduct"} <= names

    process.send_signal(signal.SIGINT)
    assert process.wait(60) == 0
    log = (workdir / "up.log").read_text()
    assert "celery@" in log and "beat" in log.lower()


def test_flower_lists_name_arguments_state_runtime_and_result(
    redis_worker: RunningWorker, tmp_path: Path
) -> None:
    port = free_port()
    flower = subprocess.Popen(
        commands.flower_command(port, ":".join(AUTH)), env=redis_worker.env, cwd=redis_worker.workdir,
        stdout=open(tmp_path / "flower.log", "wb"), stderr=subprocess.STDOUT,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthcheck")
        time.sleep(2)  # Flower subscribes to the event stream after its HTTP server starts
        redis_worker.client.add_credits("ann", 10).get()
        redis_worker.client.deduct_credits("ann", 4, idempotency_key="flower-1").get()
        tasks = flower_tasks(port, expected=2)
        deduct = next(t for t in tasks.values() if t["name"] == "creditworker.credits.deduct")
        assert deduct["state"] == "SUCCESS"
        assert "flower-1" in str(deduct["kwargs"])
        assert deduct["runtime"] is not None
        assert "'ok': True" in str(deduct["result"]) or '"ok": true' in str(deduct["result"])
        unauthorised = httpx.get(f"http://127.0.0.1:{port}/api/tasks", timeout=5)
        assert unauthorised.status_code == 401
    finally:
        flower.terminate()
        flower.wait(20)
