"""`up` says what to check when a child loses the broker (issue 30), once, not per retry."""

from __future__ import annotations

import sys
import time

import pytest

from creditworker.worker.launcher import Child, Program


def test_a_child_that_cannot_reach_the_broker_makes_up_say_what_to_check(
    capsys: pytest.CaptureFixture[str],
) -> None:
    script = ("import time\nfor n in range(3):\n"
              "    print('[2026-01-01 00:00:00,000: ERROR/MainProcess] consumer: Cannot connect to "
              "redis://127.0.0.1:6999/0: Error 111. Trying again in 2.00 seconds... (%d/100)' % n,"
              " flush=True)\n")
    child = Child(Program("worker", [sys.executable, "-c", script]), None)
    forwarded: list[bytes] = []
    deadline = time.monotonic() + 20
    while child.forward(forwarded.append) or child.process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child.drain(forwarded.append)
    assert sum(b"Cannot connect to" in line for line in forwarded) == 3
    told = capsys.readouterr().err
    assert told.count("worker lost the broker and keeps retrying it") == 1
    assert "CREDITWORKER_BROKER_URL" in told
