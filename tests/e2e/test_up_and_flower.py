"""`creditworker up` on the embedded defaults, and Flower listing the tasks that ran.

`running_up` and `Up` serve tests/e2e/test_supervision.py too.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from creditworker.settings import Settings
from creditworker.worker import commands
from producers import CreditClient
from tests.e2e.conftest import RunningWorker
from tests.services import free_port

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


def flower_tasks(
    port: int, expected: int, auth: tuple[str, str] = AUTH, timeout: float = 30
) -> dict[str, dict[str, object]]:
    deadline = time.monotonic() + timeout
    tasks: dict[str, dict[str, object]] = {}
    while time.monotonic() < deadline:
        tasks = httpx.get(f"http://127.0.0.1:{port}/api/tasks", auth=auth, timeout=5).json()
        if len([t for t in tasks.values() if t.get("state") == "SUCCESS"]) >= expected:
            return tasks
        time.sleep(0.5)
    return tasks


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children_of(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return children


def argv_of(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except (FileNotFoundError, ProcessLookupError):
        return []


@dataclass
class Up:
    """A running `creditworker up`, its log, and every process it was seen to run."""

    process: subprocess.Popen[bytes]
    workdir: Path
    seen: set[int] = field(default_factory=set)

    @property
    def log(self) -> str:
        return (self.workdir / "up.log").read_text()

    def descendants(self) -> set[int]:
        """Worker (and its pool), beat and Flower: every process below `up`, remembered."""
        found: set[int] = set()
        pending = children_of(self.process.pid)
        while pending:
            pid = pending.pop()
            found.add(pid)
            pending += children_of(pid)
        self.seen |= found
        return found

    def child(self, program: str) -> int:
        """The pid of `up`'s child whose command line names `program` ("worker", "beat")."""
        for pid in children_of(self.process.pid):
            if program in argv_of(pid):
                return pid
        raise AssertionError(f"no {program} among the children of up:\n{self.log[-3000:]}")

    def wait_for_log(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while (match := re.search(pattern, self.log, re.MULTILINE)) is None:
            assert time.monotonic() < deadline, f"no {pattern!r} in:\n{self.log[-3000:]}"
            time.sleep(0.2)
        return match

    def wait_for_worker(self, client: CreditClient, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not client.app.control.ping(timeout=1.0):
            assert self.process.poll() is None, self.log[-3000:]
            assert time.monotonic() < deadline, self.log[-3000:]


@contextmanager
def running_up(workdir: Path, *args: str, **env: str) -> Iterator[Up]:
    """`creditworker up ARGS` on the embedded defaults in `workdir`.

    Afterwards, whatever happened: Ctrl-C, then SIGKILL, then SIGKILL to any process it
    was seen to run that is still alive, so a failing test leaves nothing behind.
    """
    inherited = {
        key: value for key, value in os.environ.items()
        if not key.startswith(("CREDITWORKER_", "FLOWER_"))
    }
    with open(workdir / "up.log", "wb") as log:
        process = subprocess.Popen(
            ["creditworker", "up", *args], cwd=workdir,
            env={**inherited, "C_FORCE_ROOT": "1", **env}, stdout=log, stderr=subprocess.STDOUT,
        )
    up = Up(process, workdir)
    try:
        yield up
    finally:
        if process.poll() is None:
            up.descendants()
            process.send_signal(signal.SIGINT)
            try:
                process.wait(40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid in up.seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def listening_addresses(port: int) -> set[str]:
    """The addresses a TCP socket listens on at `port` (from /proc/net/tcp and tcp6)."""
    addresses: set[str] = set()
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            hex_address, hex_port = local.split(":")
            if int(hex_port, 16) == port and state == "0A":  # 0A: LISTEN
                packed = bytes.fromhex(hex_address)
                # the kernel prints each 32-bit word in host (little-endian) order
                address = b"".join(packed[i:i + 4][::-1] for i in range(0, len(packed), 4))
                family = socket.AF_INET if len(address) == 4 else socket.AF_INET6
                addresses.add(socket.inet_ntop(family, address))
    return addresses


def test_up_runs_worker_beat_and_flower_on_the_embedded_defaults_and_stops_cleanly(
    tmp_path: Path,
) -> None:
    port = free_port()
    with running_up(tmp_path, "--flower", "--flower-port", str(port)) as up:
        client = CreditClient(Settings(data_dir=str(tmp_path / ".creditworker")))
        up.wait_for_worker(client)
        client.add_credits("alice", 100).get(timeout=20)
        assert client.deduct_credits("alice", 30).get(timeout=20).balance_after == 70
        assert (tmp_path / "creditworker.db").exists()

        # what runs where, and how to log in to Flower: a password made up for this run
        assert "database  sqlite:///creditworker.db" in up.log
        assert f"data dir  {tmp_path / '.creditworker'}" in up.log
        login = re.search(rf"flower    http://127\.0\.0\.1:{port}/, log in as admin, password (\S+) ", up.log)
        assert login, up.log[:3000]
        auth = ("admin", login.group(1))

        # a worker that dies (as one can on a broker outage) is restarted by `up`
        os.killpg(up.child("worker"), signal.SIGKILL)
        up.wait_for_log("worker was killed by SIGKILL; restarting it")
        assert client.deduct_credits("alice", 5).get(timeout=60).balance_after == 65
        assert up.process.poll() is None

        # Flower on loopback only, its API behind the printed login
        wait_for_http(f"http://127.0.0.1:{port}/healthcheck")
        assert listening_addresses(port) == {"127.0.0.1"}
        assert httpx.get(f"http://127.0.0.1:{port}/api/tasks", timeout=5).status_code == 401
        tasks = flower_tasks(port, expected=2, auth=auth)
        names = {t["name"] for t in tasks.values()}
        assert {"creditworker.credits.add", "creditworker.credits.deduct"} <= names

        up.process.send_signal(signal.SIGINT)
        assert up.process.wait(60) == 0
        assert "creditworker up: stopping: waiting for running tasks to finish" in up.log
        assert "celery@" in up.log and "beat" in up.log.lower()
        assert up.log.rstrip().endswith("creditworker up: stopped")


def test_flower_lists_name_arguments_state_runtime_and_result(
    redis_worker: RunningWorker, tmp_path: Path
) -> None:
    port = free_port()
    with open(tmp_path / "flower.log", "wb") as log:
        flower = subprocess.Popen(
            commands.flower_command(port, ":".join(AUTH)), env=redis_worker.env,
            cwd=redis_worker.workdir, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthcheck")
        # Flower subscribes to the event stream after its HTTP server starts, and switches
        # the worker's task events on (they are off by default) within 5 s.
        time.sleep(6)
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
