"""How `creditworker up` looks after its children: they die with it, a failing one is
reported with its cause, and Flower is optional. Real processes on the embedded defaults."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

from creditworker.settings import Settings
from creditworker.worker.launcher import LastError
from producers import CreditClient
from tests.e2e.test_up_and_flower import AUTH, alive, argv_of, running_up, wait_for_http
from tests.services import free_port

pytestmark = pytest.mark.e2e


def test_worker_with_its_pool_beat_and_flower_exit_when_up_is_killed(tmp_path: Path) -> None:
    """No orphan survives `up` killed by SIGKILL (or the OOM killer): an orphaned beat would
    double the schedule once `up` is started again."""
    port = free_port()
    with running_up(
        tmp_path, "--flower", "--flower-port", str(port), FLOWER_BASIC_AUTH=":".join(AUTH)
    ) as up:
        up.wait_for_worker(CreditClient(Settings(data_dir=str(tmp_path / ".creditworker"))))
        wait_for_http(f"http://127.0.0.1:{port}/healthcheck")
        # the login given in FLOWER_BASIC_AUTH opens Flower's API
        assert httpx.get(f"http://127.0.0.1:{port}/api/workers", auth=AUTH, timeout=10).status_code == 200
        processes = up.descendants()
        programs = [argv_of(pid) for pid in processes]
        assert sum("worker" in argv for argv in programs) >= 3  # the main process and its pool of 2
        assert any("beat" in argv for argv in programs) and any("flower" in argv for argv in programs)

        up.process.kill()
        up.process.wait()
        deadline = time.monotonic() + 20
        while (survivors := [pid for pid in processes if alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not survivors, [" ".join(argv_of(pid)) for pid in survivors]
        assert f"flower    http://127.0.0.1:{port}/, log in as operator (password from FLOWER_BASIC_AUTH" in up.log


def test_flower_that_cannot_start_is_reported_and_worker_and_beat_keep_running(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with running_up(tmp_path, "--flower", "--flower-port", str(port)) as up:
            up.wait_for_log(
                r"^creditworker up: flower could not start: OSError: \[Errno 98\] Address already in use; "
                r"worker and beat keep running without it$"
            )
            client = CreditClient(Settings(data_dir=str(tmp_path / ".creditworker")))
            up.wait_for_worker(client)
            assert client.add_credits("bob", 7).get(timeout=30).balance_after == 7
            assert up.process.poll() is None
            assert alive(up.child("beat")) and alive(up.child("worker"))
            up.process.send_signal(signal.SIGINT)
            assert up.process.wait(60) == 0


def test_a_child_that_keeps_exiting_is_reported_with_its_cause_in_one_line(tmp_path: Path) -> None:
    """A worker that cannot write its pid file (Celery reads CELERY_WORKER_PIDFILE) fails at
    each start; `up` restarts it 5 times, then says why in one line and stops beat too."""
    pidfile = "/proc/no-such-dir/worker.pid"
    with running_up(tmp_path, CELERY_WORKER_PIDFILE=pidfile) as up:
        deadline = time.monotonic() + 120
        while up.process.poll() is None:
            up.descendants()
            assert time.monotonic() < deadline, up.log[-3000:]
            time.sleep(0.2)
        assert up.process.returncode == 1
        cause = re.escape(f"celery.platforms.LockFailed: [Errno 2] No such file or directory: '{pidfile}'")
        reports = re.findall(
            rf"^creditworker up: worker keeps exiting \(6 times in \d+ s\): {cause}; stopping$",
            up.log, re.MULTILINE,
        )
        assert len(reports) == 1, up.log[-3000:]
        restarts = re.findall(
            rf"^creditworker up: worker exited with code 1 \({cause}\); restarting it$", up.log, re.MULTILINE
        )
        assert len(restarts) == 5, up.log[-3000:]
        assert up.seen and not [pid for pid in up.seen if alive(pid)]


TRACEBACK = """\
[2026-01-01 00:00:00,000: CRITICAL/MainProcess] Unrecoverable error: LockFailed("No such file")
Traceback (most recent call last):
  File "celery/platforms.py", line 228, in write_pid
    pidfile_fd = os.open(self.path, PIDFILE_FLAGS, PIDFILE_MODE)
FileNotFoundError: [Errno 2] No such file or directory: '/run/w.pid'

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "celery/platforms.py", line 155, in acquire
    self.write_pid()
celery.platforms.LockFailed: [Errno 2] No such file or directory: '/run/w.pid'

worker: Warm shutdown (MainProcess)
"""


@pytest.mark.parametrize(
    ("output", "error"),
    [
        (TRACEBACK, "celery.platforms.LockFailed: [Errno 2] No such file or directory: '/run/w.pid'"),
        (TRACEBACK.split("\nTraceback")[0], 'Unrecoverable error: LockFailed("No such file")'),
        ("Traceback (most recent call last):\n  File \"x.py\", line 1\nKeyboardInterrupt\n", "KeyboardInterrupt"),
        ("[E 261125 16:36:19 web:2271] 500 GET /api/tasks", "500 GET /api/tasks"),
        ("Usage: celery [OPTIONS]\nError: Invalid value for '-A': no module\n", "Error: Invalid value for '-A': no module"),
        ("[2026-01-01 00:00:00,000: INFO/MainProcess] celery@host ready.", None),
        ("[I 261125 16:36:18 command:177] Visit me at http://127.0.0.1:5555", None),
    ],
)
def test_the_last_error_a_child_printed_is_its_exception_or_error_record(output: str, error: str | None) -> None:
    last_error = LastError()
    for line in output.splitlines():
        last_error.feed(line)
    assert last_error.message == error


def test_up_runs_celery_with_its_own_python_whatever_is_on_path(tmp_path: Path) -> None:
    """`venv/bin/creditworker up` without an activated venv: no `celery` on PATH (or another
    installation's) must not decide which worker runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "creditworker").symlink_to(Path(sys.executable).parent / "creditworker")
    workdir = tmp_path / "work"
    workdir.mkdir()
    with running_up(workdir, PATH=f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin") as up:
        client = CreditClient(Settings(data_dir=str(workdir / ".creditworker")))
        up.wait_for_worker(client)
        assert client.add_credits("bob", 3).get(timeout=30).balance_after == 3
