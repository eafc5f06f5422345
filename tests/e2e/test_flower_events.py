"""Task events are off by default, and a real Flower switches them on: until then a worker
sends none (each would cost a broker message per task), and from then on Flower lists
every task with its state, gathered ones included."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from creditworker.worker import commands
from tests.e2e.conftest import RunningWorker
from tests.e2e.test_up_and_flower import AUTH, flower_tasks, wait_for_http
from tests.services import free_port

pytestmark = pytest.mark.e2e


class TaskEvents:
    """Every task event on the broker, collected by a receiver thread."""

    def __init__(self, worker: RunningWorker) -> None:
        self.seen: list[dict[str, Any]] = []
        self.connection = worker.client.app.connection_for_read()
        self.receiver = worker.client.app.events.Receiver(
            self.connection, handlers={"*": self._on_event})
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        time.sleep(1.0)  # subscribed

    def _on_event(self, event: dict[str, Any]) -> None:
        if str(event.get("type", "")).startswith("task-"):
            self.seen.append(event)

    def _run(self) -> None:
        with contextlib.suppress(Exception):  # stopped by closing the connection
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def of(self, task_id: str) -> set[str]:
        return {str(event["type"]) for event in list(self.seen) if event.get("uuid") == task_id}

    def stop(self) -> None:
        self.receiver.should_stop = True
        self.connection.close()


def test_no_task_events_until_flower_asks_then_flower_lists_every_task(
    redis_worker: RunningWorker, tmp_path: Path
) -> None:
    client = redis_worker.client
    events = TaskEvents(redis_worker)
    flower: subprocess.Popen[bytes] | None = None
    try:
        client.add_credits("bea", 100).get(timeout=30)
        quiet = client.deduct_credits("bea", 1)
        quiet.get(timeout=30)
        time.sleep(1.0)
        assert events.of(quiet.task_id) == set()  # no task events by default

        port = free_port()
        with open(tmp_path / "flower.log", "wb") as log:
            flower = subprocess.Popen(
                commands.flower_command(port, ":".join(AUTH)), env=redis_worker.env,
                cwd=redis_worker.workdir, stdout=log, stderr=subprocess.STDOUT,
            )
        wait_for_http(f"http://127.0.0.1:{port}/healthcheck")
        deadline = time.monotonic() + 30  # Flower sends enable_events every 5 s
        while True:
            probe = client.app.send_task("creditworker.health.ping")
            probe.get(timeout=30)
            time.sleep(0.5)
            if "task-succeeded" in events.of(probe.id):
                break
            assert time.monotonic() < deadline, "Flower did not switch task events on"

        handles = {
            "creditworker.credits.add": client.add_credits("bea", 10),
            "creditworker.credits.deduct": client.deduct_credits("bea", 4, idempotency_key="watched-1"),
            "creditworker.credits.reserve": client.submit_reserve("bea", 2),
            "creditworker.credits.balance": client.get_user_credits_info("bea"),
        }
        for handle in handles.values():
            handle.get(timeout=30)
        listed = flower_tasks(port, expected=len(handles) + 1)
        for name, handle in handles.items():
            task = listed.get(handle.task_id)
            assert task is not None, f"{name} not listed by Flower: {sorted(listed)}"
            assert task["name"] == name and task["state"] == "SUCCESS"
            assert task["runtime"] is not None and task["result"]
            assert {"task-received", "task-started", "task-succeeded"} <= events.of(handle.task_id)
        assert "watched-1" in str(listed[handles["creditworker.credits.deduct"].task_id]["kwargs"])
    finally:
        events.stop()
        if flower is not None:
            flower.terminate()
            flower.wait(20)
